"""Matrix-vector speed on one thread: the compiled kernel (layerrun/models/kernels) against torch's.

A model's worth of SmolLM2-135M-shaped weights (30 layers x 7 matrices, 425 MB in float32) is cycled
through, so that the weights come from memory as in decode; for each row count, every contender runs
one pass over all of them in turn within a round (so all see the same machine noise), rounds repeat,
and the median and best of ms per pass (process CPU time, which other processes taking the cores
disturb less than wall time) and GB/s of weights are reported. ``--head`` adds a large-vocabulary
head alone (Gemma 3: 262144 x 640).

Contenders: ``kernel`` (the native build: AVX-512 where the CPU has it), ``kernel-avx2`` (the AVX2
build that AVX2-only CPUs get), ``onednn`` (``torch.ops.mkldnn._linear_pointwise`` on the plain
weight), ``onednn-packed`` (bfloat16: the weight reordered into oneDNN's layout), ``F.linear``.

    python bench/matvec_speed.py [--dtype float32,bfloat16] [--rows 1,2,4,8,16] [--rounds 5] [--head] [--json]
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from layerrun.models import kernels  # noqa: E402

SMOL = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
GEMMA_HEAD = [(262144, 640)]


def contenders(dtype):
    k = kernels.build(kernels.NATIVE)
    k2 = kernels.build(kernels.AVX2)
    out = {f"kernel ({k.isa})": lambda x, w, p: k.linear(x, w),
           "kernel-avx2": lambda x, w, p: k2.linear(x, w),
           "onednn": lambda x, w, p: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")}
    if dtype == torch.bfloat16:
        out["onednn-packed"] = lambda x, w, p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
    out["F.linear"] = lambda x, w, p: F.linear(x, w)
    return out


def run(dtype, shapes, rows_list, rounds, layers):
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(*s, generator=g).to(dtype) for _ in range(layers) for s in shapes]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in ws] if dtype == torch.bfloat16 else ws
    nbytes = sum(w.numel() * w.element_size() for w in ws)
    fns = contenders(dtype)
    res = {}
    for rows in rows_list:
        xs = {k: torch.randn(rows, k, generator=g).to(dtype) for k in {s[1] for s in shapes}}
        for fn in fns.values():  # warm-up
            fn(xs[ws[0].shape[1]], ws[0], packed[0])
        cpu = {c: [] for c in fns}
        for _ in range(rounds):
            for c, fn in fns.items():
                t0 = time.process_time()
                for w, p in zip(ws, packed):
                    fn(xs[w.shape[1]], w, p)
                cpu[c].append(time.process_time() - t0)
        res[rows] = {c: {"ms_median": round(statistics.median(v) * 1e3, 2), "ms_best": round(min(v) * 1e3, 2),
                         "gb_s_median": round(nbytes / statistics.median(v) / 1e9, 1)} for c, v in cpu.items()}
    return nbytes, res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32,bfloat16")
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--head", action="store_true", help="also the Gemma 3 head (262144 x 640), alone")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = [int(r) for r in a.rows.split(",")]
    out = {"bench": "matvec_speed", "load_1min": round(os.getloadavg()[0], 2), "results": {}}
    for name in a.dtype.split(","):
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
        sets = [("smollm2 30 layers", SMOL, 30)] + ([("gemma3 head", GEMMA_HEAD, 1)] if a.head else [])
        for label, shapes, layers in sets:
            nbytes, res = run(dtype, shapes, rows if layers > 1 else [1], a.rounds, layers)
            out["results"][f"{label} {name}"] = {"mbytes": round(nbytes / 1e6), "rows": res}
            for r, v in res.items():
                print(f"{label} {name} ({nbytes / 1e6:.0f} MB) rows {r}: " + ", ".join(
                    f"{c} {e['ms_median']} ms {e['gb_s_median']} GB/s" for c, e in v.items()), file=sys.stderr, flush=True)
    out["load_1min_after"] = round(os.getloadavg()[0], 2)
    if a.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
