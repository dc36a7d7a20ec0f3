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
from layerrun.models import base as model_base
from layerrun.models.base import apply_rope, apply_rope_signed, fuse_linears, signed_sin
from layerrun.models.fast import FastLinear, _is_view, available, fast_weights, kernel_for

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
    up = w["mlp.up_proj.weight"]
    if kernel_for(torch.bfloat16) is not None:  # the compiled kernel reads it as it is: wrapped, no copy
        assert isinstance(streamed["mlp.up_proj.weight"], FastLinear) and streamed["mlp.up_proj.weight"].weight is up
        resident = fast_weights(w, pack=True)["mlp.up_proj.weight"]
        assert not resident.packed and resident.weight is up  # owns its memory already: kept plain, no copy
        view = torch.cat([up, up])[:8]
        assert _is_view(view) and not _is_view(FastLinear(view, pack=True).weight)  # a view is copied
    else:
        assert streamed["mlp.up_proj.weight"] is up  # bf16 streamed on oneDNN: no reorder per read
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


@needs_onednn
def test_view_entry_names_adjacent_groups_as_fused_products(tiny_layered):
    """A streamed layer's q/k/v (with biases) and gate/up, stored back to back, are staged as one view
    each, equal to the concatenation; a group out of order, or with one bias missing, stays apart."""
    import dataclasses

    from layerrun.formats.manifest import FileEntry
    from layerrun.io.reader import views

    path = tiny_layered("qwen2")
    with layerrun.load(path, mode="stream", reader="mmap", device="cpu") as eng:
        e = eng.manifest.layer(0)
        ve = eng._view_entry(e)
        qkv, gu = ve.tensors["self_attn.qkv_fused.weight"], ve.tensors["mlp.gate_up_fused.weight"]
        t = e.tensors
        assert (qkv.start, qkv.end) == (t["self_attn.q_proj.weight"].start, t["self_attn.v_proj.weight"].end)
        assert (gu.start, gu.end) == (t["mlp.gate_proj.weight"].start, t["mlp.up_proj.weight"].end)
        assert qkv.shape == (sum(t[f"self_attn.{p}_proj.weight"].shape[0] for p in "qkv"), t["self_attn.q_proj.weight"].shape[1])
        assert "self_attn.qkv_fused.bias" in ve.tensors and "mlp.gate_up_fused.bias" not in ve.tensors
        assert not any(n.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"))
                       for n in ve.tensors)
        buf = eng.files.mapped(e).tensor
        a, b = views(e, buf, 0), views(ve, buf, 0)
        for kind in ("weight", "bias"):
            want = torch.cat([a[f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            assert torch.equal(b[f"self_attn.qkv_fused.{kind}"], want)
        assert torch.equal(b["mlp.gate_up_fused.weight"], torch.cat([a["mlp.gate_proj.weight"], a["mlp.up_proj.weight"]]))
        assert b["mlp.gate_up_fused.weight"].data_ptr() == a["mlp.gate_proj.weight"].data_ptr()  # a view, no copy

        def entry(tensors):
            return FileEntry(e.name, e.kind, e.bytes, e.sha256, tensors, e.layer)

        # q and k swapped on disk (k first): q/k/v stays apart, gate/up is still fused
        q, k = t["self_attn.q_proj.weight"], t["self_attn.k_proj.weight"]
        swapped = dict(t)
        swapped["self_attn.k_proj.weight"] = dataclasses.replace(k, start=q.start, end=q.start + k.nbytes)
        swapped["self_attn.q_proj.weight"] = dataclasses.replace(q, start=q.start + k.nbytes, end=k.end)
        got = eng._view_entry(entry(swapped)).tensors
        assert "self_attn.qkv_fused.weight" not in got and "self_attn.q_proj.weight" in got
        assert "mlp.gate_up_fused.weight" in got
        # a bias missing from one part: fusing the weights would drop the other biases, so nothing fuses
        nobias = {n: i for n, i in t.items() if n != "self_attn.k_proj.bias"}
        got = eng._view_entry(entry(nobias)).tensors
        assert "self_attn.qkv_fused.weight" not in got and "self_attn.q_proj.bias" in got
        # a subset without the group (an expert-only read): unchanged
        sub = entry({n: i for n, i in t.items() if n.startswith("post_attention")})
        assert eng._view_entry(sub) is sub


def test_converter_stores_fused_groups_back_to_back(tiny_layered):
    """q, k, v (biases, then weights) and gate, up lie back to back in product order in a layer file."""
    entry = Manifest.read(tiny_layered("qwen2")).layer(0)
    t = entry.tensors
    for group in model_base.FUSED_GROUPS:
        for kind in ("weight", "bias"):
            parts = [t.get(f"{p}.{kind}") for p in group]
            if parts[0] is None:
                assert kind == "bias" and group[0].startswith("mlp")  # qwen2: q/k/v biases only
                continue
            assert all(a.end == b.start for a, b in zip(parts, parts[1:])), [(p.name, p.start, p.end) for p in parts]


def _old_layout(tiny_hf, tmp_path, monkeypatch, name):
    """``name`` converted as before the fused groups were kept together (tensors by name: k, o, q, v)."""
    from layerrun.formats.convert import convert

    monkeypatch.setattr(model_base, "storage_order", lambda n: n)
    dst = tmp_path / "old"
    convert(tiny_hf(name), dst, progress=False)
    monkeypatch.undo()
    return dst


@needs_onednn
@pytest.mark.parametrize("name", ["qwen2", "llama_gqa", "gemma3"])
@pytest.mark.parametrize("layout,reader", [("new", "mmap"), ("new", "pread"), ("old", "mmap")])
def test_streamed_layers_fuse_as_views(name, layout, reader, tiny_hf, tiny_layered, tmp_path, monkeypatch):
    """Streamed layers get fused products as views of the file where it stores the parts back to back
    (new conversions: q/k/v and gate/up; older ones: gate/up only, q/k/v computed apart), and the
    greedy fp32 tokens equal full mode's, the plain path's and transformers'."""
    import transformers

    path = tiny_layered(name) if layout == "new" else _old_layout(tiny_hf, tmp_path, monkeypatch, name)
    ids = torch.tensor([[5, 17, 3, 42, 8, 11]])
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf(name), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    full = layerrun.load(path, mode="full", device="cpu").generate(ids[0].tolist(), max_new_tokens=12, ignore_eos=True)
    plain = layerrun.load(path, mode="stream", reader=reader, device="cpu", fast=False)
    with layerrun.load(path, mode="stream", reader=reader, device="cpu") as eng:
        got = eng.generate(ids[0].tolist(), max_new_tokens=12, ignore_eos=True)
        st = eng._stream.next()
        try:
            w = st.weights
            assert "mlp.gate_up_fused.weight" in w and "mlp.gate_proj.weight" not in w
            assert ("self_attn.qkv_fused.weight" in w) == (layout == "new")
            assert ("self_attn.q_proj.weight" in w) == (layout == "old")
            if name == "qwen2" and layout == "new":
                assert "self_attn.qkv_fused.bias" in w
            # no copy: the fused weights are views of the staged file (a mapping or a ring slot)
            for k in ("self_attn.qkv_fused.weight", "mlp.gate_up_fused.weight"):
                if k in w:
                    assert isinstance(w[k], FastLinear) and not w[k].packed
                    v = w[k].weight
                    assert v.untyped_storage().nbytes() > v.numel() * v.element_size()
        finally:
            eng._stream.release(st)
    assert got.token_ids == full.token_ids == want
    assert plain.generate(ids[0].tolist(), max_new_tokens=12, ignore_eos=True).token_ids == want
    plain.close()
    assert len(set(want)) > 1


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
    if name == "qwen2_bf16" and kernel_for(torch.bfloat16) is not None:  # the tied head: a plain copy of its own
        head = fast.final["lm_head.weight"]
        assert isinstance(head, FastLinear) and not head.packed and not _is_view(head.weight)
    elif name == "qwen2_bf16" and available(torch.bfloat16):
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
