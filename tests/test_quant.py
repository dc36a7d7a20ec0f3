"""Quantized layers (``convert --quantize int8|int4``): round trips, kernels, converted models, file sizes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import layerrun
from layerrun.errors import LayerRunError
from layerrun.formats import quant
from layerrun.formats.convert import convert
from layerrun.formats.manifest import MANIFEST_NAME, Manifest
from layerrun.formats.quant import (
    QuantizedWeight,
    dequantize_weights,
    logical_tensors,
    parse_scheme,
    quantize_file,
    quantize_tensor,
)
from layerrun.formats.validate import validate_folder

SCHEMES = ["int8", "int8-g32", "int8-g128", "int4", "int4-g64", "int4-g128"]


def _weights(n=48, k=256, seed=0) -> torch.Tensor:
    """Rows of very different magnitudes, a few outliers, one constant group: what scales must cope with."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 0, n)[:, None]
    w[3, 17] = 25.0
    w[5, :32] = 0.25
    return w


def _roundtrip(w: torch.Tensor, scheme: str, dtype=torch.float32) -> tuple[QuantizedWeight, dict]:
    parts = quantize_file({"x.weight": w}, parse_scheme(scheme))
    out = dequantize_weights(parts, parse_scheme(scheme).to_json(), dtype)
    return out["x.weight"], parts


