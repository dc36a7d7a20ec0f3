"""Streamed layers' fused products as views of the file: what they save, measured in one process.

Three engines on one model folder, all warm (mmap, page cache): full mode; stream mode as it runs
(q/k/v and gate/up staged as one view each where the file stores them back to back); and the same
stream engine with those view entries cleared (every part its own view and product, as before).

- ``pass``: one 1-token pass of every layer and the head (``engine.logits``), the three called in
  turn, ``--pairs`` times; CPU time per call; paired ratios (each pair ran back to back, so they
  saw the same machine), median and quartiles.
- ``staging``: ``next()`` + ``release()`` of the stream, per layer, with and without the fused
  views (only the staging: views, casts, oneDNN wrappers).

    python bench/fused_views.py MODEL_FOLDER [--pairs 300] [--dtype float32] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import layerrun  # noqa: E402


def quartiles(v: list[float]) -> str:
    q = statistics.quantiles(v, n=4)
    return f"median {statistics.median(v):.3f} (quartiles {q[0]:.3f}, {q[2]:.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    opts = dict(dtype=a.dtype, device="cpu", threads=a.threads, context=256)
    full = layerrun.load(a.model, mode="full", **opts)
    fused = layerrun.load(a.model, mode="stream", reader="mmap", **opts)
    apart = layerrun.load(a.model, mode="stream", reader="mmap", **opts)
    views = dict(fused._stream._view_entries)
    n_fused = sum(views[id(e)] is not e for e in fused._stream.entries)
    apart._stream._view_entries = {}  # every part its own view, as before
    print(f"{a.model}: {n_fused} of {len(fused._stream.entries)} layers staged with fused views")
    ids = torch.tensor([[5]])
    engs = {"full": full, "fused": fused, "apart": apart}
    ref = full.logits(ids)
    for e in engs.values():
        assert torch.allclose(e.logits(ids), ref, atol=1e-4), "the three disagree"
    cpu = {k: [] for k in engs}
    for i in range(a.pairs):
        for k in ("full", "fused", "apart") if i % 2 else ("apart", "fused", "full"):
            t0 = time.process_time()
            engs[k].logits(ids)
            cpu[k].append(1e3 * (time.process_time() - t0))
    for k, v in cpu.items():
        print(f"pass  {k:5s} CPU {statistics.median(v):.2f} ms")
    print("stream (fused) / full, speed:", quartiles([f / s for f, s in zip(cpu["full"], cpu["fused"], strict=True)]))
    print("stream (apart) / full, speed:", quartiles([f / s for f, s in zip(cpu["full"], cpu["apart"], strict=True)]))
    print("fused / apart, speed:        ", quartiles([p / f for p, f in zip(cpu["apart"], cpu["fused"], strict=True)]))

    st = fused._stream
    n = len(st.entries)
    per = {"fused": [], "apart": []}
    for _ in range(20):
        for k, v in (("fused", views), ("apart", {})):
            st._view_entries = v
            t0 = time.perf_counter()
            for _ in range(5 * n):
                st.release(st.next())
            per[k].append((time.perf_counter() - t0) / (5 * n) * 1e6)
    st._view_entries = views
    for k, v in per.items():
        print(f"staging {k}: {statistics.median(v):.1f} us per layer [{min(v):.1f}, {max(v):.1f}]")
    for e in engs.values():
        e.close()


if __name__ == "__main__":
    main()
