"""Quantized layers in stream mode on a slow disk: decode tok/s of several conversions of one model,
alternating round by round in one process (issue #18: SmolLM2 int4 at 200 MB/s should reach >= 2.8x
its bfloat16 conversion, about what the bytes per pass predict).

Each contender is ``layerrun.load(MODEL, mode="stream", throttle=RATE, reader="pread")``; per round,
each decodes ``--tokens`` greedy tokens after a 16-token prompt. Reported per contender: median decode
tok/s, stall share of the decode, bytes read per token; and each one's tok/s over the first one's,
per round.

    python bench/quant_stream.py smollm2-135m-instruct@bfloat16 smollm2-135m-instruct@int4 --throttle 200MB/s
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


def run(eng, ids, n):
    stamps, stats = [], None
    for c in eng.stream(ids, max_new_tokens=n, ignore_eos=True):
        if c.token_id is not None:
            stamps.append(time.perf_counter())
        if c.stats is not None:
            stats = c.stats
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return rate, stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="the first is the baseline of the ratios")
    ap.add_argument("--throttle", default="200MB/s")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    engines = {m: layerrun.load(m, mode="stream", throttle=a.throttle, reader="pread", threads=a.threads,
                                device="cpu", context=64) for m in a.models}
    ids = list(range(100, 116))
    for e in engines.values():
        run(e, ids, 2)  # warm-up
    res = {m: {"tok_s": [], "stall": [], "read_per_token": []} for m in engines}
    ratios = {m: [] for m in engines}
    for r in range(a.rounds):
        got = {}
        for m, e in engines.items():
            rate, st = run(e, ids, a.tokens)
            got[m] = rate
            res[m]["tok_s"].append(round(rate, 3))
            res[m]["stall"].append(round(st.stall_s / max(st.step_s, 1e-9), 3) if getattr(st, "step_s", 0) else None)
            res[m]["read_per_token"].append(round(st.bytes_read / max(1, a.tokens + 1) / 1e6, 1))
        base = got[a.models[0]]
        for m in engines:
            ratios[m].append(round(got[m] / base, 3))
        print(f"round {r + 1} (load {os.getloadavg()[0]:.2f}): " +
              ", ".join(f"{m} {got[m]:.2f} tok/s ({ratios[m][-1]}x)" for m in engines), file=sys.stderr)
    for e in engines.values():
        e.close()
    out = {"bench": "quant_stream", "throttle": a.throttle, "tokens": a.tokens, "machine": machine_info(),
           "results": {m: {**v, "median_tok_s": statistics.median(v["tok_s"]), "ratio_per_round": ratios[m],
                           "median_ratio": statistics.median(ratios[m])} for m, v in res.items()}}
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        for m, v in out["results"].items():
            print(f"{m}: {v['median_tok_s']:.2f} tok/s, {v['median_ratio']}x the first (rounds {v['ratio_per_round']}), "
                  f"~{v['read_per_token'][-1]} MB read per token, stall {v['stall'][-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
