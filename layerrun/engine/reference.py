"""`layerrun validate PATH --reference`: compare LayerRun with transformers on the same weights.

transformers is the trusted runtime (a test/validation dependency, never a
runtime one): it is imported here only when a reference check is asked for.
The check covers the tokenizer (ids on a fixed set of strings and the chat
template), the logits of a prompt (max abs diff, top-5 agreement), every
layer's output hidden state (so a divergence is located at the first layer
where it appears), and N greedy tokens. Greedy runs may diverge only where
both runtimes' choices are within each other's top-5 (vLLM's
``check_logprobs_close`` rule), which matters in bf16.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from layerrun.errors import LayerRunError

TOKENIZER_STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and   multiple   spaces\tand\ttabs\n\nnewlines  ",
    "Digits: 0 1 12 123 1234 3.14159 -42 1e10",
    "Unicode: café naïve 日本語 中文 한국어 Ελληνικά русский emoji 🙂🚀",
    "Code: def f(x):\n    return x ** 2  # square",
    "",
]
PROMPT = "The capital of France is Paris. The capital of Germany is"
TOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    value: float | None = None


@dataclass
class ReferenceReport:
    checks: list[Check] = field(default_factory=list)
    first_divergent_layer: int | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name, ok, detail, value=None):
        self.checks.append(Check(name, bool(ok), detail, value))

    def to_dict(self) -> dict:
        return {"ok": self.ok, "first_divergent_layer": self.first_divergent_layer,
                "checks": [asdict(c) for c in self.checks]}


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise LayerRunError(
            "--reference needs transformers (the reference runtime): pip install transformers"
        ) from None
    return transformers


def load_reference_model(engine, dtype: torch.dtype):
    """A transformers model with the layered folder's weights; every key accounted for."""
    transformers = _require_transformers()
    from layerrun.io.reader import FileReader

    folder: Path = engine.path
    cfg = transformers.AutoConfig.from_pretrained(folder)
    kw = {}
    if getattr(engine.model, "moe", False):
        kw["experts_implementation"] = "eager"  # the plain per-expert loop; grouped_mm rounds differently in bf16
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype, **kw)
    reader = FileReader(folder, "pread")
    m = engine.manifest
    sd = {}
    for entry in m.files:
        w, _ = reader.read(entry)
        if m.quantization:
            from layerrun.formats.quant import dequantize_weights

            w = dequantize_weights(w, m.quantization, dtype)
        for name, t in w.items():
            if entry.layer is not None:
                full = m.layer_prefix.format(i=entry.layer) + name
            elif name.startswith("lm_head"):
                full = name
            else:
                full = m.layer_prefix.split("layers.")[0] + name
            sd[full] = t.to(dtype).clone()
    sd = _fuse_experts(sd, set(model.state_dict()))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if m.tie_word_embeddings:
        model.tie_weights()
        missing = [k for k in missing if not k.startswith("lm_head")]
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise LayerRunError(
            f"cannot build the transformers reference: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    return model.eval()


_EXPERT_LAYOUTS = [
    # (per-expert tensors as stored: prefix, expert, kind) -> transformers 5's fused layout
    (re.compile(r"^(.*)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$"), ("w1", "w3", "w2")),  # Mixtral
    (re.compile(r"^(.*)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"),
     ("gate_proj", "up_proj", "down_proj")),  # Qwen 3 MoE
]


def _fuse_experts(sd: dict, want: set[str]) -> dict:
    """Per-expert checkpoint tensors (as stored: ``block_sparse_moe.experts.J.w1/w2/w3`` or
    ``mlp.experts.J.gate_proj/up_proj/down_proj``) in the layout transformers 5 builds when its model
    has one (``mlp.experts.gate_up_proj`` (E, 2I, H), ``mlp.experts.down_proj`` (E, H, I))."""
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    kinds: dict[str, tuple[str, str, str]] = {}
    out = {}
    for k, v in sd.items():
        for pat, names in _EXPERT_LAYOUTS:
            m = pat.match(k)
            if m and f"{m.group(1)}.mlp.experts.gate_up_proj" in want:
                experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = v
                kinds[m.group(1)] = names
                break
        else:
            if ".block_sparse_moe.gate." in k and k.replace(".block_sparse_moe.", ".mlp.") in want:
                out[k.replace(".block_sparse_moe.", ".mlp.")] = v
            else:
                out[k] = v
    for prefix, per in experts.items():
        gate, up, down = kinds[prefix]
        ids = sorted(per)
        out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([per[j][gate], per[j][up]]) for j in ids])
        out[f"{prefix}.mlp.experts.down_proj"] = torch.stack([per[j][down] for j in ids])
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-6))


