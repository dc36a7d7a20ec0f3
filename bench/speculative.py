"""Speculative decoding: tokens per pass and decode tokens/s with and without a draft, in one run.

    python bench/speculative.py [--target smollm2-135m-instruct] [--dtype float32]
        [--setting stream@200MB/s] [--drafts int4,int8,ngram] [--tokens 32]
        [--prompts bench/spec_prompts.jsonl] [--kinds rewrite,summary] [--json OUT]

For each draft, one engine (the target in ``--setting``: ``MODE[@THROTTLE][+READER]``, e.g.
``stream@200MB/s``, ``stream+direct`` for cold O_DIRECT reads, ``full``) generates ``--tokens``
greedy tokens for every prompt of the fixed chat set in ``bench/spec_prompts.jsonl``, once with
the draft and once without (``speculate=False``, the same engine), alternating, so each ratio
comes from back-to-back runs under the same load. Drafts: ``int4`` / ``int8`` (the target's own
GGUF converted with ``--quantize``, kept in a temporary folder), ``ngram``, or a model path.
``--repeat N`` runs the whole alternation N times (the full-mode check reports median and
spread). With ``+direct`` the streamed layers are read with O_DIRECT (the page cache is bypassed,
so every pass reads from the disk) and the files' cached pages are dropped first
(posix_fadvise DONTNEED).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import layerrun
from layerrun.formats import store
from layerrun.formats.convert import convert

HERE = Path(__file__).resolve().parent


def load_prompts(path: Path, kinds: set[str] | None) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if kinds is None or r["kind"] in kinds]


def make_target(name: str, dtype: str, work: Path) -> Path:
    """The store model as a layered folder in ``dtype`` (the store's float32 variant: its default for a
    Q4 GGUF is int4, which is not the target measured here)."""
    folder = store.pull(name, dtype="float32", progress=False, log=None)
    if dtype == "float32":
        return folder
    dst = work / f"target-{dtype}"
    if not (dst / "layerrun.json").exists():
        convert(store.fetch_gguf(name, log=None), dst, dtype=dtype, progress=False)
    return dst


def make_draft(name: str, draft: str, dtype: str, work: Path) -> str:
    if draft in ("int4", "int8"):
        dst = work / f"draft-{draft}-{dtype}"
        if not (dst / "layerrun.json").exists():
            convert(store.fetch_gguf(name, log=None), dst, dtype=dtype, quantize=draft, progress=False)
        return str(dst)
    return draft  # "ngram" or a path


def drop_cache(folder: Path) -> None:
    for f in folder.glob("layer_*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run(a) -> list[dict]:
    work = Path(a.work or tempfile.mkdtemp(prefix="layerrun-spec-"))
    work.mkdir(parents=True, exist_ok=True)
    target = make_target(a.target, a.dtype, work)
    prompts = load_prompts(Path(a.prompts), set(a.kinds.split(",")) if a.kinds else None)
    setting, _, reader = a.setting.partition("+")
    mode, _, throttle = setting.partition("@")
    rows = []
    for draft in a.drafts.split(","):
        d = make_draft(a.target, draft, a.dtype, work)
        eng = layerrun.load(target, mode=mode, throttle=throttle or None, reader=reader or "auto", draft=d,
                            draft_nodes=a.nodes, context=1024, prefetch=a.prefetch)
        eng.generate("Hello", max_new_tokens=2)  # warm up: first-call costs, and the cost estimates
        per_pass = sum(eng.manifest.layer(i).bytes for i in eng.plan.streamed) / 1e6
        print(f"# target {target} ({eng.manifest.dtype}, {eng.mode}, {len(eng.plan.streamed)} layers streamed, "
              f"{per_pass:.0f} MB a pass, reader {eng.reader_backend}); draft {d}", flush=True)
        for rep in range(a.repeat):
            for i, p in enumerate(prompts):
                order = (True, False) if (rep + i) % 2 == 0 else (False, True)
                res = {}
                for spec in order:
                    if reader == "direct":
                        drop_cache(Path(target))
                    g = eng.generate(p["prompt"], max_new_tokens=a.tokens, ignore_eos=True, speculate=spec)
                    res[spec] = g.stats
                s, b = res[True], res[False]
                row = {
                    "draft": draft, "kind": p["kind"], "prompt": i, "repeat": rep,
                    "tokens": s.generated_tokens, "tokens_per_pass": round(s.tokens_per_pass, 2),
                    "drafted": s.draft_tokens, "accepted": s.accepted_tokens,
                    "tok_s_draft": round(s.decode_tokens_per_s, 3), "tok_s_plain": round(b.decode_tokens_per_s, 3),
                    "speedup": round(s.decode_tokens_per_s / b.decode_tokens_per_s, 3) if b.decode_tokens_per_s else None,
                    "draft_s": round(s.draft_s, 3), "verify_s": round(s.verify_s, 3),
                    "read_gb": round(s.bytes_read / 1e9, 3), "read_gb_plain": round(b.bytes_read / 1e9, 3),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        print(f"# {draft}: {eng.speculator.figures()}", flush=True)
        eng.close()
    return rows


def summarize(rows: list[dict]) -> list[str]:
    out = []
    for draft in dict.fromkeys(r["draft"] for r in rows):
        rs = [r for r in rows if r["draft"] == draft]
        sp = sorted(r["speedup"] for r in rs if r["speedup"])
        tpp = statistics.median(r["tokens_per_pass"] for r in rs)
        out.append(
            f"{draft}: tokens/pass median {tpp:.2f} (min {min(r['tokens_per_pass'] for r in rs):.2f}, "
            f"max {max(r['tokens_per_pass'] for r in rs):.2f}); decode tok/s with/without median "
            f"{statistics.median(sp):.2f}x (min {sp[0]:.2f}x, max {sp[-1]:.2f}x) over {len(sp)} runs; "
            f"tok/s median {statistics.median(r['tok_s_draft'] for r in rs):.2f} vs "
            f"{statistics.median(r['tok_s_plain'] for r in rs):.2f}"
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="smollm2-135m-instruct", help="a store name (its GGUF makes the drafts)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--setting", default="stream@200MB/s", help="MODE[@THROTTLE][+READER]")
    p.add_argument("--drafts", default="int4,int8", help="int4, int8, ngram or model paths, comma-separated")
    p.add_argument("--nodes", type=int, default=None, help="--draft-nodes (default: the engine's)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prefetch", type=int, default=2, help="layers read ahead (reads continue this far while drafting)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--prompts", default=str(HERE / "spec_prompts.jsonl"))
    p.add_argument("--kinds", default=None, help="only these prompt kinds, e.g. rewrite,summary")
    p.add_argument("--work", default=None, help="folder for the converted target and drafts (kept)")
    p.add_argument("--json", default=None, help="write every row here")
    a = p.parse_args(argv)
    print(f"# {' '.join(sys.argv)}\n# load: {os.getloadavg()}", flush=True)
    t0 = time.time()
    rows = run(a)
    for line in summarize(rows):
        print("# " + line)
    print(f"# {time.time() - t0:.0f} s, load after: {os.getloadavg()}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
