"""Gemma 1/2/3, Qwen 3, Phi-3, Mixtral and Qwen 3 MoE (and Llama's dynamic RoPE) against transformers on tiny random models.

Each spec (tools/tiny_models.py) varies what breaks implementations: head_dim != hidden/heads,
GQA ratios 1, 3 and 4, tied and untied embeddings, odd vocab sizes, sliding windows (5-8) much
shorter than the sequences, several sliding patterns, RoPE variants. Norms and biases are
non-trivial (tiny_models.build). Windows, caps and RoPE scalings are each shown to change the
logits, so the comparisons would catch them being ignored.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import layerrun
from layerrun.errors import UnsupportedModelError
from layerrun.models import build_model, get_family, supported_model_types

CASES = [
    "gemma",
    "gemma2",
    "gemma2_layer_types",
    "gemma3",
    "gemma3_layer_types",
    "qwen3",
    "qwen3_sliding",
    "phi3",
    "phi3_partial",
    "mixtral",
    "qwen3_moe",
    "qwen3_moe_unnorm",
]
WINDOWED = ["gemma2", "gemma2_layer_types", "gemma3", "gemma3_layer_types", "qwen3_sliding", "phi3_partial", "mixtral"]
FP32_TOL = 1e-4
BF16_TOL = 2e-2  # measured: 0 (same kernels in the same order as transformers), but not promised


def reference(path, dtype=torch.float32):
    kw = {}
    cfg = json.loads((path / "config.json").read_text())
    if "num_local_experts" in cfg or "num_experts" in cfg:
        kw["experts_implementation"] = "eager"  # the per-expert loop; grouped_mm (the default) rounds differently in bf16
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).eval()


def random_ids(vocab: int, n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, n), generator=g)


def vocab_of(path) -> int:
    return json.loads((path / "config.json").read_text())["vocab_size"]


def with_config(eng, **changes):
    """The same weights under a changed config (to show that a feature changes the logits)."""
    eng.model = build_model({**eng.config, **changes})
    return eng


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers_fp32(name, tiny_hf, tiny_layered):
    ref = reference(tiny_hf(name))
    eng = layerrun.load(tiny_layered(name))
    V = vocab_of(tiny_hf(name))
    ids = random_ids(V, 40, batch=2)
    with torch.no_grad():
        want = ref(ids).logits
    got = eng.logits(ids)
    assert got.shape == (2, 40, V)
    assert (got - want).abs().max().item() < FP32_TOL
    assert want.abs().max().item() > 0.5  # the comparison is not between near-zero tensors


def greedy_reference(ref, ids: torch.Tensor, n: int) -> list[int]:
    """transformers' greedy continuation with EOS disabled (the engine runs with ignore_eos)."""
    ref.generation_config.eos_token_id = None  # else min_new_tokens bans EOS where the engine may pick it
    with torch.no_grad():
        out = ref.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


# Phi-3's prompt starts past original_max_position_embeddings (24): see test_phi3_longrope_switch_mid_generation.
PROMPT_LEN = {"phi3": 26}


@pytest.mark.parametrize("name", CASES)
def test_greedy_tokens_with_kv_cache_match(name, tiny_hf, tiny_layered):
    """A 20-token prompt + 20 decoded: decode steps run past every sliding window."""
    ref = reference(tiny_hf(name))
    eng = layerrun.load(tiny_layered(name))
    n = PROMPT_LEN.get(name, 20)
    ids = random_ids(vocab_of(tiny_hf(name)), n, seed=1)
    want = greedy_reference(ref, ids, 20)
    got = eng.generate(ids[0].tolist(), max_new_tokens=20, ignore_eos=True)
    assert got.token_ids == want
    assert len(set(want)) > 2


def test_phi3_longrope_switch_mid_generation(tiny_hf, tiny_layered):
    """transformers drops its KV cache and re-runs the whole sequence with the long factors at the first
    step past original_max_position_embeddings (Phi3ForCausalLM.prepare_inputs_for_generation); the engine
    does the same (a 20-token prompt crosses 24 at the 5th generated token)."""
    ref = reference(tiny_hf("phi3"))
    eng = layerrun.load(tiny_layered("phi3"))
    ids = random_ids(vocab_of(tiny_hf("phi3")), 20, seed=1)
    assert eng.generate(ids[0].tolist(), max_new_tokens=20, ignore_eos=True).token_ids == greedy_reference(ref, ids, 20)


