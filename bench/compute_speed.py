"""Compute speed, side by side in one process: LayerRun against llama.cpp and transformers.

Contenders (each a name for --contenders), run in turn within every round so that all see the
same machine noise; rounds repeat and medians, spreads and per-round ratios are reported:

- ``layerrun``: ``layerrun.load(MODEL, mode=--mode, dtype, threads)`` (the default, fast path);
- ``layerrun-plain``: the same with ``fast=False`` (plain ``F.linear``, no fused / packed weights);
- ``layerrun-stream``: warm-cache stream mode (mmap reader, nothing resident);
- ``layerrun-onednn``: the default path with the compiled matrix-vector kernel off (``LAYERRUN_KERNEL=off``
  while it loads: oneDNN, packed resident bfloat16 weights, as before the kernel);
- ``transformers``: the Hugging Face model built from the same folder (bench/transformers_baseline.py);
- ``llamacpp``: llama.cpp through ``llama-cpp-python`` on ``--gguf FILE`` (same weights and precision:
  make it with ``python bench/compute_speed.py --make-gguf SRC.gguf OUT.gguf --type f32|bf16``, which
  dequantizes a GGUF with llama.cpp's own quantize tool). Install with
  ``CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python`` (builds llama.cpp from source).

Figures per contender: decode tok/s ((N - 1) tokens over the time from the first generated token to
the last) and prefill tok/s (prompt tokens over the time to the first token). Threads: ``--threads``
sets torch's (process-wide) and llama.cpp's thread counts alike.

    python bench/compute_speed.py MODEL --dtype bfloat16 [--gguf FILE] [--contenders layerrun,llamacpp,transformers]
        [--threads 1] [--rounds 5] [--max-new-tokens 32] [--prompt-tokens 16] [--json]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import layerrun  # noqa: E402
from layerrun.bench import machine_info  # noqa: E402
from layerrun.bench_generate import _prompt_ids  # noqa: E402
from layerrun.engine.engine import resolve_model_path  # noqa: E402

INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python'
GGUF_TYPES = {"f32": 0, "bf16": 32}  # llama_ftype: LLAMA_FTYPE_ALL_F32, LLAMA_FTYPE_MOSTLY_BF16


def make_gguf(src: str, dst: str, kind: str) -> None:
    """Dequantize ``src`` (a GGUF) into an f32 / bf16 GGUF with llama.cpp's quantize tool."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_TYPES[kind]
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")


class LayerRunSide:
    def __init__(self, folder, dtype, threads, ctx, mode="full", fast=True, kernel=True):
        opts = dict(mode=mode, dtype=dtype, context=ctx, device="cpu", threads=threads, fast=fast)
        if mode == "stream":
            opts["reader"] = "mmap"
        if kernel:
            self.eng = layerrun.load(folder, **opts)
            return
        from layerrun.models import kernels

        before = os.environ.get("LAYERRUN_KERNEL")
        os.environ["LAYERRUN_KERNEL"] = "off"  # the weights loaded now keep torch's kernels
        kernels.kernel.cache_clear()
        try:
            self.eng = layerrun.load(folder, **opts)
        finally:
            if before is None:
                os.environ.pop("LAYERRUN_KERNEL")
            else:
                os.environ["LAYERRUN_KERNEL"] = before
            kernels.kernel.cache_clear()

    def run(self, ids, n):
        t = []
        for c in self.eng.stream(ids, max_new_tokens=n, ignore_eos=True):
            if c.token_id is not None:
                t.append((time.perf_counter(), c.token_id, time.process_time()))
        return t

    def close(self):
        self.eng.close()


class TransformersSide:
    def __init__(self, folder, dtype):
        from transformers_baseline import load_transformers

        self.model = load_transformers(folder, {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])

    def run(self, ids, n):
        stamps = []

        class S:
            def put(self, v):
                stamps.append((time.perf_counter(), v.reshape(-1)[-1].item(), time.process_time()))

            def end(self):
                pass

        inp = torch.tensor([ids])
        with torch.inference_mode():
            # n tokens past any end-of-sequence, as LayerRun's ignore_eos: the end-of-sequence id is one no token
            # has (min_new_tokens would instead mask the eos logit, and greedy would pick another token where
            # eos is the argmax)
            cfg = copy.deepcopy(self.model.generation_config)
            cfg.update(eos_token_id=self.model.config.vocab_size, max_new_tokens=n, do_sample=False, temperature=None,
                       top_p=None, top_k=None, pad_token_id=0)
            self.model.generate(inp, generation_config=cfg, attention_mask=torch.ones_like(inp), streamer=S())
        return stamps[1:]  # put #0 is the prompt

    def close(self):
        del self.model


class LlamaCppSide:
    def __init__(self, gguf, threads, ctx):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise SystemExit(f"llama-cpp-python is not installed: {INSTALL}") from None
        self.llm = Llama(model_path=str(gguf), n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, verbose=False, logits_all=False)

    def run(self, ids, n):
        self.llm.reset()
        t = []
        for tok in self.llm.generate(ids, temp=0.0, top_k=1, reset=True):
            t.append((time.perf_counter(), int(tok), time.process_time()))
            if len(t) == n:
                break
        return t

    def close(self):
        self.llm.close()


def rates(stamps, t0, prompt_tokens):
    """(decode tok/s, prefill tok/s, process CPU ms per decoded token: all threads, less sensitive to
    other processes taking the cores than wall time)."""
    times = [s[0] for s in stamps]
    n = len(times) - 1
    decode = n / (times[-1] - times[0]) if n > 0 and times[-1] > times[0] else 0.0
    prefill = prompt_tokens / (times[0] - t0)
    cpu = (stamps[-1][2] - stamps[0][2]) / n * 1e3 if n > 0 else 0.0
    return decode, prefill, cpu


