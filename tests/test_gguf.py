"""GGUF import against transformers and gguf-py, on small files written here.

Tiny random models are written to GGUF the way llama.cpp's converter does it
(gguf-py's tensor name map, llama's q/k row permutation, Gemma's ``w + 1``
norms), then loaded both by transformers (``from_pretrained(gguf_file=...)``)
and by LayerRun's converter: logits and tokenizer ids must agree.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file

import layerrun
from layerrun.engine.tokenizer import Tokenizer
from layerrun.errors import FormatError, UnsupportedModelError
from layerrun.formats import gguf as lr_gguf
from layerrun.formats.convert import convert
from layerrun.formats.gguf import GGUFFile, GGUFSource, inspect_gguf
from layerrun.formats.manifest import MANIFEST_NAME, layer_file_name
from layerrun.formats.source import split_name
from layerrun.models import supported_model_types

STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces, trailing ones   ",
    "multiple     spaces\tand\ttabs\nnew lines\n\n\nend",
    "digits 1234567890, 3.14159 and 2024-01-01",
    "unicode: café naïve 日本語 Ελληνικά 🚀 ✓ 👩‍👩‍👧",
    "code: def f(x):\n    return x ** 2  # square",
    "<|im_start|>user\nhi there<|im_end|>",
    "",
    "a" * 40,
]
ARCH_OF = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "mixtral": "llama",
    "qwen3_moe": "qwen3moe",
}
# per-expert HF tensors, stacked into llama.cpp's fused (experts, rows, cols) tensors by write_gguf
_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.(?:block_sparse_moe|mlp)\.experts)\.(\d+)\.(\w+)\.weight$")


# ---- writing GGUF files the way llama.cpp does -------------------------------------


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf LlamaModel.permute (HF rotate-half -> GGML interleaved RoPE rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gpt2_vocab(hf_dir: Path) -> dict:
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = {**tj["model"]["vocab"], **{t["content"]: t["id"] for t in tj["added_tokens"]}}
    tokens = [None] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    special = {t["id"] for t in tj["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    tcfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    return {
        "model": "gpt2",
        "pre": "default",
        "tokens": tokens,
        "merges": merges,
        "types": [3 if i in special else 1 for i in range(len(tokens))],
        "eos": vocab["<|im_end|>"],
        "pad": vocab["<|endoftext|>"],
        "template": tcfg["chat_template"],
    }


def _spm_vocab() -> dict:
    """A small SentencePiece BPE with byte fallback, trained here."""
    import sentencepiece as spm

    text = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello world, hello there!",
        "numbers 0123456789",
        "Streaming layers from disk lets a small machine run a large model.",
    ] * 30
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=buf,
        vocab_size=330,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()

    def kind(i):
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1

    return {
        "model": "llama",
        "pre": "default",
        "tokens": [sp.id_to_piece(i) for i in range(n)],
        "scores": [sp.get_score(i) for i in range(n)],
        "types": [kind(i) for i in range(n)],
        "bos": sp.bos_id(),
        "eos": sp.eos_id(),
        "unk": sp.unk_id(),
    }


def write_gguf(
    hf_dir: Path,
    out: Path,
    qtype: Q = Q.F32,
    vocab: dict | None = None,
    raw: dict | None = None,
    arch: str | None = None,
    split_experts: bool = False,
) -> Path:
    """Write the HF folder ``hf_dir`` as a GGUF file, as llama.cpp's converter would.

    ``raw`` maps extra GGUF tensor names to a ggml type, filled with random bytes (for error cases).
    Experts are stacked into (experts, rows, cols) tensors, or with ``split_experts`` written one
    2-D tensor each (``blk.N.ffn_gate.J.weight``), as llama.cpp wrote Mixtral before March 2024.
    """
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = arch or ARCH_OF[cfg["model_type"]]
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or H // nh
    rope = cfg.get("rope_parameters") or {}
    theta = (rope.get("full_attention") or rope).get("rope_theta", cfg.get("rope_theta", 10000.0))
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(H)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    if arch == "llama":
        w.add_rope_dimension_count(hd)
    else:
        w.add_key_length(hd)
        w.add_value_length(hd)
    if arch.startswith("gemma"):
        w.add_sliding_window(cfg["sliding_window"])
    n_exp = cfg.get("num_local_experts") or cfg.get("num_experts")
    if n_exp:  # as llama.cpp's converter writes them (Mixtral: TextModel; Qwen 3 MoE: Qwen2MoeModel)
        w.add_expert_count(n_exp)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        if "moe_intermediate_size" in cfg:
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if cfg.get("norm_topk_prob") is False:  # llama.cpp writes no key: it always renormalises
            w.add_expert_weights_norm(False)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if vocab:
        w.add_tokenizer_model(vocab["model"])
        w.add_tokenizer_pre(vocab["pre"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        if "scores" in vocab:
            w.add_token_scores(vocab["scores"])
        if "merges" in vocab:
            w.add_token_merges(vocab["merges"])
        for key in ("bos", "eos", "unk", "pad"):
            if vocab.get(key) is not None:
                getattr(w, {"unk": "add_unk_token_id"}.get(key, f"add_{key}_token_id"))(vocab[key])
        if vocab["model"] == "gpt2":
            w.add_add_bos_token(False)
        if vocab.get("template"):
            w.add_chat_template(vocab["template"])

    own = ARCH_OF[cfg["model_type"]]  # tensor names as for the model's own architecture, whatever `arch` says
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == own)
    names = gguf.get_tensor_name_map(arch_enum, cfg["num_hidden_layers"])
    weights = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    experts: dict[str, dict[int, torch.Tensor]] = {}
    gnames = {}
    for name in [n for n in weights if _EXPERT_RE.match(n)]:
        stem, j, leaf = _EXPERT_RE.match(name).groups()
        if split_experts:
            gname = names.get_name(f"{stem}.{leaf}")  # blk.N.ffn_gate_exps -> blk.N.ffn_gate.J
            gnames[name] = f"{gname.removesuffix('_exps')}.{j}.weight"
        else:
            experts.setdefault(f"{stem}.{leaf}.weight", {})[int(j)] = weights.pop(name)
    for name, per in experts.items():  # llama.cpp's converters stack each layer's experts
        weights[name] = torch.stack([per[j] for j in range(len(per))])
    for name, t in sorted(weights.items()):
        stem, suffix = name.rsplit(".", 1)
        gname = gnames.get(name) or f"{names.get_name(stem)}.{suffix}"
        t = t.float()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            t = _permute(t, nh if ".q_proj." in name else nkv)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            t = t + 1.0
        a = t.numpy()
        quantize = a.ndim in (2, 3) and ".ffn_gate_inp." not in gname  # llama.cpp keeps routers in F32
        if qtype != Q.F32 and quantize and a.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, np.ascontiguousarray(a))
    for gname, qt in (raw or {}).items():
        block, nbytes = gguf.GGML_QUANT_SIZES[qt]
        data = np.random.default_rng(0).integers(0, 255, (4, 256 // block * nbytes), dtype=np.uint8)
        w.add_tensor(gname, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# Configs a GGUF file can state in full: transformers' GGUF loader leaves anything else at the class
# default (Gemma: query_pre_attn_scalar 256, local RoPE base 10000; Qwen 3: head_dim 128).
GGUF_SHAPED = {
    "gemma2": dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=8, num_hidden_layers=6),
    "gemma3_text": dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=8, num_hidden_layers=6),
    "qwen3": dict(head_dim=128, num_hidden_layers=3, tie_word_embeddings=False),
}


def build_tiny(model_type: str, out: Path, seed: int = 0) -> Path:
    """A tiny random model whose config survives a trip through GGUF metadata."""
    cfg_cls = transformers.AutoConfig.for_model(model_type).__class__
    kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=320,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        initializer_range=0.1,
        tie_word_embeddings=True,
        eos_token_id=1,
        bos_token_id=2,
        pad_token_id=0,
    )
    cfg = cfg_cls(**{**kwargs, **GGUF_SHAPED[model_type]})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gemma = model_type.startswith("gemma")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_((0.0 if gemma else 1.0) + 0.1 * torch.randn_like(p))  # Gemma norms are (1 + w)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gguf(tiny_hf, tmp_path_factory):
    """tiny_gguf(name, qtype=F32, vocab="gpt2"|"spm"|None) -> (folder, file name); cached per session."""
    cache: dict = {}

    def get(name: str, qtype: Q = Q.F32, vocab: str | None = "gpt2") -> tuple[Path, str]:
        key = (name, qtype, vocab)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"gguf_{name}")
            hf = build_tiny(name, folder / "hf") if name in GGUF_SHAPED else tiny_hf(name)
            v = _gpt2_vocab(tiny_hf("llama_gqa")) if vocab == "gpt2" else _spm_vocab() if vocab == "spm" else None
            fname = f"{name}-{qtype.name}.gguf"
            write_gguf(hf, folder / fname, qtype, v)
            cache[key] = (folder, fname)
        return cache[key]

    return get


def _needs(model_type: str) -> None:
    if model_type not in supported_model_types():
        pytest.skip(f"model_type {model_type} is not in layerrun.models yet")


# ---- tiny models against transformers --------------------------------------------------

CASES = [
    ("llama_gqa", Q.F32),
    ("llama_gqa", Q.Q8_0),
    ("llama_tied_sharded", Q.F32),
    ("qwen2", Q.F32),
    ("qwen3", Q.F32),
    ("gemma2", Q.F32),
    ("gemma3_text", Q.F32),
]


@pytest.mark.parametrize("name,qtype", CASES, ids=[f"{n}-{q.name}" for n, q in CASES])
def test_tiny_gguf_logits_match_transformers(name, qtype, tiny_gguf, tmp_path):
    _needs({"llama_gqa": "llama", "llama_tied_sharded": "llama"}.get(name, name))
    folder, fname = tiny_gguf(name, qtype)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32).eval()
    convert(folder / fname, tmp_path / "m", progress=False)
    eng = layerrun.load(tmp_path / "m")
    ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
    got = eng.logits(ids)
    assert (got - want).abs().max().item() < 1e-4
    assert want.abs().max().item() > 0.1
    # every weight as transformers loads it from the same file
    src = GGUFSource(folder / fname)
    state = ref.state_dict()
    for n in src.tensor_names():
        assert torch.equal(src.get(n).float(), state[n]), n


def test_config_matches_transformers(tiny_gguf):
    for name in ("llama_gqa", "gemma3_text"):
        folder, fname = tiny_gguf(name)
        ours = GGUFSource(folder / fname).config
        theirs = transformers.AutoConfig.from_pretrained(folder, gguf_file=fname).to_dict()
        flat_only = {"rope_theta", "rope_local_base_freq", "sliding_window_pattern"}  # transformers 4 spellings
        for k, v in ours.items():
            if k not in flat_only:
                assert theirs.get(k) == v, k


# ---- mixture of experts -----------------------------------------------------------------

# transformers' GGUF loader does not read qwen3moe.expert_feed_forward_length (it keeps Qwen3MoeConfig's
# 768, Qwen3-30B-A3B's width) nor any norm key (it sets norm_topk_prob=True, as llama.cpp computes it)
_TF_MOE_KWARGS = {
    "qwen3_moe": dict(moe_intermediate_size=48),
    "qwen3_moe_unnorm": dict(moe_intermediate_size=40, norm_topk_prob=False),
}
MOE_CASES = [("qwen3_moe", Q.F32), ("qwen3_moe", Q.Q8_0), ("qwen3_moe_unnorm", Q.F32), ("qwen3_moe_unnorm", Q.Q4_0)]


def _tf_state(ref) -> dict[str, torch.Tensor]:
    """transformers' state dict with its fused expert tensors split per expert, under the checkpoint names."""
    out = {}
    for n, t in ref.state_dict().items():
        m = re.match(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$", n)
        if not m:
            out[n] = t
            continue
        for j in range(t.shape[0]):
            if m.group(2) == "down_proj":
                out[f"{m.group(1)}.{j}.down_proj.weight"] = t[j]
            else:
                gate, up = t[j].chunk(2, dim=0)
                out[f"{m.group(1)}.{j}.gate_proj.weight"], out[f"{m.group(1)}.{j}.up_proj.weight"] = gate, up
    return out


@pytest.mark.parametrize("name,qtype", MOE_CASES, ids=[f"{n}-{q.name}" for n, q in MOE_CASES])
def test_qwen3_moe_gguf_matches_transformers(name, qtype, tiny_gguf, tmp_path):
    """Logits, every weight and greedy tokens against transformers' GGUF loader; stream mode reads routed experts."""
    _needs("qwen3_moe")
    folder, fname = tiny_gguf(name, qtype)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=fname, dtype=torch.float32, experts_implementation="eager", **_TF_MOE_KWARGS[name]
    ).eval()
    ref.generation_config.eos_token_id = None
    src = GGUFSource(folder / fname)
    cfg = src.config
    assert cfg["model_type"] == "qwen3_moe" and cfg["num_experts"] == ref.config.num_experts
    assert cfg["num_experts_per_tok"] == ref.config.num_experts_per_tok
    assert (cfg["moe_intermediate_size"], cfg["norm_topk_prob"]) == (
        ref.config.moe_intermediate_size, ref.config.norm_topk_prob)
    state = _tf_state(ref)
    assert set(src.tensor_names()) == set(state) - ({"lm_head.weight"} if cfg["tie_word_embeddings"] else set())
    for n in src.tensor_names():
        assert torch.equal(src.get(n).float(), state[n]), n
    src.close()

    convert(folder / fname, tmp_path / "m", progress=False)
    eng = layerrun.load(tmp_path / "m", mode="full")
    ids = torch.randint(3, cfg["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
    got = eng.logits(ids)
    assert (got - want).abs().max().item() < 1e-4
    assert want.abs().max().item() > 0.1

    prompt, n_new = ids[0, :5].tolist(), 12
    with torch.no_grad():
        want_ids = ref.generate(torch.tensor([prompt]), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    want_ids = want_ids[0, len(prompt):].tolist()
    assert len(set(want_ids)) > 2  # not one repeated token
    assert eng.generate(prompt, max_new_tokens=n_new, ignore_eos=True).token_ids == want_ids
    stream = layerrun.load(tmp_path / "m", mode="stream")
    g = stream.generate(prompt, max_new_tokens=n_new, ignore_eos=True)
    assert g.token_ids == want_ids
    assert 0 < g.stats.experts_read < g.stats.experts_total and g.stats.expert_bytes_skipped > 0


def test_qwen3_moe_config_matches_transformers(tiny_gguf):
    folder, fname = tiny_gguf("qwen3_moe")
    ours = GGUFSource(folder / fname).config
    theirs = transformers.AutoConfig.from_pretrained(folder, gguf_file=fname)  # attributes: num_experts is aliased
    assert ours["moe_intermediate_size"] == 48 and theirs.moe_intermediate_size == 768  # not read by transformers
    assert ours["norm_topk_prob"] is True  # no key in the file: llama.cpp and transformers renormalise
    for k, v in ours.items():
        if k not in {"rope_theta", "moe_intermediate_size"}:
            assert getattr(theirs, k, None) == v, k
    folder, fname = tiny_gguf("qwen3_moe_unnorm")  # its writer adds qwen3moe.expert_weights_norm = false
    assert GGUFSource(folder / fname).config["norm_topk_prob"] is False


@pytest.fixture(scope="module")
def mixtral_no_window(tiny_hf, tmp_path_factory):
    """The tiny Mixtral without its sliding window (llama.cpp's `llama` architecture has none), as
    (HF folder, its direct conversion at float32)."""
    hf = tmp_path_factory.mktemp("mixtral_nowin") / "hf"
    shutil.copytree(tiny_hf("mixtral"), hf)
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "sliding_window": None}))
    convert(hf, hf.parent / "direct", dtype="float32", progress=False)
    return hf, hf.parent / "direct"


