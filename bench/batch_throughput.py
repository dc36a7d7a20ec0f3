"""Aggregate tokens/s against batch size (issue: one layer load serves many sequences).

    python bench/batch_throughput.py MODEL [--sizes 1,2,4,8,16,32,64] [--tokens 8]
        [--settings stream@200MB/s,stream,full] [--json OUT]

For each setting (mode, optional throttle) and batch size B, generates
``--tokens`` greedy tokens for B prompts of ``--prompt-tokens`` tokens each in
one batch, and reports aggregate generated tokens / wall seconds and the ratio
to batch size 1 in the same setting (measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import layerrun


def run(model: str, sizes: list[int], tokens: int, prompt_tokens: int, settings: list[str]) -> list[dict]:
    rows = []
    for setting in settings:
        mode, _, throttle = setting.partition("@")
        eng = layerrun.load(model, mode=mode, throttle=throttle or None, prefetch=2, batch_size=max(sizes),
                            context=prompt_tokens + tokens + 8)
        g = torch.Generator().manual_seed(0)
        base = None
        for b in sizes:
            prompts = [torch.randint(10, eng.args.vocab_size, (prompt_tokens,), generator=g).tolist() for _ in range(b)]
            t0 = time.perf_counter()
            gens = eng.generate_batch(prompts, max_new_tokens=tokens, ignore_eos=True, batch_size=b)
            dt = time.perf_counter() - t0
            n = sum(len(x.token_ids) for x in gens)
            rate = n / dt
            base = base or rate
            row = {"setting": setting, "batch": b, "tokens": n, "seconds": round(dt, 3),
                   "tok_s": round(rate, 3), "x_batch1": round(rate / base, 2),
                   "bytes_read_GB": round(gens[0].stats.bytes_read / 1e9, 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        eng.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="layered model folder or store name")
    ap.add_argument("--sizes", default="1,2,4,8,16,32,64", help="batch sizes")
    ap.add_argument("--tokens", type=int, default=8, help="tokens generated per sequence")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="prompt length")
    ap.add_argument("--settings", default="stream@200MB/s,stream,full", help="mode[@throttle], comma-separated")
    ap.add_argument("--json", default=None, help="write the rows here")
    a = ap.parse_args()
    rows = run(a.model, [int(x) for x in a.sizes.split(",")], a.tokens, a.prompt_tokens, a.settings.split(","))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