@pytest.mark.parametrize("name", CASES)
def test_batch_of_two_left_padded(name, tiny_hf, tiny_layered):
    ref = reference(tiny_hf(name))
    eng = layerrun.load(tiny_layered(name))
    ids = random_ids(vocab_of(tiny_hf(name)), 36, batch=2, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0  # second row is 23 tokens, left-padded
    ids[1, :13] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, position_ids=positions).logits
    got = eng.logits(ids, attention_mask=mask)
    valid = mask.bool()
    assert torch.isfinite(got[valid]).all()
    if name == "phi3":
        # transformers picks LongRoPE's long or short factors by the batch's furthest position; rows are
        # independent sequences here, so the 23-token row (short factors) is compared with itself alone.
        with torch.no_grad():
            want[1:, 13:] = ref(ids[1:, 13:]).logits
    assert (got[valid] - want[valid]).abs().max().item() < FP32_TOL
    alone = eng.logits(ids[1:, 13:])  # the padded row equals running it alone
    assert (got[1, 13:] - alone[0]).abs().max().item() < FP32_TOL


@pytest.mark.parametrize("name", WINDOWED)
def test_sliding_window_matters(name, tiny_layered):
    """Dropping the window changes logits past it, and nothing inside the first window."""
    eng = layerrun.load(tiny_layered(name))
    window = eng.args.sliding_window
    assert window is not None and window <= 8
    ids = random_ids(eng.args.vocab_size, 40, seed=3)
    windowed = eng.logits(ids)
    unwindowed = with_config(eng, sliding_window=10_000).logits(ids)
    assert (windowed[0, 2 * window :] - unwindowed[0, 2 * window :]).abs().max().item() > 1e-2
    assert (windowed[0, :window] - unwindowed[0, :window]).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "qwen3_sliding"])
def test_sliding_pattern_matters(name, tiny_layered):
    """Sliding only some layers differs from sliding all of them (so the per-layer choice is tested)."""
    eng = layerrun.load(tiny_layered(name))
    types = eng.args.layer_types
    assert "full_attention" in types and "sliding_attention" in types
    ids = random_ids(eng.args.vocab_size, 40, seed=4)
    mixed = eng.logits(ids)
    all_sliding = with_config(eng, layer_types=["sliding_attention"] * len(types)).logits(ids)
    assert (mixed - all_sliding).abs().max().item() > 1e-2


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("gemma2", {"attn_logit_softcapping": None}),
        ("gemma2", {"final_logit_softcapping": None}),
        ("gemma3", {"final_logit_softcapping": None}),
        (
            "gemma3",
            {"rope_parameters": None, "rope_scaling": None, "rope_theta": 100000.0, "rope_local_base_freq": 5000.0},
        ),
        (
            "gemma3",
            {
                "rope_parameters": None,
                "rope_scaling": {"rope_type": "linear", "factor": 4.0},
                "rope_theta": 100000.0,
                "rope_local_base_freq": 100000.0,
            },
        ),
        ("phi3", {"rope_parameters": None, "rope_scaling": None}),
        ("phi3_partial", {"rope_parameters": None, "partial_rotary_factor": 1.0}),
    ],
)
def test_feature_changes_logits(name, changes, tiny_layered):
    """Each cap and RoPE variant the specs set changes the logits (the transformers match covers it)."""
    eng = layerrun.load(tiny_layered(name))
    ids = random_ids(eng.args.vocab_size, 40, seed=5)
    base = eng.logits(ids)
    assert (base - with_config(eng, **changes).logits(ids)).abs().max().item() > 1e-2


def test_gemma3_ignores_attn_softcap_like_transformers(tiny_layered):
    """transformers' Gemma 3 keeps attn_logit_softcapping in its config but never applies it."""
    eng = layerrun.load(tiny_layered("gemma3_layer_types"))
    assert eng.args.attn_logit_softcapping == 2.0
    ids = random_ids(eng.args.vocab_size, 20, seed=6)
    assert torch.equal(eng.logits(ids), with_config(eng, attn_logit_softcapping=None).logits(ids))


@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3", "qwen3", "phi3", "mixtral", "qwen3_moe"])
def test_bf16_close_to_transformers_bf16(name, tiny_hf, tiny_layered):
    ref = reference(tiny_hf(name), dtype=torch.bfloat16)
    eng = layerrun.load(tiny_layered(name), dtype="bfloat16")
    ids = random_ids(eng.args.vocab_size, 32, seed=7)
    with torch.no_grad():
        want = ref(ids).logits.float()
    got = eng.logits(ids)
    assert (got - want).abs().max().item() < BF16_TOL
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() > 0.9