def _layered_tensors(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split-experts"])
def test_mixtral_gguf_converts_like_the_hf_checkpoint(split, mixtral_no_window, tmp_path):
    """transformers' GGUF loader builds a dense Llama from a Mixtral file, so the reference is the HF
    checkpoint: converting the F32 GGUF must give the very tensors converting the checkpoint gives."""
    _needs("mixtral")
    hf, direct = mixtral_no_window
    path = write_gguf(hf, tmp_path / "mixtral.gguf", vocab=_gpt2_vocab(hf), split_experts=split)
    src = GGUFSource(path)
    cfg, want_cfg = src.config, json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == "mixtral"
    for k in ("num_local_experts", "num_experts_per_tok", "intermediate_size", "sliding_window",
              "num_key_value_heads", "tie_word_embeddings"):
        assert cfg[k] == want_cfg[k], k
    info = inspect_gguf(path)
    assert info["model_type"] == "mixtral" and info["supported"] and info["num_experts"] == 6
    assert info["num_experts_per_tok"] == 2 and info["expert_intermediate_size"] == 96
    src.close()
    convert(path, tmp_path / "m", progress=False)
    ours, theirs = _layered_tensors(tmp_path / "m"), _layered_tensors(direct)
    assert ours.keys() == theirs.keys()
    for f in ours:
        assert ours[f].keys() == theirs[f].keys(), f
        for n in ours[f]:
            assert torch.equal(ours[f][n], theirs[f][n]), (f, n)
    files = [json.loads((p / MANIFEST_NAME).read_text())["files"] for p in (tmp_path / "m", direct)]
    assert [(f["name"], f["sha256"]) for f in files[0]] == [(f["name"], f["sha256"]) for f in files[1]]  # byte for byte

    ref = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, experts_implementation="eager")
    ids = torch.randint(3, cfg["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.eval()(ids).logits
    assert (layerrun.load(tmp_path / "m", mode="full").logits(ids) - want).abs().max().item() < 1e-4
    prompt = ids[0, :4].tolist()
    want_ids = layerrun.load(direct, mode="full").generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids
    g = layerrun.load(tmp_path / "m", mode="stream").generate(prompt, max_new_tokens=12, ignore_eos=True)
    assert g.token_ids == want_ids and len(set(want_ids)) > 2
    assert 0 < g.stats.experts_read < g.stats.experts_total


def test_mixtral_q8_0_experts_are_the_quantized_checkpoint(mixtral_no_window, tmp_path):
    """Each expert slice of the Q8_0 file is the checkpoint's expert through gguf-py's quantize round trip;
    the converted model streams with routed reads and decodes as it does fully resident."""
    hf, _ = mixtral_no_window
    path = write_gguf(hf, tmp_path / "mixtral-q8.gguf", Q.Q8_0, vocab=_gpt2_vocab(hf))
    want = load_file(str(hf / "model.safetensors"))
    src = GGUFSource(path)
    assert src.header.tensors["blk.0.ffn_gate_exps.weight"].type_name == "Q8_0"
    checked = 0
    for n in src.tensor_names():
        if ".experts." in n:
            w = want[n].numpy()
            rt = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, Q.Q8_0), Q.Q8_0))
            assert torch.equal(src.get(n), rt), n
            checked += 1
        elif ".block_sparse_moe.gate." in n:
            assert torch.equal(src.get(n), want[n]), n  # routers stay F32
    assert checked == 3 * 6 * 3
    src.close()
    convert(path, tmp_path / "m", progress=False)
    prompt = list(range(5, 12))
    full = layerrun.load(tmp_path / "m", mode="full").generate(prompt, max_new_tokens=10, ignore_eos=True)
    g = layerrun.load(tmp_path / "m", mode="stream").generate(prompt, max_new_tokens=10, ignore_eos=True)
    assert g.token_ids == full.token_ids and 0 < g.stats.experts_read < g.stats.experts_total


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0, Q.F16, Q.F32], ids=lambda q: q.name)
def test_expert_slice_reads_only_its_rows(qtype, tmp_path, monkeypatch):
    """read(name, index=j) reads and dequantizes expert j's byte range alone (in row chunks), and gives
    exactly read(name)[j], in any dtype."""
    monkeypatch.setattr(lr_gguf, "_CHUNK_BYTES", 3000)
    E, R, C = 8, 40, 512
    x = np.random.default_rng(5).standard_normal((E, R, C)).astype(np.float32)
    if qtype == Q.Q4_K:
        data = _random_blocks(Q.Q4_K, E * R, C, seed=5).reshape(E, R, -1)
    elif qtype == Q.Q8_0:
        data = gguf.quants.quantize(x, Q.Q8_0)
    else:
        data = x.astype(np.float16) if qtype == Q.F16 else x
    path = _write_raw(tmp_path / "e.gguf", {"blk.0.ffn_up_exps.weight": (data, qtype if data.dtype == np.uint8 else None)})
    reads, dequantized = [], []
    real_pread, real_deq = GGUFFile._pread, gguf.quants.dequantize

    def pread(self, offset, nbytes):
        reads.append((offset, nbytes))
        return real_pread(self, offset, nbytes)

    def dequantize(raw, t):
        dequantized.append(raw.shape[0])
        return real_deq(raw, t)

    with GGUFFile(path) as f:
        info = f.header.tensors["blk.0.ffn_up_exps.weight"]
        assert info.shape == (E, R, C)
        whole = f.read(info.name)
        monkeypatch.setattr(GGUFFile, "_pread", pread)
        monkeypatch.setattr(gguf.quants, "dequantize", dequantize)
        per = info.nbytes // E
        for j in (0, 3, E - 1):
            for dtype in (None, torch.bfloat16):
                reads.clear()
                dequantized.clear()
                got = f.read(info.name, dtype, index=j)
                want = whole[j] if dtype is None else whole[j].to(dtype)
                assert got.shape == (R, C) and got.dtype == want.dtype
                assert torch.equal(_bits(got), _bits(want)), (j, dtype)
                lo, hi = info.offset + j * per, info.offset + (j + 1) * per
                assert all(lo <= o and o + n <= hi for o, n in reads), (j, reads)
                assert sum(n for _, n in reads) == per  # each byte of the slice once, nothing else
                if qtype in (Q.Q4_K, Q.Q8_0):
                    assert sum(dequantized) == R and len(dequantized) > 1  # this expert's rows, chunked
        with pytest.raises(IndexError):
            f.read(info.name, index=E)


