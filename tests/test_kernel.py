"""The compiled matrix-vector kernel (layerrun/models/kernels): equal to F.linear on odd shapes, in its
AVX-512 and AVX2 builds; its cache survives damaged files and racing builds; and wherever it cannot be
had (off, no compiler, a compile error, an unwritable cache) the fast path is oneDNN, with the same
results."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import layerrun
from layerrun.models import fast, kernels
from layerrun.models.fast import FastLinear, available
from layerrun.models.kernels import AVX2, NATIVE, KernelUnavailable, build


def _cpu_has(*flags: str) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    have = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    return all(f in have for f in flags)


needs_x86 = pytest.mark.skipif(not _cpu_has("avx2", "fma"), reason="the kernel needs an x86-64 CPU with AVX2 and FMA")
VARIANTS = {"native": NATIVE, "avx2": AVX2}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kernels")
    cache = {}

    def get(variant: str):
        if variant not in cache:
            cache[variant] = build(VARIANTS[variant], folder)
        return cache[variant]

    return get


@pytest.fixture
def fresh_kernel(monkeypatch):
    """``kernels.kernel()`` recomputed under the test's environment, and again after it."""
    kernels.kernel.cache_clear()
    yield
    monkeypatch.undo()
    kernels.kernel.cache_clear()


def _check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """``got`` equals the exact product up to float32 summation order (bfloat16: and one rounding)."""
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    scale = F.linear(x.double().abs(), w.double().abs()) + (0 if b is None else b.double().abs())
    tol = 1e-5 * scale + 1e-6
    if x.dtype == torch.bfloat16:
        tol = tol + 2 ** -8 * ref.abs()  # the one rounding to bfloat16 (half a unit in the last place)
    assert got.shape == ref.shape and got.dtype == x.dtype
    err = (got.double() - ref).abs()
    assert bool((err <= tol).all()), f"max error {err.max().item():.3g}"


@needs_x86
@pytest.mark.parametrize("variant", ["native", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_f_linear_on_odd_shapes(built, variant, dtype):
    k = built(variant)
    assert k.isa == ("avx2" if variant == "avx2" else k.isa) and k.isa in ("avx2", "avx512")
    g = torch.Generator().manual_seed(0)
    for n, kk in ((1, 1), (1, 64), (3, 1), (17, 7), (33, 95), (65, 130), (8, 32), (100, 576), (5, 1000)):
        w = torch.randn(n, kk, generator=g).to(dtype)
        for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 17):
            x = torch.randn(rows, kk, generator=g).to(dtype)
            for b in (None, torch.randn(n, generator=g).to(dtype)):
                _check(k.linear(x, w, b), x, w, b)
    # batch dims, strided rows and elements, a strided weight row, no rows at all
    w = torch.randn(24, 80, generator=g).to(dtype)
    x3 = torch.randn(2, 3, 80, generator=g).to(dtype)
    _check(k.linear(x3, w).reshape(6, 24), x3.reshape(6, 80), w, None)
    wide = torch.randn(5, 200, generator=g).to(dtype)
    _check(k.linear(wide[:, :80], w), wide[:, :80], w, None)
    _check(k.linear(wide[:, :160:2], w), wide[:, :160:2], w, None)
    _check(k.linear(wide[:, 7:87], wide[:3, 100:180]), wide[:, 7:87], wide[:3, 100:180], None)  # weight rows 200 apart
    assert k.linear(torch.empty(0, 80, dtype=dtype), w).shape == (0, 24)
    b = torch.randn(24, generator=g).to(dtype)
    assert torch.equal(k.linear(torch.empty(3, 0, dtype=dtype), torch.empty(24, 0, dtype=dtype), b), b.expand(3, 24))


@needs_x86
def test_kernel_bfloat16_rounds_once(built):
    """Each bfloat16 output is the exact product rounded to nearest (inputs small enough that float32
    accumulation is exact): what oneDNN and F.linear give up to their own rounding."""
    k = built("native")
    g = torch.Generator().manual_seed(3)
    w = (torch.randint(-8, 8, (40, 64), generator=g) / 8).bfloat16()
    x = (torch.randint(-8, 8, (3, 64), generator=g) / 16).bfloat16()
    b = (torch.randint(-8, 8, (40,), generator=g) / 4).bfloat16()
    assert torch.equal(k.linear(x, w, b), F.linear(x.double(), w.double(), b.double()).bfloat16())
    nan = x.clone()
    nan[1, 5] = float("nan")
    y = k.linear(nan, w)
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()


@needs_x86
def test_kernel_rejects_what_it_cannot_run(built):
    k = built("native")
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="matvec"):
        k.linear(torch.randn(2, 9), w)  # K differs
    with pytest.raises(ValueError, match="matvec"):
        k.linear(torch.randn(2, 8).bfloat16(), w)  # dtypes differ
    with pytest.raises(ValueError, match="matvec"):
        k.linear(torch.randn(2, 8), torch.randn(8, 4).t())  # weight not unit-stride along K
    with pytest.raises(ValueError, match="bias"):
        k.linear(torch.randn(2, 8), w, torch.randn(5))


