"""Quantized layers against the same model unquantized: accuracy, and decode speed.

    python bench/quant_accuracy.py accuracy [--model smollm2-135m-instruct --model gemma3-270m]
    python bench/quant_accuracy.py speed [--preset 1gb] [--tokens 8]

``accuracy`` converts the model's source GGUF (the one the local store pulled)
to each scheme, runs one teacher-forced forward pass over a fixed English text
(:data:`TEXT`, below) with the quantized and the unquantized folder, and reports
the share of positions whose top-1 token agrees, the perplexity of each and
their difference, and the mean KL divergence. It runs twice per scheme: with
the dequantize + dense matmul path (what prefill uses) and with every matmul
forced through the fused kernels (what decode uses, bf16 activations).

``speed`` builds the synthetic Llama (tools/synthetic_model.py) in bf16, int8
and int4, and measures decode tokens/s of each in stream mode at a 200 MB/s
throttle, unthrottled, and in full mode, in one run, so the ratios compare
figures measured side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

SCHEMES = ("int8", "int8-g128", "int4", "int4-g64", "int4-g128")
WORK = Path.home() / ".cache" / "layerrun" / "quant-bench"

# A fixed text (written for this benchmark), about 600 tokens for either tokenizer.
TEXT = """\
The lighthouse at the end of the northern pier was built in 1871, when the harbour still served the fishing fleet and
the coal ships that came down from the mines along the coast. Its keeper lived in a small stone house at the foot of
the tower with his wife and three children, and every evening at dusk he climbed the one hundred and twelve steps to
light the lamp. In winter the storms came in from the west without warning. The waves broke over the pier, and the
spray reached the gallery at the top of the tower, where the keeper stood with his hand on the rail, watching for the
lights of the boats that were still at sea.

The lamp itself was a simple thing: a wick soaked in paraffin, surrounded by a great lens of polished glass that gathered
the light and sent it out across the water in a single beam. A clockwork mechanism turned the lens once every thirty
seconds, so that ships far out at sea would see a flash, then darkness, then another flash. Each lighthouse on the coast
had its own pattern, and a sailor who knew the patterns could tell where he was from the lights alone, even on a night
without stars.

In 1923 the paraffin lamp was replaced by an electric one, and in 1958 the clockwork gave way to an electric motor. The
last keeper left in 1989, when the light was automated and a computer in a control room two hundred miles away began to
watch over it. The stone house was sold and became a cafe. Tourists now climb the steps in summer, and from the gallery
they can see the whole bay: the new marina with its white yachts, the empty quay where the coal ships once unloaded, and
on a clear day the hills on the far side of the water.

Some things have not changed. The storms still come in from the west, and the waves still break over the pier. The light
still flashes once every thirty seconds, and the fishermen who remain still look for it on their way home. Ask any of
them, and they will tell you that the sea is no kinder than it was a hundred years ago, only that the boats are better
and the forecasts more often right. When the fog rolls in, the horn at the end of the pier sounds twice a minute, a low
note that carries for miles, and in the town people pull their curtains and put the kettle on, and think of those who
are still out there.