def test_gguf_source_reads_one_expert_per_request(tiny_gguf, monkeypatch):
    """GGUFSource.get on an expert reads that expert's slice of the fused tensor and nothing more."""
    folder, fname = tiny_gguf("qwen3_moe", Q.Q8_0)
    src = GGUFSource(folder / fname)
    fused = src.header.tensors["blk.1.ffn_gate_exps.weight"]
    assert fused.type_name == "Q8_0" and len(fused.shape) == 3
    reads = []
    real = GGUFFile._pread
    monkeypatch.setattr(GGUFFile, "_pread", lambda self, o, n: reads.append((o, n)) or real(self, o, n))
    x = src.get("model.layers.1.mlp.experts.5.gate_proj.weight", torch.bfloat16)
    assert x.shape == (48, 64) and x.dtype == torch.bfloat16 and src.tensor_shape("model.layers.1.mlp.experts.5.gate_proj.weight") == (48, 64)
    per = fused.nbytes // fused.shape[0]
    assert sum(n for _, n in reads) == per and min(o for o, _ in reads) == fused.offset + 5 * per
    src.close()


def test_llama_qk_rows_are_unpermuted(tiny_hf, tiny_gguf):
    folder, fname = tiny_gguf("llama_gqa")
    want = load_file(str(tiny_hf("llama_gqa") / "model.safetensors"))
    src = GGUFSource(folder / fname)
    for n in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert torch.equal(src.get(n), want[n])
    with GGUFFile(folder / fname) as f:  # stored permuted, as llama.cpp writes it
        assert not torch.equal(f.read("blk.1.attn_q.weight"), want["model.layers.1.self_attn.q_proj.weight"])


