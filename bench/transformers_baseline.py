"""Full-mode decode speed: LayerRun against transformers' own, same model, dtype and machine, one run.

Builds the Hugging Face model from a layered folder (config.json plus the layer
files' tensors renamed to transformers' names: ``layer_007.safetensors`` /
``self_attn.q_proj.weight`` -> ``model.layers.7.self_attn.q_proj.weight``,
``embed_tokens.weight`` -> ``model.embed_tokens.weight``, ``norm.weight`` ->
``model.norm.weight``, ``lm_head.weight`` stays), loads the same folder with
``layerrun.load(mode="full")``, and times greedy decoding of the same random
prompt with both, alternating runs (transformers, LayerRun, transformers, ...)
so that both see the same machine noise. Reports the medians and their ratio,
and whether the greedy tokens agree.

Decode tokens/s has the same definition on both sides: (N - 1) tokens over the
time from the first generated token (end of prefill) to the last one.

    python bench/transformers_baseline.py MODEL [--dtype float32|bfloat16] [--max-new-tokens 64]
        [--prompt-tokens 16] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import layerrun  # noqa: E402
from layerrun.bench import machine_info  # noqa: E402
from layerrun.bench_generate import _prompt_ids, cpu_seconds  # noqa: E402
from layerrun.engine.engine import resolve_model_path  # noqa: E402
from layerrun.formats.manifest import Manifest  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def hf_state_dict(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The layered folder's tensors under transformers' names."""
    from safetensors.torch import load_file

    man = Manifest.read(folder)
    sd: dict[str, torch.Tensor] = {}
    for f in man.files:
        w = load_file(str(folder / f.name))
        for name, t in w.items():
            if f.kind == "layer":
                key = man.layer_prefix.format(i=f.layer) + name
            elif name == "lm_head.weight":
                key = name
            else:  # embeddings, final norm
                key = "model." + name
            sd[key] = t.to(dtype) if t.is_floating_point() else t
    return sd


