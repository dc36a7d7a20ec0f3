"""Partial mode's resident layers against the same layers in full mode (issue #18: "the same in
partial mode for its resident layers"), and its streamed layers against stream mode, warm cache.

One process loads the model three times (full; partial with ``--max-memory`` chosen so that part
of the layers stay resident; stream), all with the mmap reader on a warm page cache and the same
threads, and decodes ``--tokens`` greedy tokens in each, alternating round by round. Per layer,
the compute time each step spent on it (``GenerationStats.layer_compute_s``) is summed over the
decode; ratios compare the same layers across modes in the same round:

- resident: full-mode compute of partial's resident layers / partial's compute of them (1.0 = as fast);
- streamed: stream-mode compute of partial's streamed layers / partial's compute of them;
- whole step: partial decode tok/s against full and stream.

    python bench/partial_resident.py smollm2-135m-instruct@float32 --max-memory 0.7GB --rounds 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import layerrun  # noqa: E402
from layerrun.bench_refs import machine_info  # noqa: E402


def decode(eng, ids, n):
    """(greedy token ids, decode tok/s, {layer: compute seconds over the decode steps})."""
    gen = eng.stream(ids, max_new_tokens=n, ignore_eos=True)
    toks, stamps, stats = [], [], None
    for c in gen:
        if c.token_id is not None:
            toks.append(c.token_id)
            stamps.append(time.perf_counter())
        if c.stats is not None:
            stats = c.stats
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    per = {int(k): v for k, v in stats.layer_compute_s.items()} if stats is not None else {}
    return toks, rate, per


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--max-memory", default="0.7GB", help="partial mode's budget (decides how many layers stay)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    common = dict(reader="mmap", threads=a.threads, dtype=a.dtype, device="cpu", context=64)
    engines = {  # partial first: its budget counts what the process already holds
        "partial": layerrun.load(a.model, mode="partial", max_memory=a.max_memory, **common),
        "full": layerrun.load(a.model, mode="full", **common),
        "stream": layerrun.load(a.model, mode="stream", **common),
    }
    plan = engines["partial"].plan
    if not plan.resident or not plan.streamed:
        raise SystemExit(f"--max-memory {a.max_memory}: partial mode kept {len(plan.resident)} of "
                         f"{len(plan.resident) + len(plan.streamed)} layers; choose a budget that keeps some of each")
    resident, streamed = set(plan.resident), set(plan.streamed)
    ids = list(range(100, 116))
    for e in engines.values():
        decode(e, ids, 4)  # warm-up: page cache, first-call allocations
    rows, tokens = [], {}
    for r in range(a.rounds):
        got = {}
        for name, e in engines.items():
            toks, rate, per = decode(e, ids, a.tokens)
            tokens[name] = toks
            got[name] = (rate, per)
        res_ratio = (sum(got["full"][1].get(i, 0) for i in resident)
                     / max(1e-9, sum(got["partial"][1].get(i, 0) for i in resident)))
        str_ratio = (sum(got["stream"][1].get(i, 0) for i in streamed)
                     / max(1e-9, sum(got["partial"][1].get(i, 0) for i in streamed)))
        row = {"load": round(os.getloadavg()[0], 2), "tok_s": {k: round(v[0], 2) for k, v in got.items()},
               "resident_full_over_partial": round(res_ratio, 3), "streamed_stream_over_partial": round(str_ratio, 3)}
        rows.append(row)
        print(f"round {r + 1}: {row}", file=sys.stderr)
    out = {
        "bench": "partial_resident", "model": a.model, "max_memory": a.max_memory, "machine": machine_info(),
        "resident_layers": len(resident), "streamed_layers": len(streamed), "rounds": rows,
        "median_resident_full_over_partial": statistics.median(r["resident_full_over_partial"] for r in rows),
        "median_streamed_stream_over_partial": statistics.median(r["streamed_stream_over_partial"] for r in rows),
        "median_tok_s": {k: statistics.median(r["tok_s"][k] for r in rows) for k in engines},
        "tokens_equal": {k: tokens[k] == tokens["full"] for k in engines},
    }
    for e in engines.values():
        e.close()
    print(json.dumps(out, indent=1) if a.json else
          f"resident layers: full/partial compute {out['median_resident_full_over_partial']:.3f}; "
          f"streamed layers: stream/partial {out['median_streamed_stream_over_partial']:.3f}; "
          f"tok/s {out['median_tok_s']}; tokens equal {out['tokens_equal']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
