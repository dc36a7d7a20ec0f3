"""Decode speed by torch thread count, alternated in one process (the basis of ``--threads auto``).

For each round, each thread count in turn: ``torch.set_num_threads(n)`` then a greedy decode on the
same engine (full mode). Reports per thread count the median tok/s and the process CPU seconds per
token (all threads; OpenMP workers spinning at barriers show up here) with the load average of each
round, and the per-round ratio of every count to the first.

    python bench/threads.py MODEL [--dtype bfloat16] [--threads 1,2] [--rounds 6] [--max-new-tokens 24] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import layerrun  # noqa: E402
from layerrun.bench import machine_info  # noqa: E402
from layerrun.bench_generate import _prompt_ids  # noqa: E402


def one(eng, ids, n):
    t, c = [], []
    for ch in eng.stream(ids, max_new_tokens=n, ignore_eos=True):
        if ch.token_id is not None:
            t.append(time.perf_counter())
            c.append(time.process_time())
    return (len(t) - 1) / (t[-1] - t[0]), (c[-1] - c[0]) / (len(t) - 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--mode", default="full")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    counts = [int(x) for x in a.threads.split(",")]
    machine = machine_info()
    eng = layerrun.load(a.model, mode=a.mode, dtype=a.dtype, device="cpu", threads=counts[0])
    ids = _prompt_ids(eng.args.vocab_size, 16, 0)
    for n in counts:
        torch.set_num_threads(n)
        one(eng, ids, 4)
    res = {n: {"tok_s": [], "cpu_ms_per_token": []} for n in counts}
    loads = []
    for r in range(a.rounds):
        loads.append(round(os.getloadavg()[0], 2))
        for n in counts:
            torch.set_num_threads(n)
            tps, cpu = one(eng, ids, a.max_new_tokens)
            res[n]["tok_s"].append(round(tps, 2))
            res[n]["cpu_ms_per_token"].append(round(cpu * 1e3, 1))
        print(f"round {r + 1} (load {loads[-1]}): " + ", ".join(
            f"{n} thr {res[n]['tok_s'][-1]:.1f} tok/s {res[n]['cpu_ms_per_token'][-1]:.0f} cpu-ms/tok" for n in counts),
            file=sys.stderr, flush=True)
    eng.close()
    first = counts[0]
    out = {"bench": "threads", "model": a.model, "dtype": str(eng.dtype), "mode": a.mode, "machine": machine,
           "load_1min_per_round": loads, "results": {}}
    for n in counts:
        e = {"tok_s_median": statistics.median(res[n]["tok_s"]), "tok_s": res[n]["tok_s"],
             "cpu_ms_per_token_median": statistics.median(res[n]["cpu_ms_per_token"])}
        if n != first:
            e[f"ratio_to_{first}_thread_per_round"] = [round(x / y, 2) for x, y in
                                                      zip(res[n]["tok_s"], res[first]["tok_s"], strict=True)]
        out["results"][n] = e
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        for n, e in out["results"].items():
            print(f"{n} threads: {e['tok_s_median']:.2f} tok/s median {e['tok_s']}, "
                  f"{e['cpu_ms_per_token_median']:.1f} cpu-ms/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
