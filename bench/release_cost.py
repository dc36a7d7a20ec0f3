"""How long the compute thread spends handing a slot back to the pipeline (LayerStream.release).

    python bench/release_cost.py [MODEL] [--tokens 24] [--rounds 3]

Wraps LayerStream.release in a timer during stream-mode generation (pread,
prefetch 2) and prints the median release time, decode tokens/s, overlap and
stall %. On a quiet 2-core machine this is a fraction of a millisecond; under
CPU contention it grows to several ms (the self-pipe write gives up the GIL).
"""

from __future__ import annotations

import argparse
import statistics
import time

import layerrun
from layerrun.io import pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="smollm2-135m-instruct", help="layered model folder or store name")
    ap.add_argument("--tokens", type=int, default=24, help="tokens generated per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (median reported)")
    a = ap.parse_args()
    times: list[float] = []
    orig = pipeline.LayerStream.release

    def timed(self, staged):
        t = time.perf_counter()
        orig(self, staged)
        times.append(time.perf_counter() - t)

    pipeline.LayerStream.release = timed
    eng = layerrun.load(a.model, mode="stream", reader="pread", prefetch=2)
    prompt = list(range(100, 116))
    eng.generate(prompt, max_new_tokens=4, ignore_eos=True)  # warm-up
    rates, rel = [], []
    for _ in range(a.rounds):
        times.clear()
        g = eng.generate(prompt, max_new_tokens=a.tokens, ignore_eos=True)
        rates.append(g.stats.decode_tokens_per_s)
        rel.append(statistics.median(times))
    print(f"release median {statistics.median(rel) * 1e3:.3f} ms | decode {statistics.median(rates):.2f} tok/s | "
          f"overlap {g.stats.overlap_efficiency:.3f} | stall {g.stats.stall_pct:.1f}%")


if __name__ == "__main__":
    main()