# ---- tokenizers --------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", ["gpt2", "spm"])
def test_tokenizer_ids_match_transformers(vocab, tiny_gguf, tmp_path):
    folder, fname = tiny_gguf("llama_gqa", vocab=vocab)
    theirs = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    src = GGUFSource(folder / fname)
    src.write_aux_files(tmp_path)
    ours = Tokenizer(tmp_path)
    for s in STRINGS:
        assert ours.encode(s) == theirs(s).input_ids, s
        assert ours.decode(ours.encode(s)) == theirs.decode(theirs(s).input_ids, skip_special_tokens=True), s
    if vocab == "gpt2":  # the file's chat template comes along
        msgs = [{"role": "user", "content": "Hi! 123"}]
        want = theirs.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if hasattr(want, "keys") else want
        assert ours.encode_chat(msgs) == list(want)
        assert (tmp_path / "chat_template.jinja").is_file()
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == src.config["eos_token_id"]


def test_tokenizer_json_equals_transformers_backend(tiny_gguf, tmp_path):
    folder, fname = tiny_gguf("llama_gqa", vocab="spm")
    theirs = json.loads(transformers.AutoTokenizer.from_pretrained(folder, gguf_file=fname).backend_tokenizer.to_str())
    tok, _, _ = lr_gguf.build_tokenizer(lr_gguf.read_header(folder / fname))
    ours = json.loads(tok.to_str())
    for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "model", "added_tokens"):
        assert ours[k] == theirs[k], k