def test_llama_dynamic_rope_matches_transformers(tiny_hf, tiny_layered):
    """max_position_embeddings 16, 40 tokens: the NTK base grows with the sequence."""
    ref = reference(tiny_hf("llama_dynamic"))
    eng = layerrun.load(tiny_layered("llama_dynamic"))
    ids = random_ids(320, 40, seed=8)
    with torch.no_grad():
        want = ref(ids).logits
    got = eng.logits(ids)
    assert (got - want).abs().max().item() < FP32_TOL
    short = eng.logits(ids[:, :16])
    plain = with_config(eng, rope_parameters=None, rope_scaling=None)
    assert (got - plain.logits(ids)).abs().max().item() > 1e-2
    assert (short - plain.logits(ids[:, :16])).abs().max().item() < 1e-6  # within max_position_embeddings: plain RoPE


def test_config_spellings_of_transformers_4():
    """Old config.json spellings build the same model as transformers 5's."""
    g3 = get_family("gemma3_text").ModelArgs
    common = dict(
        model_type="gemma3_text",
        hidden_size=64,
        num_hidden_layers=7,
        intermediate_size=128,
        num_attention_heads=4,
        vocab_size=320,
    )
    v4 = g3.from_dict(
        {
            **common,
            "rope_theta": 1e6,
            "rope_local_base_freq": 1e4,
            "sliding_window_pattern": 6,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "unknown_key": 1,
        }
    )
    v5 = g3.from_dict(
        {
            **common,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        }
    )
    for a in (v4, v5):
        assert a.layer_types == ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"]
        assert (a.rope_theta, a.rope_local_base_freq, a.rope_scaling["factor"]) == (1e6, 1e4, 8.0)
        assert a.head_dim == 256 and a.query_pre_attn_scalar == 256  # transformers' defaults
    g1 = get_family("gemma").ModelArgs.from_dict({**common, "model_type": "gemma", "hidden_act": "gelu"})
    assert g1.hidden_act == "gelu_pytorch_tanh"  # Gemma's "gelu" always meant the tanh approximation
    g2 = get_family("gemma2").ModelArgs.from_dict({**common, "model_type": "gemma2", "num_hidden_layers": 3})
    assert g2.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    p3 = get_family("phi3").ModelArgs.from_dict(
        {
            **common,
            "model_type": "phi3",
            "rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
            "partial_rotary_factor": 0.5,
        }
    )
    assert p3.rope_scaling["rope_type"] == "longrope" and p3.rotary_dim == 8
    q3 = get_family("qwen3").ModelArgs.from_dict({**common, "model_type": "qwen3", "sliding_window": 8})
    assert q3.sliding_window is None and set(q3.layer_types) == {"full_attention"}  # use_sliding_window is off
    mx = get_family("mixtral").ModelArgs
    moe = {**common, "model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2}
    m4 = mx.from_dict({**moe, "rope_theta": 1e6, "sliding_window": None, "router_aux_loss_coef": 0.02})
    m5 = mx.from_dict({**moe, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    for m in (m4, m5):
        assert (m.rope_theta, m.rope_scaling, m.sliding_window, m.num_local_experts) == (1e6, None, None, 8)


def test_unknown_model_type_lists_supported():
    with pytest.raises(UnsupportedModelError) as e:
        build_model({"model_type": "mamba"})
    msg = str(e.value)
    assert msg.startswith("model_type 'mamba' is not supported; supported: ")
    for t in ("gemma", "gemma2", "gemma3_text", "llama", "phi3", "qwen3"):
        assert t in supported_model_types()
        assert t in msg.split("supported: ", 1)[1].split(", ")


def test_phi3_longrope_switch_inside_a_batch(tiny_hf, tiny_layered):
    """Rows of a continuous batch cross original_max_position_embeddings (24) at different steps; each
    one's cache is recomputed at its own crossing, and every row equals transformers run alone."""
    ref = reference(tiny_hf("phi3"))
    eng = layerrun.load(tiny_layered("phi3"), mode="stream")
    V = vocab_of(tiny_hf("phi3"))
    prompts = [random_ids(V, n, seed=10 + n) for n in (20, 6, 23, 30)]
    outs = eng.generate_batch([p[0].tolist() for p in prompts], max_new_tokens=12, ignore_eos=True, batch_size=3)
    for p, o in zip(prompts, outs):
        assert o.token_ids == greedy_reference(ref, p, 12)