def load_transformers(folder: Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    cfg_dict = json.loads((folder / "config.json").read_text())
    cfg = AutoConfig.for_model(**cfg_dict)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    sd = hf_state_dict(folder, dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    tied = {"lm_head.weight"} if cfg_dict.get("tie_word_embeddings") else set()
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise SystemExit(f"weights do not match the transformers model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    model.eval()
    return model


class _Stamps:
    """A generate() streamer that records when each token arrives."""

    def __init__(self):
        self.t: list[float] = []

    def put(self, value):
        self.t.append(time.perf_counter())

    def end(self):
        pass


def time_transformers(model, ids: list[int], n: int) -> tuple[float, list[int]]:
    st = _Stamps()
    inp = torch.tensor([ids])
    with torch.inference_mode():
        # past end-of-sequence with an eos id no token has (min_new_tokens would mask the eos logit instead)
        cfg = copy.deepcopy(model.generation_config)
        cfg.update(eos_token_id=model.config.vocab_size, max_new_tokens=n, do_sample=False, temperature=None,
                   top_p=None, top_k=None, pad_token_id=0)
        out = model.generate(inp, generation_config=cfg, attention_mask=torch.ones_like(inp), streamer=st)
    new = out[0, len(ids):].tolist()
    # put() #0 is the prompt, #1 the first generated token (after prefill), #n the last one.
    decode_s = st.t[-1] - st.t[1]
    return (n - 1) / decode_s, new


def time_layerrun(engine, ids: list[int], n: int) -> tuple[float, list[int]]:
    g = engine.generate(ids, max_new_tokens=n, ignore_eos=True)
    return g.stats.decode_tokens_per_s, g.token_ids


def run(path, dtype: str = "float32", max_new_tokens: int = 64, prompt_tokens: int = 16, repeat: int = 3,
        log=lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    folder = resolve_model_path(path)
    machine = machine_info()  # at the start: the load average before this run
    tdtype = DTYPES[dtype]
    cfg = json.loads((folder / "config.json").read_text())
    ids = _prompt_ids(int(cfg["vocab_size"]), prompt_tokens, 0)
    t0 = time.perf_counter()
    hf = load_transformers(folder, tdtype)
    hf_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    eng = layerrun.load(folder, mode="full", dtype=dtype, context=prompt_tokens + max_new_tokens + 1, device="cpu")
    lr_load = time.perf_counter() - t0
    gc.collect()
    log(f"{folder}: {dtype}, {prompt_tokens} prompt + {max_new_tokens} new tokens, {repeat} alternating runs; "
        f"loaded transformers in {hf_load:.1f} s, layerrun ({eng.mode}) in {lr_load:.1f} s")
    # Warm-up both (first-call allocations, oneDNN kernel selection).
    time_transformers(hf, ids, 2)
    time_layerrun(eng, ids, 2)
    hf_runs, lr_runs, pair_ratios, hf_util, lr_util = [], [], [], [], []
    hf_tokens = lr_tokens = None
    for r in range(repeat):
        c0, t0 = cpu_seconds(), time.perf_counter()
        h, hf_tokens = time_transformers(hf, ids, max_new_tokens)
        c1, t1 = cpu_seconds(), time.perf_counter()
        lr, lr_tokens = time_layerrun(eng, ids, max_new_tokens)
        c2, t2 = cpu_seconds(), time.perf_counter()
        hf_runs.append(h)
        lr_runs.append(lr)
        pair_ratios.append(lr / h)
        hf_util.append((c1 - c0) / (t1 - t0))
        lr_util.append((c2 - c1) / (t2 - t1))
        log(f"  run {r + 1}: transformers {h:.2f} tok/s (cpu util {hf_util[-1]:.2f}), layerrun full {lr:.2f} tok/s "
            f"(cpu util {lr_util[-1]:.2f}), ratio {lr / h:.3f}")
    eng.close()
    agree = sum(a == b for a, b in zip(hf_tokens, lr_tokens, strict=False))
    res = {
        "bench": "transformers_baseline",
        "model": str(folder),
        "dtype": dtype,
        "max_new_tokens": max_new_tokens,
        "prompt_tokens": prompt_tokens,
        "repeat": repeat,
        "machine": machine,
        "transformers_version": __import__("transformers").__version__,
        "attn_implementation": getattr(hf.config, "_attn_implementation", None),
        "transformers_tok_s": round(statistics.median(hf_runs), 3),
        "layerrun_full_tok_s": round(statistics.median(lr_runs), 3),
        "ratio_of_medians": round(statistics.median(lr_runs) / statistics.median(hf_runs), 3),
        "median_pair_ratio": round(statistics.median(pair_ratios), 3),
        "transformers_runs": [round(x, 3) for x in hf_runs],
        "layerrun_runs": [round(x, 3) for x in lr_runs],
        "pair_ratios": [round(x, 3) for x in pair_ratios],
        # CPU seconds per wall second of each run (2.0 = both cores): low values mean other processes took the cores.
        "transformers_cpu_util": [round(x, 2) for x in hf_util],
        "layerrun_cpu_util": [round(x, 2) for x in lr_util],
        "load_avg_end": [round(x, 2) for x in __import__("os").getloadavg()],
        "greedy_tokens_agree": f"{agree}/{len(hf_tokens)}",
        "greedy_first_divergence": next((i for i, (a, b) in enumerate(zip(hf_tokens, lr_tokens, strict=False))
                                         if a != b), None),
    }
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="layered model folder (a Llama-family model) or local model name")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype for both runtimes")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per run (default: %(default)s)")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="random prompt length (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs per runtime; medians reported")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args()
    res = run(a.model, a.dtype, a.max_new_tokens, a.prompt_tokens, a.repeat)
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"{res['model']} {res['dtype']}: transformers {res['transformers_tok_s']:.2f} tok/s, "
              f"layerrun full {res['layerrun_full_tok_s']:.2f} tok/s, ratio {res['ratio_of_medians']:.3f} "
              f"(median of per-run ratios {res['median_pair_ratio']:.3f}); greedy tokens agree "
              f"{res['greedy_tokens_agree']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