# ---- dequantization --------------------------------------------------------------------

# fp16 scale fields inside one block, by type (ggml's block structs); the rest of a block is free bits
_HALF_OFFSETS = {
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q8_0: (0,),
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}


def _random_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows * cols // block, nbytes), dtype=np.uint8)
    for off in _HALF_OFFSETS[qtype]:
        data[:, off : off + 2] = rng.uniform(-0.05, 0.05, (len(data), 1)).astype(np.float16).view(np.uint8)
    return data.reshape(rows, cols // block * nbytes)


def _write_raw(path: Path, tensors: dict[str, tuple[np.ndarray, Q | None]]) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    for name, (a, qt) in tensors.items():
        if qt is None:
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, a, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype", list(_HALF_OFFSETS), ids=lambda q: q.name)
def test_dequantize_matches_transformers_torch_kernels(qtype, tmp_path, monkeypatch):
    """gguf-py's numpy dequantizer (ours) against transformers' independent torch one, on random blocks."""
    from transformers.integrations.gguf.dequant import dequantize as tf_dequantize

    monkeypatch.setattr(lr_gguf, "_CHUNK_BYTES", 3000)  # several row chunks per tensor
    data = _random_blocks(qtype, 24, 512)
    path = _write_raw(tmp_path / "q.gguf", {"t": (data, qtype)})
    with GGUFFile(path) as f:
        got = f.read("t")
    want = tf_dequantize(torch.from_numpy(data.copy()).reshape(-1), int(qtype)).reshape(24, 512)
    assert got.dtype == torch.float32 and got.shape == (24, 512)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got.abs().max() > 0


@pytest.mark.parametrize(
    "qtype,tol",
    [(Q.Q4_0, 0.15), (Q.Q4_1, 0.12), (Q.Q5_0, 0.07), (Q.Q5_1, 0.06), (Q.Q8_0, 0.01)],
    ids=lambda x: getattr(x, "name", ""),
)
def test_quantize_round_trip(qtype, tol, tmp_path, monkeypatch):
    monkeypatch.setattr(lr_gguf, "_CHUNK_BYTES", 1000)
    x = np.random.default_rng(0).standard_normal((37, 256)).astype(np.float32)
    q = gguf.quants.quantize(x, qtype)
    path = _write_raw(tmp_path / "q.gguf", {"t": (q, qtype)})
    with GGUFFile(path) as f:
        got = f.read("t").numpy()
    np.testing.assert_array_equal(got, gguf.quants.dequantize(q, qtype))
    assert np.abs(got - x).max() / np.abs(x).max() < tol


def test_plain_float_types_keep_their_dtype(tmp_path):
    x = torch.randn(5, 64)
    bf16 = gguf.quants.quantize(x.numpy(), Q.BF16)
    path = _write_raw(tmp_path / "f.gguf", {"a": (x.numpy(), None), "b": (x.half().numpy(), None), "c": (bf16, Q.BF16)})
    with GGUFFile(path) as f:
        a, b, c = f.read("a"), f.read("b"), f.read("c")
    assert a.dtype == torch.float32 and torch.equal(a, x)
    assert b.dtype == torch.float16 and torch.equal(b, x.half())
    assert c.dtype == torch.bfloat16 and torch.equal(c, x.bfloat16())


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that NaNs compare equal (torch.equal never holds for them)."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("qtype", list(_HALF_OFFSETS), ids=lambda q: q.name)
def test_read_in_a_dtype_is_chunked_and_bit_identical(qtype, tmp_path, monkeypatch):
    """read(name, dtype), cast chunk by chunk, gives exactly read(name).to(dtype), the whole-tensor cast."""
    monkeypatch.setattr(lr_gguf, "_CHUNK_BYTES", 2000)  # several row chunks, and a short last one
    data = _random_blocks(qtype, 37, 512, seed=3)
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((37, 64)).astype(np.float32) * 1e3)
    x[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 3.0e38])  # specials and a bf16 overflow
    v = torch.randn(64)
    path = _write_raw(
        tmp_path / "q.gguf",
        {"q": (data, qtype), "f32": (x.numpy(), None), "f16": (x.clamp(-6e4, 6e4).half().numpy(), None), "v": (v.numpy(), None)},
    )
    with GGUFFile(path) as f:
        for name in ("q", "f32", "f16", "v"):
            whole = f.read(name)
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                got = f.read(name, dtype)
                assert got.dtype == dtype and got.shape == whole.shape, (name, dtype)
                assert torch.equal(_bits(got), _bits(whole.to(dtype))), (name, dtype)