Numbers matter at sea as much as words do: a depth of 12 metres at low tide, a heading of 270 degrees, a wind of force 8
gusting 9, a tide table that says high water at 06:42 and again at 19:05. The old keeper kept a log of every night he
spent in the tower, 6,204 entries in a careful hand, and the log is now in the town museum, open at the page for the
great storm of 14 January 1899.
"""


def _store_model(name: str) -> tuple[Path, Path]:
    """(unquantized layered folder, its source GGUF) for a model in the local store."""
    from layerrun.formats.manifest import Manifest
    from layerrun.formats.store import resolve_name

    folder = resolve_name(f"{name}@float32")  # the exact dequantization of the GGUF
    if folder is None:
        from layerrun.formats.store import pull

        folder = pull(name, dtype="float32")
    m = Manifest.read(folder)
    src = Path(m.source.get("path", ""))
    if not src.is_file():
        raise SystemExit(f"{name}: the source {src} of {folder} is gone; pull the model again")
    return Path(folder), src


def _converted(src: Path, name: str, scheme: str) -> Path:
    from layerrun.formats.convert import convert
    from layerrun.formats.manifest import MANIFEST_NAME

    dst = WORK / f"{name}-{scheme}"
    if not (dst / MANIFEST_NAME).is_file():
        convert(src, dst, quantize=scheme, progress=False, force=True)
    return dst


def _forward(folder: Path, ids: torch.Tensor, fused: bool) -> torch.Tensor:
    import layerrun
    from layerrun.formats import quant

    old = quant.FUSED_MAX_ROWS
    quant.FUSED_MAX_ROWS = 1 << 30 if fused else 0
    try:
        with layerrun.load(folder, mode="full") as eng:
            return eng.logits(ids)[0].float()  # (T, vocab)
    finally:
        quant.FUSED_MAX_ROWS = old


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")


def cmd_accuracy(a) -> list[dict]:
    from layerrun.engine.tokenizer import Tokenizer

    rows = []
    for name in a.model:
        ref_folder, src = _store_model(name)
        ids = torch.tensor([Tokenizer(ref_folder).encode(TEXT)])
        t0 = time.perf_counter()
        ref = _forward(ref_folder, ids, fused=False)
        ref_nll = _nll(ref, ids)
        ref_lp = ref.log_softmax(-1)
        base = {"model": name, "tokens": ids.shape[1], "ref": str(ref_folder), "ref_dtype": _dtype(ref_folder),
                "ppl_ref": math.exp(ref_nll.mean().item())}
        print(f"{name}: {ids.shape[1]} tokens, unquantized ppl {base['ppl_ref']:.3f} "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        for scheme in a.scheme:
            folder = _converted(src, name, scheme)
            for fused in (False, True):
                lg = _forward(folder, ids, fused)
                nll = _nll(lg, ids)
                kl = torch.nn.functional.kl_div(lg.log_softmax(-1), ref_lp, log_target=True, reduction="none").sum(-1)
                row = {**base, "scheme": scheme, "path": "fused kernels (bf16 act.)" if fused else "dequant + dense",
                       "top1_agree": (lg.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                       "ppl": math.exp(nll.mean().item()), "kl_mean": kl.mean().item(),
                       "layer_bytes": _layer_bytes(folder), "ref_layer_bytes": _layer_bytes(ref_folder)}
                row["ppl_delta"] = row["ppl"] - row["ppl_ref"]
                rows.append(row)
                print(f"  {scheme:10s} {row['path']:26s} top1 {row['top1_agree']:.3f}  ppl {row['ppl']:.3f} "
                      f"({row['ppl_delta']:+.3f})  KL {row['kl_mean']:.4f}", file=sys.stderr)
    return rows


def _dtype(folder: Path) -> str:
    return json.loads((folder / "layerrun.json").read_text())["dtype"]


def _layer_bytes(folder: Path) -> int:
    from layerrun.formats.manifest import Manifest

    return sum(f.bytes for f in Manifest.read(folder).layers)


def _synthetic(preset: str, scheme: str | None) -> Path:
    from synthetic_model import SyntheticSource

    from layerrun.formats.convert import convert
    from layerrun.formats.manifest import MANIFEST_NAME

    dst = WORK / f"synthetic-{preset}-{scheme or 'bf16'}"
    if not (dst / MANIFEST_NAME).is_file():
        convert(SyntheticSource(preset), dst, dtype="bfloat16", quantize=scheme, progress=False, force=True)
    return dst


def _decode_rate(folder: Path, tokens: int, repeat: int, **opts) -> dict:
    import layerrun

    rates, stalls = [], []
    with layerrun.load(folder, **opts) as eng:
        prompt = [1, 500, 900, 1300]
        eng.generate(prompt, max_new_tokens=2, ignore_eos=True)  # warm the page cache and the allocator
        for _ in range(repeat):
            g = eng.generate(prompt, max_new_tokens=tokens + 1, ignore_eos=True)
            s = g.stats
            rates.append(tokens / s.decode_s)  # the first token comes from prefill
            stalls.append(s.stall_s)
        mode = eng.mode
    return {"tok_s": statistics.median(rates), "runs": [round(r, 3) for r in rates], "mode": mode}


def cmd_speed(a) -> list[dict]:
    if a.threads:
        torch.set_num_threads(a.threads)
    schemes = [None if s == "bf16" else s for s in a.schemes.split(",")]
    folders = {s: _synthetic(a.preset, s) for s in schemes}
    configs = [
        ("stream 200MB/s", dict(mode="stream", throttle="200MB/s", prefetch=2)),
        ("stream", dict(mode="stream", prefetch=2)),
        ("full", dict(mode="full")),
    ]
    rows = []
    for label, opts in configs:
        base = None
        # Interleave the schemes round by round so that load changes hit all of them alike.
        per = {s: [] for s in schemes}
        for _ in range(a.rounds):
            for s in schemes:
                per[s].append(_decode_rate(folders[s], a.tokens, 1, **opts)["tok_s"])
        for s in schemes:
            r = statistics.median(per[s])
            base = base or r
            row = {"config": label, "scheme": s or "bf16", "tok_s": r, "threads": torch.get_num_threads(), "runs": [round(x, 3) for x in per[s]],
                   "vs_bf16": r / base, "layer_bytes": _layer_bytes(folders[s])}
            rows.append(row)
            print(f"{label:16s} {row['scheme']:5s} {r:8.3f} tok/s  x{row['vs_bf16']:.2f}  runs {row['runs']}",
                  file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("accuracy", help="top-1 agreement and perplexity against the unquantized model")
    c.add_argument("--model", action="append", help="local store name (default: smollm2-135m-instruct, gemma3-270m)")
    c.add_argument("--scheme", action="append", help=f"quantization scheme (default: {', '.join(SCHEMES)})")
    c = sub.add_parser("speed", help="decode tokens/s of bf16, int8 and int4 synthetic Llamas")
    c.add_argument("--preset", default="1gb", help="synthetic model size (tools/synthetic_model.py)")
    c.add_argument("--tokens", type=int, default=8, help="decode tokens per run")
    c.add_argument("--schemes", default="bf16,int8,int4", help="comma-separated; the first is the baseline")
    c.add_argument("--rounds", type=int, default=3, help="runs per configuration (median)")
    c.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's; 1 keeps OpenMP barriers off a busy machine)")
    for c in sub.choices.values():
        c.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    a = ap.parse_args()
    if a.cmd == "accuracy":
        a.model = a.model or ["smollm2-135m-instruct", "gemma3-270m"]
        a.scheme = a.scheme or list(SCHEMES)
        rows = cmd_accuracy(a)
    else:
        rows = cmd_speed(a)
    if a.json:
        from layerrun.bench import machine_info

        a.json.write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