def test_parse_scheme():
    assert parse_scheme("int8") == quant.QuantScheme("int8", None)
    assert parse_scheme("int4") == quant.QuantScheme("int4", 32)
    assert parse_scheme("INT4-g64").group_size == 64
    assert parse_scheme("int8-g128").name == "int8-g128"
    for bad, msg in [("int3", "is not one of"), ("int4-g48", "group size must be one of"),
                     ("int4-gchannel", "needs a group size")]:
        with pytest.raises(LayerRunError, match=msg):
            parse_scheme(bad)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_roundtrip_error_is_within_half_a_step(scheme):
    w = _weights()
    qw, parts = _roundtrip(w, scheme)
    sc = parse_scheme(scheme)
    n, k = w.shape
    g = sc.group_size or k
    assert qw.shape == w.shape and qw.group_size == g
    assert parts["x.weight.scale"].shape == (n, k // g) and parts["x.weight.scale"].dtype == torch.bfloat16
    if sc.method == "int8":
        assert parts["x.weight.q"].dtype == torch.int8 and parts["x.weight.q"].shape == (n, k)
    else:
        assert parts["x.weight.q"].dtype == torch.uint8 and parts["x.weight.q"].shape == (n, k // 2)
        assert parts["x.weight.zero"].shape == (n, k // g)
    got = qw.dequantize(torch.float32)
    err = (got - w).abs().view(n, k // g, g)  # (N, G, g)
    step = parts["x.weight.scale"].float()[..., None]
    if sc.method == "int8":
        # Symmetric absmax grid: every value within half a step (plus the scale's bf16 rounding).
        assert (err <= 0.5 * step * (1 + 2**-6) + 1e-7).all()
        assert ((got - w).norm() / w.norm()).item() < 0.01
    else:
        # The int4 grid may clip outliers to lower the squared error: values inside the grid are
        # within half a step (plus the zero's bf16 rounding), those outside are clamped to its end.
        zero = parts["x.weight.zero"].float()[..., None]
        lo, hi = zero - 8 * step, zero + 7 * step
        x = w.view(n, k // g, g)
        inside = (x >= lo) & (x <= hi)
        assert (err[inside] <= (0.5 * step * (1 + 2**-6) + zero.abs() * 2**-8 + 1e-7).expand_as(err)[inside]).all()
        clamped = torch.where(x < lo, lo - x, x - hi)
        assert torch.allclose(err[~inside], clamped[~inside], rtol=1e-3, atol=1e-6)
        # ... and the error on the whole is below that of the plain min/max grid.
        assert (got - w).norm() <= _minmax_int4(w, g).sub(w).norm() * 1.001
        assert ((got - w).norm() / w.norm()).item() < 0.12
    if g == 32:  # a constant group comes back exactly (int4: it is the zero) or to the scale's bf16 rounding
        assert err[5, 0].max() <= (0.25 * 2**-8 if sc.method == "int8" else 1e-7)


def _minmax_int4(w: torch.Tensor, g: int) -> torch.Tensor:
    x = w.view(w.shape[0], -1, g)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    step = ((hi - lo) / 15).clamp(min=1e-30)
    return (torch.round((x - lo) / step).clamp(0, 15) * step + lo).view_as(w)


def test_group_size_falls_back_to_what_divides_the_width():
    sc = parse_scheme("int4-g128")
    assert quant.group_size_for(576, sc) == 64
    assert quant.group_size_for(96, sc) == 32
    assert quant.group_size_for(48, sc) is None
    assert quantize_tensor(torch.randn(16, 48), sc) is None  # stays unquantized
    assert quant.group_size_for(48, parse_scheme("int8")) == 0  # per-channel fits any width
    parts = quantize_file({"a.weight": torch.randn(16, 48), "b.weight": torch.randn(16, 96), "n.weight": torch.randn(96)}, sc)
    assert sorted(parts) == ["a.weight", "b.weight.q", "b.weight.scale", "b.weight.zero", "n.weight"]
    assert logical_tensors(parts, sc.to_json()) == {"a.weight": (16, 48), "b.weight": (16, 96), "n.weight": (96,)}


@pytest.mark.parametrize("scheme", ["int8", "int8-g128", "int4", "int4-g64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, quant.FUSED_MAX_ROWS + 5])
def test_linear_matches_dense_matmul_of_the_dequantized_weight(scheme, dtype, rows):
    w = _weights(n=96, k=128) * 10
    qw, _ = _roundtrip(w, scheme, dtype)
    if scheme in ("int8", "int4", "int4-g64"):
        assert qw.kernel is not None  # the fused CPU kernel is used for these
    x = torch.randn(1, rows, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(96).to(dtype)
    got = F.linear(x, qw, bias)
    want = F.linear(x.double(), qw.dequantize(torch.float64), bias.double())
    assert got.dtype == dtype and got.shape == (1, rows, 96)
    # Fused kernels compute in bf16 (fp32 activations are rounded to bf16): bf16 round-off of the output.
    tol = 2e-2 if dtype == torch.bfloat16 or (qw.kernel and rows <= quant.FUSED_MAX_ROWS) else 1e-5
    assert (got.double() - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("offset", [0, 12, 1])
def test_int8_kernel_runs_on_weights_and_activations_at_any_address(offset):
    """An int8 weight at an odd offset of a read buffer (layer files align files, not each int8
    tensor) and an activation view at an odd address: torch's AVX-512 int8 kernel faults on
    unaligned operands, so they are copied there; the result equals the aligned computation."""
    from layerrun.formats.quant import QuantizedWeight

    g = torch.Generator().manual_seed(3)
    q = torch.randint(-128, 127, (64, 64), dtype=torch.int8, generator=g)
    buf = torch.zeros(64 * 64 + 256, dtype=torch.int8)
    buf[offset : offset + q.numel()] = q.reshape(-1)
    scale = torch.rand(64, 1, generator=g) / 64
    aligned = QuantizedWeight("int8", q, scale, None, torch.bfloat16)
    odd = QuantizedWeight("int8", buf[offset : offset + q.numel()].view(64, 64), scale, None, torch.bfloat16)
    assert odd.kernel == "int8"
    xb = torch.randn(4 * 64 + 8, generator=g).to(torch.bfloat16)
    x = xb[3 : 3 + 4 * 64].view(4, 64)  # 6 bytes past an aligned address
    assert torch.equal(F.linear(x, odd), F.linear(x.clone(), aligned))


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("k", [40, 56, 48, 64])
def test_int8_layers_of_any_width(k, rows):
    """Widths that are not a multiple of 16 (a tiny MoE's 40-wide experts): torch's AVX-512 int8
    kernel computes garbage for them (and faults with several rows); such layers dequantize."""
    from layerrun.formats.quant import QuantizedWeight

    g = torch.Generator().manual_seed(4)
    q = torch.randint(-128, 127, (64, k), dtype=torch.int8, generator=g)
    w = QuantizedWeight("int8", q, torch.rand(64, 1, generator=g) / 64, None, torch.bfloat16)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    want = F.linear(x.double(), w.dequantize(torch.float64))
    assert (F.linear(x, w).double() - want).abs().max() <= 2e-2 * want.abs().max()


def test_other_torch_functions_see_the_dequantized_weight():
    qw, _ = _roundtrip(_weights(), "int4")
    assert torch.equal(torch.add(qw, 0), qw.dequantize())
    assert not qw.is_floating_point() and qw.shape == (48, 256) and qw.dim() == 2


@pytest.mark.skipif(quant.cpu_int4_layout() in (None, "op"), reason="no int4 CPU kernel, or a layout we do not build")
@pytest.mark.parametrize("n", [16, 48, 96, 112, 256])
def test_cpu_int4_packing_matches_torch_and_inverts(n):
    g = torch.Generator().manual_seed(n)
    q = torch.randint(0, 16, (n, 64), generator=g, dtype=torch.int32)
    layout = quant.cpu_int4_layout()
    packed = quant._cpu_pack(q.to(torch.uint8), *layout)
    assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
    for lay in (layout, quant.STORED_LAYOUT, (64, True), (64, False), (16, False)):
        assert torch.equal(quant._cpu_unpack(quant._cpu_pack(q.to(torch.uint8), *lay), *lay), q.to(torch.uint8))


# ---- converted tiny models ---------------------------------------------------------
@pytest.fixture(scope="module")
def quantized(tiny_hf, tmp_path_factory):
    """quantized(name, scheme) -> a converted, quantized layered folder."""
    cache = {}

    def get(name: str, scheme: str):
        if (name, scheme) not in cache:
            dst = tmp_path_factory.mktemp(f"q_{name}_{scheme}") / "model"
            convert(tiny_hf(name), dst, progress=False, quantize=scheme)
            cache[name, scheme] = dst
        return cache[name, scheme]

    return get


IDS = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(1))


def test_manifest_records_the_scheme(quantized, tiny_layered):
    m = Manifest.read(quantized("llama_gqa", "int4"))
    assert m.quantization["method"] == "int4" and m.quantization["group_size"] == 32
    assert m.quantization["bits"] == 4 and m.quantization["format"] == quant.FORMAT
    raw = json.loads((quantized("llama_gqa", "int8") / MANIFEST_NAME).read_text())
    assert raw["quantization"]["method"] == "int8" and raw["quantization"]["group_size"] is None
    assert Manifest.read(tiny_layered("llama_gqa")).quantization is None
    layer = m.layer(0).tensors
    assert "mlp.up_proj.weight.q" in layer and "mlp.up_proj.weight" not in layer
    assert layer["input_layernorm.weight"].dtype == "F32"  # norms keep the storage dtype
    assert set(m.embeddings.tensors) == {"embed_tokens.weight"}


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2", "phi3"])
def test_logical_tensors_are_what_the_model_expects(name, quantized):
    from layerrun.models import build_model

    folder = quantized(name, "int4")
    exp = build_model(json.loads((folder / "config.json").read_text())).expected_tensors()["layer"]
    m = Manifest.read(folder)
    for f in m.layers:
        assert logical_tensors(f.tensors, m.quantization) == {k: tuple(v) for k, v in exp.items()}


@pytest.mark.parametrize("name", ["qwen2", "phi3"])
def test_int8_logits_close_and_greedy_tokens_same(name, quantized, tiny_layered):
    """int8: logits within 5 % of the largest logit (the tiny random models' weights are Gaussian,
    the worst case for a grid); bf16 storage alone is off by about 1-2 % on these models."""
    ref = layerrun.load(tiny_layered(name), mode="full")
    want = ref.logits(IDS)[0]
    for mode in ("full", "stream"):
        eng = layerrun.load(quantized(name, "int8"), mode=mode)
        got = eng.logits(IDS)[0]
        assert (got - want).abs().max() <= 0.05 * want.abs().max()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
        prompt = IDS[0, :8].tolist()
        tokens = eng.generate(prompt, max_new_tokens=8, ignore_eos=True).token_ids
        assert tokens == ref.generate(prompt, max_new_tokens=8, ignore_eos=True).token_ids


def _dequantized_copy(folder, dst):
    """The same model with every quantized weight replaced by its dequantized fp32 values."""
    from layerrun.formats.aligned import write_aligned
    from layerrun.io.reader import FileReader

    m = Manifest.read(folder)
    dst.mkdir()
    reader = FileReader(folder)
    files = []
    for f in m.files:
        w, _ = reader.read(f)
        w = dequantize_weights(w, m.quantization, torch.float32)
        w = {k: (v.dequantize(torch.float32) if isinstance(v, QuantizedWeight) else v.clone()) for k, v in w.items()}
        infos, nbytes, sha = write_aligned(dst / f.name, w)
        files.append(type(f)(f.name, f.kind, nbytes, sha, {i.name: i for i in infos}, f.layer))
    for p in folder.iterdir():
        if p.suffix == ".json" and p.name != MANIFEST_NAME:
            (dst / p.name).write_bytes(p.read_bytes())
    Manifest(m.model_type, m.num_layers, m.dtype, files, tie_word_embeddings=m.tie_word_embeddings).write(dst)
    return dst


@pytest.mark.parametrize("name,scheme", [("llama_gqa", "int8"), ("llama_gqa", "int4"), ("gemma3", "int4"), ("qwen3", "int8")])
def test_quantized_model_computes_what_its_dequantized_weights_give(name, scheme, quantized, tmp_path, monkeypatch):
    """Against the same model holding the dequantized weights: prefill (dequantize + dense matmul,
    fp32) agrees to fp32 round-off; the fused kernels (bf16 activations) to 3 % of the largest
    logit; streamed layers give exactly what resident ones give."""
    folder = quantized(name, scheme)
    want = layerrun.load(_dequantized_copy(folder, tmp_path / "deq"), mode="full").logits(IDS)[0]
    full = layerrun.load(folder, mode="full")
    assert (full.logits(IDS)[0] - want).abs().max() <= 1e-4 * want.abs().max()
    if name != "gemma3":  # this tiny Gemma 3 is hypersensitive: bf16 weights alone move its logits by ~10 %
        monkeypatch.setattr(quant, "FUSED_MAX_ROWS", 1 << 30)
        assert (full.logits(IDS)[0] - want).abs().max() <= 0.03 * want.abs().max()
        monkeypatch.undo()
    prompt = IDS[0, :6].tolist()
    tokens = full.generate(prompt, max_new_tokens=6, ignore_eos=True).token_ids
    for reader in ("pread", "mmap"):  # mmap: the kernels read straight from the read-only mapping
        eng = layerrun.load(folder, mode="stream", reader=reader)
        assert eng.generate(prompt, max_new_tokens=6, ignore_eos=True).token_ids == tokens


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_validate_and_inspect_a_quantized_folder(quantized, scheme, tiny_layered):
    from layerrun.formats.inspect import inspect_path

    folder = quantized("llama_gqa", scheme)
    assert validate_folder(folder) == []
    info = inspect_path(folder)
    assert info["quantization"]["method"] == scheme
    assert info["tensor_check"] == {"missing": [], "unexpected": [], "shape_mismatch": []}
    assert info["parameters"] == inspect_path(tiny_layered("llama_gqa"))["parameters"]  # logical, not stored, count


def test_quantized_layer_bytes(tiny_hf, quantized, tiny_layered):
    """int8 is about 1/4 and int4 about 1/8 of the fp32 layer bytes (data region; scales and norms on top)."""
    fp32 = Manifest.read(tiny_layered("llama_gqa"))

    def data(m):
        return sum(f.bytes - f.data_start for f in m.layers)

    r8 = data(Manifest.read(quantized("llama_gqa", "int8"))) / data(fp32)
    r4 = data(Manifest.read(quantized("llama_gqa", "int4"))) / data(fp32)
    assert 0.25 <= r8 <= 0.27, r8
    assert 0.125 <= r4 <= 0.17, r4  # a bf16 scale and zero per 32 weights add 1/32 of fp32


def test_convert_rejects_an_unknown_scheme(tiny_hf, tmp_path):
    with pytest.raises(LayerRunError, match="--quantize 'int2' is not one of"):
        convert(tiny_hf("llama_gqa"), tmp_path / "out", progress=False, quantize="int2")
    assert not (tmp_path / "out").exists()


def test_check_quantized_finds_broken_parts(quantized):
    m = Manifest.read(quantized("llama_gqa", "int4"))
    tensors = dict(m.layer(0).tensors)
    assert quant.check_quantized(tensors, m.quantization) == []
    del tensors["mlp.up_proj.weight.zero"]
    tensors["mlp.down_proj.weight.scale"] = torch.empty(64, 3, dtype=torch.bfloat16)
    assert quant.check_quantized(tensors, m.quantization) == [
        "mlp.down_proj.weight.scale: shape [64, 3] does not fit a (64, 128) weight",
        "mlp.up_proj.weight: zero is missing",
    ]


def test_int4_repacked_for_another_layout_keeps_its_values(monkeypatch):
    """On a CPU whose kernel layout is not the stored one (AVX-512: 64-row blocks) weights are repacked,
    the read buffer is let go (small tensors are copied), and dequantize() still gives the same values."""
    w = _weights(n=96, k=128)
    sc = quant.QuantScheme("int4", 32, quant.STORED_LAYOUT)  # a file written on an AVX2 machine
    parts = quantize_file({"x.weight": w, "n.weight": torch.ones(128)}, sc)
    monkeypatch.setattr(quant, "_layout", (quant.STORED_LAYOUT,))
    want = dequantize_weights(parts, sc.to_json(), torch.float32)["x.weight"].dequantize()
    monkeypatch.setattr(quant, "_layout", ((64, True),))
    out = dequantize_weights(parts, sc.to_json(), torch.float32)
    qw = out["x.weight"]
    assert qw.q is None and qw.packed.shape == (96, 64)
    assert torch.equal(qw.packed, quant._cpu_pack(qw.unpacked(), 64, True))
    assert torch.equal(qw.dequantize(), want)
    assert out["n.weight"].data_ptr() != parts["n.weight"].data_ptr()


@pytest.mark.parametrize("rows", [128, 96])  # 128: the nibble-moving AVX2 -> AVX-512 path; 96: the generic one
@pytest.mark.parametrize("written, machine", [((32, True), (64, True)), ((64, True), (32, True)),
                                              ((64, True), (64, True))])
def test_int4_layout_chosen_at_conversion(monkeypatch, rows, written, machine):
    """A file records the layout it was written in; a reader with another kernel layout repacks to the
    same values, one with the same uses the bytes as read."""
    w = _weights(n=rows, k=128)
    sc = quant.QuantScheme("int4", 32, written)
    parts = quantize_file({"x.weight": w}, sc)
    meta = sc.to_json()
    assert quant.QuantScheme.from_json(meta).layout == written
    monkeypatch.setattr(quant, "_layout", (written,))
    want = dequantize_weights(parts, meta, torch.float32)["x.weight"].dequantize()
    monkeypatch.setattr(quant, "_layout", (machine,))
    qw = dequantize_weights(parts, meta, torch.float32)["x.weight"]
    assert torch.equal(qw.dequantize(), want)
    assert torch.equal(qw.packed, quant._cpu_pack(qw.unpacked(), *machine))
    if written == machine:
        assert qw.packed.data_ptr() == parts["x.weight.q"].data_ptr()  # no copy


def test_int4_layout_in_the_manifest(monkeypatch):
    old = {"method": "int4", "group_size": 32}  # written before layouts were recorded: the AVX2 one
    assert quant.QuantScheme.from_json(old).layout == quant.STORED_LAYOUT
    with pytest.raises(LayerRunError, match="int4_layout 'tinygemm-cpu-n128' is not supported"):
        quant.QuantScheme.from_json({**old, "int4_layout": "tinygemm-cpu-n128"})
    monkeypatch.setattr(quant, "_layout", ((64, True),))
    assert parse_scheme("int4").layout == (64, True)  # new files: this CPU's kernel layout
    assert parse_scheme("int4").to_json()["int4_layout"] == "tinygemm-cpu-n64"
    monkeypatch.setattr(quant, "_layout", ("op",))
    assert parse_scheme("int4-g64").layout == quant.STORED_LAYOUT


def test_conversion_progress_ends_at_its_total_when_quantizing(tiny_hf, tmp_path, capsys):
    """The bar's total counts quantized sizes; each file must advance it by the same measure (it
    advanced by the float size, ending at '269.0/123.0 MB' for SmolLM2 in int4)."""
    import re

    from layerrun.formats.convert import convert

    convert(tiny_hf("llama_gqa"), tmp_path / "q4", progress=True, quantize="int4")
    err = capsys.readouterr().err
    pairs = re.findall(r"(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?) (bytes|kB|MB)", err)
    assert pairs, err[-1000:]
    done, total, _ = pairs[-1]
    assert float(done) == float(total), pairs[-3:]
