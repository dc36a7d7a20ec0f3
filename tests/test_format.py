"""The layered format and the converter: layout, alignment, manifest, atomicity, resume."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file

from layerrun.errors import FormatError, LayerRunError, UnsupportedModelError
from layerrun.formats.aligned import ALIGN, write_aligned
from layerrun.formats.convert import STATE_NAME, convert
from layerrun.formats.manifest import MANIFEST_NAME, Manifest
from layerrun.formats.validate import validate_folder


def test_aligned_file_is_standard_safetensors_with_aligned_data(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.arange(7, dtype=torch.int8),
        "c": torch.randn(4, dtype=torch.float64),
        "d": torch.randn(2, 2).to(torch.bfloat16),
    }
    infos, nbytes, sha = write_aligned(tmp_path / "x.safetensors", tensors)
    raw = (tmp_path / "x.safetensors").read_bytes()
    assert len(raw) == nbytes
    (hlen,) = struct.unpack("<Q", raw[:8])
    assert (8 + hlen) % ALIGN == 0
    for info in infos:
        t = tensors[info.name]
        assert info.start % t.element_size() == 0
        assert raw[info.start : info.end] == t.contiguous().view(torch.uint8).numpy().tobytes()
    back = load_file(tmp_path / "x.safetensors")  # any safetensors reader can load it
    for k, v in tensors.items():
        assert torch.equal(back[k], v)
    import hashlib

    assert hashlib.sha256(raw).hexdigest() == sha


def test_convert_layout_and_manifest(tiny_hf, tmp_path):
    src = tiny_hf("llama_gqa")
    dst = tmp_path / "out"
    m = convert(src, dst, progress=False)
    names = sorted(p.name for p in dst.iterdir())
    assert names == sorted(
        [".layerrun-verified.json", "config.json", "generation_config.json", "tokenizer.json",
         "tokenizer_config.json", MANIFEST_NAME,
         "embeddings.safetensors", "final.safetensors", "layer_000.safetensors", "layer_001.safetensors",
         "layer_002.safetensors"]
    )
    assert m.num_layers == 3 and m.model_type == "llama" and m.dtype == "float32"
    d = json.loads((dst / MANIFEST_NAME).read_text())
    assert d["format_version"] == 1
    for f in d["files"]:
        assert {"name", "kind", "bytes", "sha256", "tensors"} <= set(f)
        assert min(t["offsets"][0] for t in f["tensors"].values()) % ALIGN == 0
    # untied: lm_head stored in final; every tensor equals the source
    src_w = load_file(src / "model.safetensors")
    l1 = load_file(dst / "layer_001.safetensors")
    assert torch.equal(l1["self_attn.k_proj.weight"], src_w["model.layers.1.self_attn.k_proj.weight"])
    fin = load_file(dst / "final.safetensors")
    assert set(fin) == {"norm.weight", "lm_head.weight"}
    assert validate_folder(dst) == []


def test_tied_embeddings_not_stored_twice_and_sharded_source(tiny_hf, tmp_path):
    m = convert(tiny_hf("llama_tied_sharded"), tmp_path / "o", progress=False)
    assert m.tie_word_embeddings
    assert set(m.final.tensors) == {"norm.weight"}
    assert len(m.source["files"]) > 1


def test_dtype_cast_and_bf16_source(tiny_hf, tmp_path):
    m = convert(tiny_hf("qwen2_bf16"), tmp_path / "a", progress=False)
    assert m.dtype == "bfloat16"
    assert {t.dtype for t in m.layer(0).tensors.values()} == {"BF16"}
    m2 = convert(tiny_hf("llama_gqa"), tmp_path / "b", dtype="bfloat16", progress=False)
    assert {t.dtype for f in m2.files for t in f.tensors.values()} == {"BF16"}


def test_fp16_source_defaults_to_bf16_and_says_so(tiny_hf, tmp_path):
    src = tmp_path / "fp16"
    shutil.copytree(tiny_hf("llama_gqa"), src)
    w = load_file(src / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.half() for k, v in w.items()}, src / "model.safetensors", metadata={"format": "pt"})
    notes = []
    m = convert(src, tmp_path / "o", progress=False, log=notes.append)
    assert m.dtype == "bfloat16"
    assert any("fp16 compute is extremely slow" in n for n in notes)


def test_existing_destination_is_refused_without_force(tiny_hf, tmp_path):
    dst = tmp_path / "o"
    convert(tiny_hf("llama_gqa"), dst, progress=False)
    with pytest.raises(LayerRunError, match="already holds a converted model; pass --force"):
        convert(tiny_hf("llama_gqa"), dst, progress=False)
    convert(tiny_hf("llama_gqa"), dst, progress=False, force=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(LayerRunError, match="folder is not empty"):
        convert(tiny_hf("llama_gqa"), tmp_path / "busy", progress=False)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_interrupted_conversion_never_looks_complete_and_resumes(tiny_hf, tmp_path, monkeypatch):
    import layerrun.formats.convert as conv

    src, dst = tiny_hf("llama_gqa"), tmp_path / "o"
    real = conv.write_aligned
    calls = {"n": 0}

    def failing(path, tensors, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # embeddings, layer 0 done; die while writing layer 1
            open(path, "wb").write(b"partial")
            raise KeyboardInterrupt
        return real(path, tensors, **kw)

    monkeypatch.setattr(conv, "write_aligned", failing)
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, progress=False)
    assert not (dst / MANIFEST_NAME).exists()
    assert not (dst / "layer_001.safetensors").exists()
    with pytest.raises(FormatError, match="conversion into it was interrupted"):
        Manifest.read(dst)

    written = []

    def counting(path, tensors, **kw):
        written.append(os.path.basename(path))
        return real(path, tensors, **kw)

    monkeypatch.setattr(conv, "write_aligned", counting)
    logs = []
    convert(src, dst, progress=False, log=logs.append)
    assert written == [".layer_001.safetensors.tmp", ".layer_002.safetensors.tmp", ".final.safetensors.tmp"]
    assert any("resuming: 2 file(s)" in s for s in logs)
    assert not (dst / STATE_NAME).exists()
    assert not list(dst.glob(".*.tmp"))
    assert validate_folder(dst) == []


def test_pytorch_bin_only_is_refused_with_reason(tmp_path, tiny_hf):
    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(tiny_hf("llama_gqa") / "config.json", src)
    (src / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(UnsupportedModelError, match="only PyTorch pickle weights found .* needs safetensors, because"):
        convert(src, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_missing_config_and_unknown_model_type(tmp_path, tiny_hf):
    src = tmp_path / "m"
    shutil.copytree(tiny_hf("llama_gqa"), src)
    (src / "config.json").unlink()
    with pytest.raises(FormatError, match=r"config.json is missing; a Hugging Face model folder needs its config.json"):
        convert(src, tmp_path / "o", progress=False)
    shutil.copy(tiny_hf("llama_gqa") / "config.json", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "bogus"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"model_type 'bogus' is not supported; supported: .*llama.*qwen2"):
        convert(src, tmp_path / "o", progress=False)


def test_source_that_does_not_match_config_lists_every_problem(tmp_path, tiny_hf):
    src = tmp_path / "m"
    shutil.copytree(tiny_hf("llama_gqa"), src)
    w = load_file(src / "model.safetensors")
    del w["model.layers.2.mlp.up_proj.weight"]
    del w["model.layers.0.input_layernorm.weight"]
    w["model.layers.1.extra.weight"] = torch.zeros(2)
    from safetensors.torch import save_file

    save_file(w, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FormatError) as e:
        convert(src, tmp_path / "o", progress=False)
    assert str(e.value) == (
        f"{src}: the source does not match its config: missing tensors: layer_000.safetensors:input_layernorm.weight, "
        "layer_002.safetensors:mlp.up_proj.weight; unexpected tensors: layer_001.safetensors:extra.weight"
    )


def test_hf_source_casts_in_row_chunks_to_the_same_values(tiny_hf, monkeypatch):
    """fp32 -> bf16 conversion reads big tensors a chunk of rows at a time (no whole fp32 copy held)."""
    from layerrun.formats.convert import open_source
    from layerrun.formats.hf import HFSource

    monkeypatch.setattr(HFSource, "CAST_CHUNK", 1000)  # several chunks per matrix, some uneven
    src = open_source(tiny_hf("llama_gqa"))
    try:
        names = src.tensor_names()
        assert any(len(src.tensor_shape(n)) == 2 and src.tensor_shape(n)[0] * src.tensor_shape(n)[1] * 4 > 5000
                   for n in names)
        for n in names:
            whole = src.get(n)
            for dt in (torch.bfloat16, torch.float16):
                got = src.get(n, dtype=dt)
                assert got.dtype == dt and got.shape == whole.shape and torch.equal(got, whole.to(dt)), n
            assert torch.equal(src.get(n, dtype=torch.float32), whole)
    finally:
        src.close()