def test_get_in_a_dtype_equals_get_then_cast(tiny_gguf, monkeypatch):
    """Every tensor, with the llama q/k un-permutation and the Gemma norm offset, cast by the source."""
    monkeypatch.setattr(lr_gguf, "_CHUNK_BYTES", 500)
    for name, qtype in (("llama_gqa", Q.Q8_0), ("gemma3_text", Q.Q8_0), ("gemma3_text", Q.F32), ("qwen3_moe", Q.Q8_0)):
        folder, fname = tiny_gguf(name, qtype)
        src = GGUFSource(folder / fname)
        for n in src.tensor_names():
            for dtype in (torch.bfloat16, torch.float32):
                got = src.get(n, dtype)
                assert got.dtype == dtype and torch.equal(got, src.get(n).to(dtype)), (name, n, dtype)
        src.close()


def test_bf16_conversion_asks_the_source_for_bf16(tiny_gguf, tmp_path, monkeypatch):
    """The converter passes its storage dtype to GGUFSource.get, and stores what a whole-tensor cast gives."""
    folder, fname = tiny_gguf("llama_gqa", Q.Q8_0)
    asked = []
    real_get = GGUFSource.get

    def get(self, name, dtype=None):
        asked.append(dtype)
        return real_get(self, name, dtype)

    monkeypatch.setattr(GGUFSource, "get", get)
    convert(folder / fname, tmp_path / "m", dtype="bfloat16", progress=False)
    assert asked and set(asked) == {torch.bfloat16}
    monkeypatch.undo()
    src = GGUFSource(folder / fname)
    files: dict[str, dict] = {}
    for n in src.tensor_names():
        kind, idx, short = split_name(n)
        fname = layer_file_name(idx) if idx is not None else f"{kind}.safetensors"
        stored = files.setdefault(fname, load_file(str(tmp_path / "m" / fname)))
        assert torch.equal(stored[short], src.get(n).to(torch.bfloat16)), n
    src.close()