def compare(engine, n_tokens: int = 16, prompt: str = PROMPT, log=lambda s: None) -> ReferenceReport:
    transformers = _require_transformers()
    rep = ReferenceReport()
    dtype = engine.dtype
    dname = str(dtype).replace("torch.", "")
    tol = TOL.get(dname, 1e-4)

    # ---- tokenizer ----
    ids = None
    if engine.has_tokenizer:
        log("tokenizer")
        # The tokenizer file itself, as transformers' fast tokenizer runs it (AutoTokenizer in
        # transformers 5 may rebuild the pre-tokenizer from the model_type's class instead).
        cfg = engine.tokenizer.config
        specials = {k: v for k, v in cfg.items() if k in ("bos_token", "eos_token", "unk_token", "pad_token") and v}
        ref_tok = transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(engine.path / "tokenizer.json"), chat_template=engine.tokenizer.chat_template, **specials
        )
        bad = []
        for s in TOKENIZER_STRINGS:
            if engine.tokenizer.encode(s) != ref_tok(s)["input_ids"]:
                bad.append(repr(s[:30]))
        rep.add("tokenizer ids", not bad, f"{len(TOKENIZER_STRINGS) - len(bad)}/{len(TOKENIZER_STRINGS)} strings equal"
                + (f"; differ: {', '.join(bad)}" if bad else ""))
        if engine.tokenizer.chat_template:
            msgs = [{"role": "user", "content": "Why is the sky blue? Answer in 3 words."}]
            want = ref_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
            got = engine.encode_prompt(msgs)
            rep.add("chat template", list(want) == got, f"{len(got)} ids" + ("" if list(want) == got else " (differ)"))
        ids = engine.encode_prompt(prompt, chat=False)
    if not ids:
        ids = list(range(1, min(engine.args.vocab_size, 20)))

    # ---- logits and hidden states ----
    log("building the transformers model")
    ref = load_reference_model(engine, dtype)
    x = torch.tensor([ids])
    log("forward passes")
    with torch.no_grad():
        out = ref(x, output_hidden_states=True)
    ours_h, ours_logits = engine.hidden_states(x)
    ref_logits = out.logits.float()
    L = engine.args.num_hidden_layers
    # transformers: hidden_states[i] is the input of layer i; the last entry is after the final norm.
    for i in range(L):
        r = _rel(ours_h[i], out.hidden_states[i].float())
        name = "embeddings" if i == 0 else f"layer {i - 1} output"
        ok = r <= tol
        if not ok and rep.first_divergent_layer is None:
            rep.first_divergent_layer = max(i - 1, 0)
        rep.checks.append(Check(f"hidden: {name}", ok, f"max rel diff {r:.2e}", r))
    d = float((ours_logits - ref_logits).abs().max())
    r = _rel(ours_logits, ref_logits)
    rep.add("logits", r <= tol, f"max abs diff {d:.2e} (rel {r:.2e}, tolerance {tol:g})", d)
    top_ours = ours_logits[0, -1].topk(5).indices.tolist()
    top_ref = ref_logits[0, -1].topk(5).indices.tolist()
    rep.add("top-5 (last position)", top_ours[0] == top_ref[0] and set(top_ours) == set(top_ref),
            f"ours {top_ours}, transformers {top_ref}")

    # ---- greedy tokens ----
    log(f"{n_tokens} greedy tokens")
    ours = engine.generate(ids, max_new_tokens=n_tokens, ignore_eos=True).token_ids
    with torch.no_grad():
        # Past end-of-sequence as ours (ignore_eos): an eos id no token has. min_new_tokens would mask the eos
        # logit instead, and where eos is the argmax transformers would pick the runner-up: a false divergence.
        cfg = copy.deepcopy(ref.generation_config)
        cfg.update(eos_token_id=int(ref_logits.shape[-1]), max_new_tokens=n_tokens, do_sample=False)
        theirs = ref.generate(x, generation_config=cfg)[0, len(ids):].tolist()
    if ours == theirs:
        rep.add(f"greedy {n_tokens} tokens", True, "identical")
    else:
        j = next(k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        prefix = torch.tensor([ids + ours[:j]])
        with torch.no_grad():
            rl = ref(prefix).logits[0, -1].float()
        ol = engine.logits(prefix)[0, -1]
        close = ours[j] in rl.topk(5).indices.tolist() and theirs[j] in ol.topk(5).indices.tolist()
        rep.add(f"greedy {n_tokens} tokens", close and dname != "float32",
                f"diverge at step {j}: ours {ours[j]}, transformers {theirs[j]}; "
                + ("each within the other's top-5" if close else "NOT within each other's top-5"))
    return rep
