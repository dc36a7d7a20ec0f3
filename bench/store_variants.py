"""The store's default variants of the catalogue models against their float32 dequantization.

    LAYERRUN_HOME=/tmp/variants python bench/store_variants.py [--model NAME ...] [--variant int4 ...] [--json F]

For each catalogue model: the float32 folder (the exact dequantization of the
GGUF; taken from the shared store ``~/.cache/layerrun`` when it has one, else
converted here) against the variants the store makes (its default one, and any
``--variant``), converted into ``$LAYERRUN_HOME`` from the same GGUF:

- accuracy: one teacher-forced pass over the fixed English text of
  ``bench/quant_accuracy.py`` (top-1 agreement, perplexities, mean KL), and the
  leading greedy tokens (of 32, from a chat prompt) that equal float32's;
- size: bytes on disk and layer bytes;
- speed: decode tokens/s, 16 tokens after the chat prompt, stream mode at a
  200 MB/s throttle (read-bound: the slow-SSD case), stream mode from the page
  cache, and full mode; median of ``--rounds`` runs, variants interleaved.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quant_accuracy import TEXT  # noqa: E402

SHARED = Path.home() / ".cache" / "layerrun"
CHAT = [{"role": "user", "content": "Why is the sky blue?"}]


def reference(name: str) -> Path:
    """The float32 folder: the shared store's when it has one (read only), else converted here."""
    from layerrun.formats import store

    old = os.environ.get("LAYERRUN_HOME")
    os.environ["LAYERRUN_HOME"] = str(SHARED)
    try:
        found = store.resolve_name(f"{name}@float32")
    finally:
        os.environ["LAYERRUN_HOME"] = old or ""
        if old is None:
            del os.environ["LAYERRUN_HOME"]
    return found or store.pull(name, dtype="float32", progress=False, log=None)


def _ids(folder: Path, chat: bool) -> list[int]:
    from layerrun.engine.tokenizer import Tokenizer

    tok = Tokenizer(folder)
    return tok.encode_chat(CHAT) if chat and tok.chat_template else tok.encode(TEXT)


def accuracy(ref: Path, var: Path) -> dict:
    import layerrun

    ids = torch.tensor([_ids(ref, chat=False)])
    with layerrun.load(ref, mode="full") as e:
        lr = e.logits(ids)[0].float()
        chat_ids = e.encode_prompt(CHAT) if e.has_chat_template else ids[0, :16].tolist()
        g_ref = e.generate(chat_ids, max_new_tokens=32, ignore_eos=True).token_ids
    with layerrun.load(var, mode="full") as e:
        lv = e.logits(ids)[0].float()
        g_var = e.generate(chat_ids, max_new_tokens=32, ignore_eos=True).token_ids
    nll = torch.nn.functional.cross_entropy
    same = next((i for i, (a, b) in enumerate(zip(g_ref, g_var)) if a != b), len(g_ref))
    kl = torch.nn.functional.kl_div(lv.log_softmax(-1), lr.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return {"tokens": ids.shape[1], "top1_agree": (lv.argmax(-1) == lr.argmax(-1)).float().mean().item(),
            "ppl_fp32": math.exp(nll(lr[:-1], ids[0, 1:]).item()), "ppl": math.exp(nll(lv[:-1], ids[0, 1:]).item()),
            "kl_mean": kl.mean().item(), "greedy_same_prefix": same, "greedy_of": len(g_ref)}


def decode_rate(folder: Path, **opts) -> float:
    import layerrun

    with layerrun.load(folder, **opts) as e:
        ids = e.encode_prompt(CHAT) if e.has_chat_template else [1, 2, 3, 4]
        e.generate(ids, max_new_tokens=2, ignore_eos=True)  # warm up
        g = e.generate(ids, max_new_tokens=17, ignore_eos=True)
    return g.stats.decode_tokens_per_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="catalogue name (default: every catalogue model)")
    ap.add_argument("--variant", action="append", default=[], help="also this variant (int4, int8, bfloat16)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    from layerrun.formats import store
    from layerrun.formats.manifest import Manifest

    if Path(os.environ.get("LAYERRUN_HOME", str(SHARED))).resolve() == SHARED.resolve():
        raise SystemExit("set LAYERRUN_HOME to a scratch folder: the variants are converted there")
    rows = []
    for name in a.model or list(store.KNOWN):
        ref = reference(name)
        variants = list(dict.fromkeys([store.KNOWN[name].variant, *a.variant]))
        folders = {v: store.pull(name, dtype=v, progress=False, log=None) for v in variants}
        sizes = {"float32": store.folder_bytes(ref), **{v: store.folder_bytes(f) for v, f in folders.items()}}
        layer_bytes = {"float32": sum(f.bytes for f in Manifest.read(ref).layers),
                       **{v: sum(f.bytes for f in Manifest.read(f).layers) for v, f in folders.items()}}
        for v, f in folders.items():
            acc = accuracy(ref, f)
            row = {"model": name, "variant": v, "default": v == store.KNOWN[name].variant, **acc,
                   "bytes": sizes[v], "bytes_fp32": sizes["float32"], "layer_bytes": layer_bytes[v],
                   "layer_bytes_fp32": layer_bytes["float32"]}
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
        if a.no_speed:
            continue
        configs = {"stream 200MB/s": dict(mode="stream", throttle="200MB/s", prefetch=2, reader="pread"),
                   "stream (page cache)": dict(mode="stream", prefetch=2), "full": dict(mode="full")}
        for label, opts in configs.items():
            runs: dict[str, list[float]] = {"float32": [], **{v: [] for v in folders}}
            for _ in range(a.rounds):  # interleaved, so that load changes hit every variant alike
                runs["float32"].append(decode_rate(ref, **opts))
                for v, f in folders.items():
                    runs[v].append(decode_rate(f, **opts))
            base = statistics.median(runs["float32"])
            for v, r in runs.items():
                med = statistics.median(r)
                row = {"model": name, "config": label, "variant": v, "tok_s": med, "vs_fp32": med / base,
                       "runs": [round(x, 3) for x in r], "load": os.getloadavg()}
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