def test_tokenizer_module_is_the_builder(tiny_gguf):
    """gguf.build_tokenizer(header), kept for older callers, is gguf_tokenizer's builder on the metadata."""
    from layerrun.formats import gguf_tokenizer

    folder, fname = tiny_gguf("llama_gqa", vocab="spm")
    h = lr_gguf.read_header(folder / fname)
    old, cfg_old, tpl_old = lr_gguf.build_tokenizer(h)
    new, cfg_new, tpl_new = gguf_tokenizer.tokenizer_from_metadata(h.metadata, fname)
    assert old.to_str() == new.to_str() and cfg_old == cfg_new and tpl_old == tpl_new
    assert cfg_new["model_max_length"] == 256
    gguf_tokenizer.check_tokenizer(h.metadata, fname)
    with pytest.raises(UnsupportedModelError, match=r"x\.gguf: GGUF tokenizer 'bert' is not supported"):
        gguf_tokenizer.check_tokenizer({**h.metadata, "tokenizer.ggml.model": "bert"}, "x.gguf")
    assert gguf_tokenizer.write_tokenizer_files({}, folder) == []


def test_tensor_dtype_reports_what_get_returns(tiny_gguf):
    for name, qtype in (("llama_gqa", Q.F32), ("llama_gqa", Q.Q8_0), ("qwen3_moe", Q.Q8_0)):
        folder, fname = tiny_gguf(name, qtype)
        src = GGUFSource(folder / fname)
        for n in src.tensor_names():
            assert src.get(n).dtype == src.tensor_dtype(n), n
            assert tuple(src.get(n).shape) == src.tensor_shape(n), n


