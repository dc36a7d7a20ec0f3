"""The per-layer small ops of a decode step, done in fewer calls (issue #18): each is the same arithmetic as
the longer form it replaced, bit for bit, and the KV cache's side-by-side append equals the per-tensor one."""

from __future__ import annotations

import pytest
import torch

import layerrun
from layerrun.engine.kv_cache import HostLayerKV, LayerKV, layer_add_rows, layer_select_rows
from layerrun.models import gemma
from layerrun.models.base import apply_rope, rms_norm, rope_cos_sin, rope_heads

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def llama_norm_ops(x, weight, eps):  # the Python ops rms_norm ran before
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def gemma_norm_ops(x, weight, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 7, 64), (1, 3, 5, 100), (2, 1, 6, 32)])
def test_norms_are_bit_identical(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 4).to(dtype)
    D = shape[-1]
    for wdtype in {dtype, torch.float32}:
        w = torch.randn(D, generator=g).to(wdtype)
        assert torch.equal(rms_norm(x, w, 1e-5), llama_norm_ops(x, w, 1e-5))
        assert torch.equal(gemma.rms_norm(x, w, 1e-6), gemma_norm_ops(x, w, 1e-6))
        if len(shape) == 4:  # one weight row per head (q/k norms of the joint layout)
            rows = torch.randn(shape[2], D, generator=g).to(wdtype)
            assert torch.equal(rms_norm(x, rows, 1e-6), llama_norm_ops(x, rows, 1e-6))


def test_gemma_norm_at_uses_the_resident_scale():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 32, generator=g).bfloat16()
    w = {"input_layernorm.weight": torch.randn(32, generator=g).bfloat16()}
    model = gemma.Model.__new__(gemma.Model)
    model.args = type("A", (), {"rms_norm_eps": 1e-6})()
    want = gemma_norm_ops(x, w["input_layernorm.weight"], 1e-6)
    assert torch.equal(model.norm_at(w, "input_layernorm.weight", x), want)
    scaled = dict(w, **{"input_layernorm.weight" + gemma.PLUS_ONE: 1.0 + w["input_layernorm.weight"].float()})
    assert torch.equal(model.norm_at(scaled, "input_layernorm.weight", x), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_on_joint_heads_is_bit_identical(dtype):
    g = torch.Generator().manual_seed(7)
    B, T, H, Hkv, D = 2, 5, 6, 2, 32
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    pos = torch.randint(0, 900, (B, T), generator=g)
    cos, sin = rope_cos_sin(inv, pos, dtype)
    qkv = torch.randn(B, T, H + 2 * Hkv, D, generator=g).to(dtype)
    got = rope_heads(qkv[:, :, : H + Hkv], {"cos": cos, "sin": sin})  # (B, T, H + Hkv, D)
    q, k = qkv[:, :, :H].transpose(1, 2), qkv[:, :, H : H + Hkv].transpose(1, 2)  # as the layer did
    assert torch.equal(got[:, :, :H].transpose(1, 2), apply_rope(q, cos, sin))
    assert torch.equal(got[:, :, H:].transpose(1, 2), apply_rope(k, cos, sin))


def _steps(g, B, Hkv, D, lengths):
    return [torch.randn(B, T, 2 * Hkv, D, generator=g) for T in lengths]


@pytest.mark.parametrize("cls", [LayerKV, HostLayerKV])
def test_update_kv_equals_update(cls):
    """Keys and values given side by side land where two per-tensor appends put them, through growth,
    rows leaving and joining (which make k / v separate tensors until the next append joins them)."""
    g = torch.Generator().manual_seed(11)
    B, Hkv, D = 3, 2, 8
    make = (lambda: cls("cpu")) if cls is HostLayerKV else cls
    a, b = make(), make()
    for i, kv in enumerate(_steps(g, B, Hkv, D, [5, 1, 1, 300, 1, 2])):
        k, v = kv[:, :, :Hkv].transpose(1, 2), kv[:, :, Hkv:].transpose(1, 2)
        ka, va = a.update_kv(kv)
        kb, vb = b.update(k, v)
        assert torch.equal(ka, kb) and torch.equal(va, vb)
        assert a.length == b.length
        if i == 2:
            for c in (a, b):
                layer_select_rows(c, torch.tensor([0, 2]))
                layer_add_rows(c, 1)
    if cls is LayerKV:  # k and v are one buffer again: a step's append is one copy
        assert a.k.untyped_storage().data_ptr() == a.v.untyped_storage().data_ptr()


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2", "qwen3", "gemma2", "gemma3", "mixtral"])
def test_resident_fuse_leaves_the_layer_bit_identical(tiny_layered, name):
    """A layer with the family's resident extras (fused q/k/v and gate/up, Gemma's norm scales, the q/k
    norm rows) computes what it computes from the file's tensors, bit for bit, prefill and decode."""
    eng = layerrun.load(tiny_layered(name), mode="full", device="cpu", fast=False)
    m = eng.model
    g = torch.Generator().manual_seed(5)
    Hd = eng.args.hidden_size
    caches = (LayerKV(), LayerKV())
    with torch.inference_mode():
        for start, T in ((0, 6), (6, 1), (7, 1)):
            pos = torch.arange(start, start + T)[None]
            ctx = m.prepare(pos, None, start + T, eng.dtype)
            x = torch.randn(1, T, Hd, generator=g).to(eng.dtype)
            w = eng._resident[0]
            plain = m.layer(0, w, x, caches[0], ctx)
            fused = m.layer(0, m.fuse(w), x, caches[1], ctx)
            assert torch.equal(plain, fused)
            assert torch.equal(m.layer(0, w, x, None, ctx), m.layer(0, m.fuse(w), x, None, ctx))
    eng.close()
