"""The CPU fast path (oneDNN linear, fused and packed resident weights), the thread setting and the
inline mmap pipeline: each gives what the plain path gives."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import layerrun
from layerrun.errors import LayerRunError
from layerrun.formats.manifest import Manifest
from layerrun.io.pipeline import LayerStream
from layerrun.models.base import apply_rope, apply_rope_signed, fuse_linears, signed_sin
from layerrun.models.fast import FastLinear, available, fast_weights

needs_onednn = pytest.mark.skipif(not available(torch.float32), reason="oneDNN linear is not available")


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pack", [False, True])
def test_fast_linear_matches_f_linear(dtype, pack):
    if not available(dtype):
        pytest.skip(f"oneDNN {dtype} is not available")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 40, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype)
    fl = FastLinear(w, pack=pack)
    for shape in [(1, 1, 40), (2, 7, 40), (5, 40)]:
        x = torch.randn(*shape, generator=g).to(dtype)
        ref, got = F.linear(x, w, b), F.linear(x, fl, b)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        if dtype == torch.bfloat16:
            assert torch.allclose(got.float(), ref.float(), rtol=1e-2, atol=1e-2)
        else:
            assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
        assert torch.allclose(F.linear(x, fl), F.linear(x, w), rtol=1e-2, atol=1e-2)
    x_t = torch.randn(40, 3, generator=g).to(dtype).t()  # not contiguous
    assert torch.allclose(F.linear(x_t, fl).float(), F.linear(x_t, w).float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(TypeError):
        torch.matmul(x_t, fl)  # only F.linear is supported: never a silent wrong answer


@needs_onednn
def test_fast_weights_wraps_only_linear_weights():
    w = {"self_attn.q_proj.weight": torch.randn(8, 8), "input_layernorm.weight": torch.randn(8),
         "mlp.up_proj.weight": torch.randn(8, 8).bfloat16(), "self_attn.q_proj.bias": torch.randn(8)}
    streamed = fast_weights(w, pack=False)
    assert isinstance(streamed["self_attn.q_proj.weight"], FastLinear)
    assert streamed["input_layernorm.weight"] is w["input_layernorm.weight"]
    assert streamed["self_attn.q_proj.bias"] is w["self_attn.q_proj.bias"]
    assert streamed["mlp.up_proj.weight"] is w["mlp.up_proj.weight"]  # bf16 streamed: no reorder per read
    if available(torch.bfloat16):
        assert fast_weights(w, pack=True)["mlp.up_proj.weight"].packed


def test_fuse_linears_is_the_same_product():
    g = torch.Generator().manual_seed(1)
    parts = ("a", "b", "c")
    w = {f"{p}.weight": torch.randn(n, 16, generator=g) for p, n in zip(parts, (12, 4, 4), strict=True)}
    w.update({f"{p}.bias": torch.randn(n, generator=g) for p, n in zip(parts, (12, 4, 4), strict=True)})
    w["norm.weight"] = torch.randn(16)
    fused = fuse_linears(w, parts, ("abc.weight", "abc.bias"))
    assert set(fused) == {"abc.weight", "abc.bias", "norm.weight"}
    x = torch.randn(3, 16, generator=g)
    ref = torch.cat([F.linear(x, w[f"{p}.weight"], w[f"{p}.bias"]) for p in parts], -1)
    assert torch.equal(F.linear(x, fused["abc.weight"], fused["abc.bias"]), ref)
    mixed = dict(w, **{"b.weight": w["b.weight"].bfloat16()})
    assert fuse_linears(mixed, parts, ("abc.weight", "abc.bias")) is mixed  # dtypes differ: left alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_signed_rope_is_bit_identical(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 5, 16, generator=g).to(dtype)
    cos, sin = torch.randn(2, 1, 5, 16, generator=g).to(dtype), torch.randn(2, 1, 5, 16, generator=g).to(dtype)
    rope = {"cos": cos, "sin": sin}
    assert torch.equal(apply_rope_signed(x, cos, signed_sin(rope)), apply_rope(x, cos, sin))
    assert signed_sin(rope) is rope["sin_signed"]  # made once per step


@needs_onednn
@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_bf16", "gemma3", "phi3"])
def test_fast_engine_equals_plain(tiny_layered, name):
    """Same logits (fp32: < 1e-5; bf16 with a packed tied head: close) and the same greedy tokens."""
    path = tiny_layered(name)
    fast = layerrun.load(path, mode="full", device="cpu")
    plain = layerrun.load(path, mode="full", device="cpu", fast=False)
    ids = torch.tensor([[5, 17, 3, 42, 8, 11, 2, 30]])
    a, b = fast.logits(ids), plain.logits(ids)
    tol = 1e-5 if fast.dtype == torch.float32 else 2e-2
    assert torch.allclose(a, b, atol=tol, rtol=tol), (a - b).abs().max()
    ga = fast.generate(ids[0].tolist(), max_new_tokens=12, ignore_eos=True)
    gb = plain.generate(ids[0].tolist(), max_new_tokens=12, ignore_eos=True)
    assert ga.token_ids == gb.token_ids
    if name == "qwen2_bf16" and available(torch.bfloat16):
        assert isinstance(fast.final["lm_head.weight"], FastLinear) and fast.final["lm_head.weight"].packed
    fast.close()
    plain.close()


@needs_onednn
def test_fast_stream_equals_full(tiny_layered):
    path = tiny_layered("llama_gqa")
    ids = [5, 17, 3, 42, 8]
    full = layerrun.load(path, mode="full", device="cpu").generate(ids, max_new_tokens=10, ignore_eos=True)
    with layerrun.load(path, mode="stream", reader="mmap", device="cpu") as eng:
        assert eng._stream.inline and not eng._stream.threaded  # no pipeline thread with mmap on CPU
        streamed = eng.generate(ids, max_new_tokens=10, ignore_eos=True)
        assert streamed.token_ids == full.token_ids
        assert streamed.stats.streamed_layers == eng.args.num_hidden_layers


def test_inline_mmap_stream_order_and_cache_probe(tiny_layered):
    path = tiny_layered("llama_gqa")
    man = Manifest.read(path)
    entries = [man.layer(i) for i in range(man.num_layers)]
    before = threading.active_count()
    names_before = {t.name for t in threading.enumerate()}
    s = LayerStream(path, entries, depth=2, backend="mmap")
    try:
        assert threading.active_count() == before  # nothing started
        for seq in range(3 * len(entries)):  # three passes, cyclic
            st = s.next()
            assert st.layer == seq % len(entries)
            assert set(st.weights) == set(entries[st.layer].tensors)
            s.release(st)
        # no stage thread either (the one thread a mapping may start is the process's lease watcher)
        assert {t.name for t in threading.enumerate()} - names_before <= {"layerrun-lease-watch"}
        assert s._cached(s.files.mapped(entries[0]))  # just read through the mapping: in the page cache
    finally:
        s.close()


def test_threads_option(tiny_layered):
    path = tiny_layered("llama_gqa")
    before = torch.get_num_threads()
    try:
        with layerrun.load(path, mode="full", device="cpu", threads=1) as eng:
            assert eng.threads == 1 and torch.get_num_threads() == 1
        with layerrun.load(path, mode="full", device="cpu", threads="auto") as eng:
            from layerrun.engine.threads import default_threads

            assert eng.threads == default_threads() == torch.get_num_threads()
        for bad in (0, -2, "many"):
            with pytest.raises(LayerRunError, match="--threads"):
                layerrun.load(path, mode="full", device="cpu", threads=bad)
    finally:
        torch.set_num_threads(before)


def test_cli_threads_flag(tiny_layered):
    import subprocess
    import sys

    path = str(tiny_layered("llama_gqa"))
    bad = subprocess.run([sys.executable, "-m", "layerrun", "generate", path, "hello", "--threads", "0",
                          "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert bad.stderr.strip().count("\n") == 0 and "--threads must be >= 1" in bad.stderr
    ok = subprocess.run([sys.executable, "-m", "layerrun", "generate", path, "hello", "--threads", "1",
                         "--max-new-tokens", "2", "--ignore-eos"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
