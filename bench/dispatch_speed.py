"""Decode speed of this checkout against another (the "before"), in one process, alternating (issue #18).

The other checkout's package is imported under another name (a copy with its ``layerrun`` imports
renamed, made in a temporary folder), so both engines run in the same process and alternate round by
round (``--rounds`` rounds of ``--tokens`` greedy decode steps each, the first token, i.e. prefill, not
counted): machine noise lands on both alike. Per round: decode tok/s (wall) and process CPU ms per token
(``time.process_time``, which other processes taking the cores disturb far less). Reports medians, the
best round of each, the per-round ratios, and whether the greedy tokens are identical.

``--stub-products`` replaces every matrix product (``F.linear`` and oneDNN's) by zeros of its shape, so
what is timed is the step's cost outside the products (the tokens are then meaningless).

    python bench/dispatch_speed.py MODEL --base /path/to/other/checkout [--dtype bfloat16]
        [--mode full|stream] [--rounds 10] [--tokens 32] [--threads 1] [--stub-products] [--json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

import layerrun  # noqa: E402

_IMPORT = re.compile(r"(\bfrom layerrun\b|\bimport layerrun\b|\"layerrun\.models\.|f\"layerrun\.models\.)")


def import_other(checkout: Path, name: str = "layerrun_base"):
    """``checkout``'s ``layerrun`` package, imported as ``name`` (its imports of itself renamed)."""
    tmp = Path(tempfile.mkdtemp(prefix="dispatch_speed_"))
    dst = tmp / name
    shutil.copytree(checkout / "layerrun", dst, ignore=shutil.ignore_patterns("__pycache__"))
    for p in dst.rglob("*.py"):
        s = p.read_text()
        s = _IMPORT.sub(lambda m: m.group(0).replace("layerrun", name), s)
        s = s.replace("layerrun.models.{", f"{name}.models.{{")
        p.write_text(s)
    sys.path.insert(0, str(tmp))
    return importlib.import_module(name)


def stub_products(*packages) -> None:
    def zeros_linear(x, w, b=None):
        return torch.zeros((*x.shape[:-1], w.shape[0]), dtype=x.dtype)

    def stub(self, x, bias=None):
        return torch.zeros((*x.shape[:-1], self.shape[0]), dtype=x.dtype)

    F.linear = zeros_linear
    for pkg in packages:
        importlib.import_module(f"{pkg.__name__}.models.fast").FastLinear.linear = stub


def run(eng, ids, n):
    out = []
    for c in eng.stream(ids, max_new_tokens=n + 1, ignore_eos=True):
        if c.token_id is not None:
            out.append((time.perf_counter(), time.process_time(), c.token_id))
    k = len(out) - 1
    return {"tok_s": k / (out[-1][0] - out[0][0]), "cpu_ms": 1000 * (out[-1][1] - out[0][1]) / k,
            "tokens": [t for _, _, t in out]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--base", required=True, help="the other checkout (before)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--mode", default="full", choices=("full", "stream"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stub-products", action="store_true",
                    help="replace every matrix product by zeros: time only what a step spends outside them")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    base = import_other(Path(args.base).resolve())
    if args.stub_products:
        stub_products(layerrun, base)
    opts = dict(mode=args.mode, threads=args.threads, device="cpu")
    if args.dtype:
        opts["dtype"] = args.dtype
    if args.mode == "stream":
        opts["reader"] = "mmap"
    engines = {"before": base.load(args.model, **opts), "after": layerrun.load(args.model, **opts)}
    ids = list(range(100, 100 + args.prompt_tokens))
    for eng in engines.values():
        run(eng, ids, 4)
    res = {k: [] for k in engines}
    for r in range(args.rounds):
        for k in (("before", "after") if r % 2 == 0 else ("after", "before")):
            res[k].append(run(engines[k], ids, args.tokens))
        b, a = res["before"][-1], res["after"][-1]
        print(f"round {r + 1}: tok/s before {b['tok_s']:.2f} after {a['tok_s']:.2f}; "
              f"CPU ms/token before {b['cpu_ms']:.2f} after {a['cpu_ms']:.2f}", file=sys.stderr)
    for eng in engines.values():
        eng.close()
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("tok_s", "cpu_ms")} for k, v in res.items()}
    best = {k: {"tok_s": max(x["tok_s"] for x in v), "cpu_ms": min(x["cpu_ms"] for x in v)} for k, v in res.items()}
    ratio_tok = statistics.median(a["tok_s"] / b["tok_s"] for a, b in zip(res["after"], res["before"]))
    ratio_cpu = statistics.median(b["cpu_ms"] / a["cpu_ms"] for a, b in zip(res["after"], res["before"]))
    same = all(a["tokens"] == b["tokens"] for a, b in zip(res["after"], res["before"]))
    out = {"model": args.model, "dtype": args.dtype, "mode": args.mode, "rounds": args.rounds, "tokens": args.tokens,
           "stub_products": args.stub_products, "median": med, "best": best,
           "after_over_before_tok_s": ratio_tok, "before_over_after_cpu": ratio_cpu, "greedy_identical": same,
           "rounds_detail": {k: [{m: x[m] for m in ("tok_s", "cpu_ms")} for x in v] for k, v in res.items()}}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"{args.model} {args.dtype or ''} {args.mode}{' (products stubbed)' if args.stub_products else ''}: "
              f"decode tok/s before {med['before']['tok_s']:.2f} after {med['after']['tok_s']:.2f} "
              f"(per-round ratio x{ratio_tok:.2f}); CPU ms/token before {med['before']['cpu_ms']:.2f} after "
              f"{med['after']['cpu_ms']:.2f} (x{ratio_cpu:.2f}); best round CPU ms/token before "
              f"{best['before']['cpu_ms']:.2f} after {best['after']['cpu_ms']:.2f}; greedy tokens identical: {same}")


if __name__ == "__main__":
    main()