@needs_x86
def test_fast_linear_uses_the_kernel_for_few_rows(built, fresh_kernel):
    k = kernels.kernel()
    if k is None:
        pytest.skip("the kernel is not available here")
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(48, 70, generator=g), torch.randn(48, generator=g)
    fl = FastLinear(w, pack=False)
    assert fl.kernel is k and fl.weight is w  # plain weight, no copy
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for rows in (1, fast.KERNEL_ROWS):
            x = torch.randn(rows, 70, generator=g)
            assert torch.equal(F.linear(x, fl, b), k.linear(x, w, b))
        x = torch.randn(fast.KERNEL_ROWS + 1, 70, generator=g)
        if available(torch.float32):  # past KERNEL_ROWS: oneDNN on the same tensor
            assert torch.equal(F.linear(x, fl, b), torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""))
        torch.set_num_threads(2)  # the kernel is one thread: more threads asked for go to oneDNN
        x = torch.randn(1, 70, generator=g)
        if available(torch.float32):
            assert torch.equal(F.linear(x, fl, b), torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""))
    finally:
        torch.set_num_threads(before)


def test_no_compiler_on_the_path_is_one_line(monkeypatch, fresh_kernel, tmp_path, caplog):
    """A fresh machine without cc / gcc / clang (and no CC): torch's kernels, one log line, no cache."""
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("LAYERRUN_KERNEL", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("LAYERRUN_HOME", str(tmp_path))
    kernels.kernel.cache_clear()
    with caplog.at_level(logging.INFO, logger="layerrun.kernel"):
        assert kernels.kernel() is None
        assert kernels.kernel() is None  # decided once
    lines = [r.getMessage() for r in caplog.records if r.name == "layerrun.kernel"]
    assert len(lines) == 1 and "no C compiler found (set CC)" in lines[0]
    assert not (tmp_path / "kernels").exists()


@pytest.mark.parametrize("env", [{"LAYERRUN_KERNEL": "off"}, {"CC": "/nonexistent/cc"}])
def test_fallback_is_onednn_with_the_same_results(env, monkeypatch, fresh_kernel, tmp_path, caplog):
    monkeypatch.setenv("LAYERRUN_HOME", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    kernels.kernel.cache_clear()
    with caplog.at_level(logging.INFO, logger="layerrun.kernel"):
        assert kernels.kernel() is None
    lines = [r.getMessage() for r in caplog.records if r.name == "layerrun.kernel"]
    assert len(lines) == 1 and "torch's kernels" in lines[0]
    assert ("LAYERRUN_KERNEL" in lines[0]) == ("LAYERRUN_KERNEL" in env)
    if "CC" in env:
        assert "/nonexistent/cc" in lines[0]
    assert not list(tmp_path.glob("kernels/*.so"))
    if not available(torch.float32):
        pytest.skip("oneDNN linear is not available")
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        if not available(dtype):
            continue
        w, b = torch.randn(40, 24, generator=g).to(dtype), torch.randn(40, generator=g).to(dtype)
        x = torch.randn(1, 24, generator=g).to(dtype)
        for pack in (False, True):
            fl = FastLinear(w, pack=pack)
            assert fl.kernel is None and fl.packed == pack
            want = torch.ops.mkldnn._linear_pointwise(x, fl.weight, b, "none", [], "")
            assert torch.equal(F.linear(x, fl, b), want)


@needs_x86
def test_engine_with_and_without_the_kernel(tiny_layered, monkeypatch, fresh_kernel):
    """The same greedy tokens and fp32 logits within 1e-5, full and stream mode, kernel on and off."""
    path = tiny_layered("llama_gqa")
    ids = [5, 17, 3, 42, 8]
    out = {}
    for setting in ("on", "off"):
        monkeypatch.setenv("LAYERRUN_KERNEL", setting)
        kernels.kernel.cache_clear()
        assert (kernels.kernel() is None) == (setting == "off")
        for mode in ("full", "stream"):
            with layerrun.load(path, mode=mode, device="cpu", threads=1) as eng:
                out[setting, mode] = (eng.generate(ids, max_new_tokens=10, ignore_eos=True).token_ids,
                                      eng.logits(torch.tensor([ids[:1]]))[0, -1])
    tokens = {tuple(v[0]) for v in out.values()}
    assert len(tokens) == 1
    ref = out["off", "full"][1]
    for v in out.values():
        assert torch.allclose(v[1], ref, atol=1e-5, rtol=1e-5)


@needs_x86
def test_cache_rebuilds_damaged_files(tmp_path):
    # built by another process: this one must not have the file loaded when it is damaged (a library
    # truncated under a process that maps it is a crash, in any program; the cache only ever renames)
    code = "import sys; from layerrun.models.kernels import build, NATIVE; build(NATIVE, __import__('pathlib').Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=300)
    (so,) = tmp_path.glob("matvec-*.so")
    data = so.read_bytes()
    so.write_bytes(data[: len(data) // 2])  # truncated: its hash no longer matches its name
    k2 = build(NATIVE, tmp_path)
    assert kernels._digest(k2.path) == k2.path.stem.rsplit("-", 1)[1] and len(list(tmp_path.glob("matvec-*.so"))) == 1
    _check(k2.linear(torch.ones(1, 3), torch.ones(2, 3)), torch.ones(1, 3), torch.ones(2, 3), None)
    # not a library at all, yet named after its own hash: the load fails, it is removed and rebuilt
    (so,) = tmp_path.glob("matvec-*.so")
    junk = b"not an ELF file"
    key = so.stem.split("-")[1]
    so.unlink()
    bad = tmp_path / f"matvec-{key}-{kernels._digest_bytes(junk)}.so"
    bad.write_bytes(junk)
    k3 = build(NATIVE, tmp_path)
    assert not bad.exists() and k3.path.exists() and k3.path != bad
    assert not list(tmp_path.glob(".build-*"))  # no temporary folder left behind


@needs_x86
def test_unwritable_cache_and_compile_errors_are_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    with pytest.raises(KernelUnavailable, match="not writable"):
        build(NATIVE, blocker / "kernels")
    # a target without AVX2 or FMA: the source refuses to compile (a CPU the kernel does not serve)
    with pytest.raises(KernelUnavailable, match="compiling matvec.c failed"):
        build(("-O2", "-mno-avx2", "-mno-fma", "-mno-avx512f"), tmp_path / "k")
    assert not list((tmp_path / "k").glob("*"))


@needs_x86
def test_racing_builds_both_get_a_whole_library(tmp_path):
    got, errors = [], []

    def one():
        try:
            got.append(build(AVX2, tmp_path))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 2
    for k in got:
        _check(k.linear(torch.ones(2, 5), torch.ones(3, 5)), torch.ones(2, 5), torch.ones(3, 5), None)
    assert not list(tmp_path.glob(".build-*"))


@needs_x86
def test_streamed_bfloat16_layers_run_on_the_kernel_without_a_copy(tiny_layered, monkeypatch, fresh_kernel):
    """bf16 layers streamed from a mapping are wrapped for the kernel as views of the mapping (nothing
    reordered or copied), and stream mode gives full mode's greedy tokens."""
    path = tiny_layered("qwen2_bf16")
    monkeypatch.setenv("LAYERRUN_KERNEL", "on")
    kernels.kernel.cache_clear()
    if kernels.kernel() is None:
        pytest.skip("the kernel is not available here")
    ids = [5, 17, 3, 42, 8]
    with layerrun.load(path, mode="full", device="cpu", threads=1) as eng:
        assert eng.dtype == torch.bfloat16
        want = eng.generate(ids, max_new_tokens=10, ignore_eos=True).token_ids
    with layerrun.load(path, mode="stream", reader="mmap", device="cpu", threads=1) as eng:
        assert eng.generate(ids, max_new_tokens=10, ignore_eos=True).token_ids == want
        st = eng._stream.next()
        try:
            wrapped = [v for v in st.weights.values() if isinstance(v, FastLinear)]
            assert wrapped and all(v.kernel is not None and not v.packed for v in wrapped)
            assert all(v.weight.untyped_storage().nbytes() > v.weight.nbytes for v in wrapped)  # views
        finally:
            eng._stream.release(st)