def spread(xs):
    return [round(min(xs), 2), round(max(xs), 2)]


def run(model, dtype, contenders, gguf, threads, rounds, n, prompt_tokens, log):
    folder = resolve_model_path(model)
    machine = machine_info()
    cfg = json.loads((folder / "config.json").read_text())
    ids = _prompt_ids(int(cfg["vocab_size"]), prompt_tokens, 0)
    ctx = prompt_tokens + n + 8
    sides = {}
    for c in contenders:
        t0 = time.perf_counter()
        if c == "layerrun":
            sides[c] = LayerRunSide(folder, dtype, threads, ctx)
        elif c == "layerrun-plain":
            sides[c] = LayerRunSide(folder, dtype, threads, ctx, fast=False)
        elif c == "layerrun-onednn":
            sides[c] = LayerRunSide(folder, dtype, threads, ctx, kernel=False)
        elif c == "layerrun-stream":
            sides[c] = LayerRunSide(folder, dtype, threads, ctx, mode="stream")
        elif c == "transformers":
            sides[c] = TransformersSide(folder, dtype)
        elif c == "llamacpp":
            if not gguf:
                raise SystemExit("llamacpp needs --gguf FILE (see --make-gguf)")
            sides[c] = LlamaCppSide(gguf, threads, max(ctx, 64))
        else:
            raise SystemExit(f"unknown contender {c!r}")
        log(f"loaded {c} in {time.perf_counter() - t0:.1f} s")
    gc.collect()
    torch.set_num_threads(threads)
    for s in sides.values():  # warm-up: first-call allocations, kernel selection
        s.run(ids, 3)
    res = {c: {"decode": [], "prefill": [], "cpu": [], "tokens": None} for c in sides}
    loads = []
    for r in range(rounds):
        loads.append(round(os.getloadavg()[0], 2))
        line = []
        for c, s in sides.items():
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            stamps = s.run(ids, n)
            d, p, cpu = rates(stamps, t0, prompt_tokens)
            res[c]["cpu"].append(cpu)
            res[c]["decode"].append(d)
            res[c]["prefill"].append(p)
            res[c]["tokens"] = [s[1] for s in stamps]
            line.append(f"{c} {d:.1f}/{p:.0f}/{cpu:.0f}")
        log(f"round {r + 1} (load {loads[-1]}): decode tok/s / prefill tok/s / cpu ms per token: " + ", ".join(line))
    for s in sides.values():
        s.close()
    out = {"bench": "compute_speed", "model": str(folder), "dtype": dtype, "threads": threads, "rounds": rounds,
           "max_new_tokens": n, "prompt_tokens": prompt_tokens, "machine": machine, "load_1min_per_round": loads,
           "gguf": str(gguf) if gguf else None, "results": {}}
    base = res.get("layerrun")
    for c, v in res.items():
        e = {"decode_tok_s": round(statistics.median(v["decode"]), 2), "decode_spread": spread(v["decode"]),
             "prefill_tok_s": round(statistics.median(v["prefill"]), 1), "prefill_spread": spread(v["prefill"]),
             "cpu_ms_per_token": round(statistics.median(v["cpu"]), 1), "cpu_spread": spread(v["cpu"])}
        if base is not None and c != "layerrun":
            e["layerrun_decode_ratio"] = round(statistics.median(
                [a / b for a, b in zip(base["decode"], v["decode"], strict=True) if b]), 3)
            e["layerrun_prefill_ratio"] = round(statistics.median(
                [a / b for a, b in zip(base["prefill"], v["prefill"], strict=True) if b]), 3)
            e["layerrun_cpu_ratio"] = round(statistics.median(  # > 1: LayerRun needs less CPU per token
                [b / a for a, b in zip(base["cpu"], v["cpu"], strict=True) if a]), 3)
            if c != "llamacpp":  # llama.cpp's greedy pick may differ in the last bits of a tie
                same = sum(a == b for a, b in zip(base["tokens"], v["tokens"], strict=False))
                e["greedy_tokens_agree"] = f"{same}/{len(v['tokens'])}"
        out["results"][c] = e
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="layered model folder or local model name")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--contenders", default="layerrun,llamacpp,transformers")
    ap.add_argument("--gguf", default=None, help="the llama.cpp model file (same weights and precision)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--make-gguf", nargs=2, metavar=("SRC", "DST"), help="dequantize a GGUF with llama.cpp, then exit")
    ap.add_argument("--type", default="bf16", choices=sorted(GGUF_TYPES), help="with --make-gguf: f32 or bf16")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.make_gguf:
        make_gguf(*a.make_gguf, a.type)
        return 0
    if not a.model:
        ap.error("MODEL is required")
    contenders = [c for c in a.contenders.split(",") if c]
    res = run(a.model, a.dtype, contenders, a.gguf, a.threads, a.rounds, a.max_new_tokens, a.prompt_tokens,
              lambda s: print(s, file=sys.stderr, flush=True))
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        for c, e in res["results"].items():
            print(f"{c:16s} decode {e['decode_tok_s']:7.2f} tok/s {e['decode_spread']}  prefill {e['prefill_tok_s']:8.1f} "
                  f"tok/s  cpu {e['cpu_ms_per_token']:.1f} ms/token  " + " ".join(f"{k}={v}" for k, v in e.items() if "ratio" in k or "agree" in k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