# ---- errors ----------------------------------------------------------------------------------


def test_unsupported_architecture_is_one_clear_line(tiny_hf, tmp_path):
    path = write_gguf(tiny_hf("llama_gqa"), tmp_path / "b.gguf", arch="bloom")
    msg = "b.gguf: GGUF architecture 'bloom' is not supported; supported: gemma2, gemma3, llama, qwen2, qwen3, qwen3moe"
    with pytest.raises(UnsupportedModelError, match=msg.replace(".", r"\.")):
        convert(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    info = inspect_gguf(path)
    assert info["supported"] is False and "bloom" in info["problems"][0]


def test_unsupported_tensor_type_is_named(tiny_hf, tmp_path):
    path = write_gguf(tiny_hf("llama_gqa"), tmp_path / "q.gguf", raw={"blk.0.extra.weight": Q.Q8_1})
    with pytest.raises(UnsupportedModelError, match=r"q\.gguf: tensor type\(s\) not supported: Q8_1 \(1 tensors\)"):
        GGUFSource(path)


def test_unknown_tensor_is_named(tiny_hf, tmp_path):
    path = write_gguf(tiny_hf("llama_gqa"), tmp_path / "r.gguf", raw={"rope_freqs.weight": Q.Q8_0})
    with pytest.raises(UnsupportedModelError, match=r"RoPE frequency factors.*rope_freqs\.weight"):
        GGUFSource(path)


def test_unsupported_tokenizer_kind(tiny_hf, tmp_path):
    path = write_gguf(tiny_hf("llama_gqa"), tmp_path / "t.gguf", vocab={**_spm_vocab(), "model": "bert"})
    with pytest.raises(UnsupportedModelError, match="GGUF tokenizer 'bert' is not supported; supported: gpt2, llama"):
        GGUFSource(path)


def test_truncated_and_foreign_files(tiny_gguf, tmp_path):
    folder, fname = tiny_gguf("llama_gqa")
    data = (folder / fname).read_bytes()
    (tmp_path / "short.gguf").write_bytes(data[:-100])
    with pytest.raises(FormatError, match=r"short\.gguf: truncated GGUF file .*runs past the end"):
        convert(tmp_path / "short.gguf", tmp_path / "out", progress=False)
    (tmp_path / "head.gguf").write_bytes(data[:5000])
    with pytest.raises(FormatError, match=r"head\.gguf: truncated or corrupt GGUF header"):
        GGUFSource(tmp_path / "head.gguf")
    (tmp_path / "text.gguf").write_bytes(b"hello, this is not a model file at all")
    with pytest.raises(FormatError, match=r"text\.gguf: not a GGUF file \(starts with b'hell', expected b'GGUF'\)"):
        GGUFSource(tmp_path / "text.gguf")
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    with pytest.raises(FormatError, match="too short for a GGUF header"):
        inspect_gguf(tmp_path / "tiny.gguf")


# ---- inspect and the converted folder --------------------------------------------------------


def test_inspect_gguf(tiny_gguf):
    folder, fname = tiny_gguf("llama_gqa", Q.Q8_0)
    info = inspect_gguf(folder / fname)
    assert info["architecture"] == "llama" and info["model_type"] == "llama" and info["supported"]
    assert info["num_layers"] == 3 and info["hidden_size"] == 64 and info["vocab_size"] == 320
    assert set(info["tensor_types"]) == {"F32", "Q8_0"}
    assert sum(t["count"] for t in info["tensor_types"].values()) == info["tensor_count"]
    assert info["tensor_bytes"] < info["file_bytes"]
    assert info["tokenizer"] == "gpt2" and info["chat_template"] is True and info["tied_embeddings"] is False
    json.dumps(info)  # the CLI prints it with --json


def test_converted_folder_generates_text(tiny_gguf, tmp_path):
    folder, fname = tiny_gguf("llama_gqa")
    convert(folder / fname, tmp_path / "m", progress=False)
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "layerrun.json",
    } <= names
    g = layerrun.load(tmp_path / "m").generate("Hello", max_new_tokens=5, ignore_eos=True)
    assert len(g.token_ids) == 5 and isinstance(g.text, str)
    shutil.rmtree(tmp_path / "m")
