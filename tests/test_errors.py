"""Broken layered folders: exact messages from validate and from the engine."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import layerrun
from layerrun.errors import FormatError, UnsupportedModelError
from layerrun.formats.validate import validate_folder


@pytest.fixture
def model_copy(tiny_layered, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_layered("llama_gqa"), dst)
    return dst


def test_missing_layer_file(model_copy):
    (model_copy / "layer_001.safetensors").unlink()
    assert validate_folder(model_copy) == ["layer_001.safetensors: missing"]
    with pytest.raises(FormatError, match=r"layer_001.safetensors: layer file is missing; run `layerrun validate"):
        layerrun.load(model_copy, mode="stream").logits([[1, 2, 3]])
    with pytest.raises(FormatError, match=r"layer_001.safetensors: layer file is missing; run `layerrun validate"):
        layerrun.load(model_copy, mode="full")


def test_wrong_sha256(model_copy):
    p = model_copy / "layer_002.safetensors"
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF  # flip one weight byte: size and header still fine
    p.write_bytes(bytes(raw))
    problems = validate_folder(model_copy)
    assert len(problems) == 1
    assert problems[0].startswith("layer_002.safetensors: sha256 mismatch: file ")
    for mode in ("full", "stream"):  # checked by default, before the bytes are used: resident at load, streamed at read
        with pytest.raises(FormatError, match=r"layer_002.safetensors: the file is corrupt: its sha256 is .*re-run `layerrun convert`"):
            layerrun.load(model_copy, mode=mode).logits([[1, 2, 3]])
    with pytest.raises(FormatError, match="is corrupt"):
        layerrun.load(model_copy, verify=True)
    layerrun.load(model_copy, verify=False).logits([[1, 2, 3]])  # opted out: runs on the damaged bytes


def test_truncated_layer_file(model_copy):
    p = model_copy / "layer_000.safetensors"
    full = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(full - 100)
    assert validate_folder(model_copy) == [
        f"layer_000.safetensors: truncated: {full - 100} bytes, manifest says {full}"
    ]
    msg = (
        f"{model_copy / 'layer_000.safetensors'}: file is truncated ({full - 100} bytes, manifest says {full}); "
        "re-run `layerrun convert` to rebuild it"
    )
    for mode in ("stream", "full"):  # found at load, before anything is sized by the manifest
        with pytest.raises(FormatError) as e:
            layerrun.load(model_copy, mode=mode)
        assert str(e.value) == msg


def test_layer_truncated_after_load(model_copy):
    # streamed, read at use (prefetch 0: nothing staged ahead at load): found again when the layer is opened
    eng = layerrun.load(model_copy, mode="stream", reader="pread", prefetch=0)
    p = model_copy / "layer_000.safetensors"
    full = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(full - 100)
    with pytest.raises(FormatError, match=r"layer_000.safetensors: file is truncated"):
        eng.logits([[1, 2, 3]])
    eng.close()


def test_shape_mismatch_with_config(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (model_copy / "config.json").write_text(json.dumps(cfg))
    problems = validate_folder(model_copy, check_sha=False)
    assert "layer_000.safetensors: tensor mlp.up_proj.weight has shape [128, 64], config implies [96, 64]" in problems
    assert len(problems) == 9  # gate/up/down in each of 3 layers


def test_unknown_model_type(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model_type"] = "gpt_bogus"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as e:
        layerrun.load(model_copy)
    assert str(e.value).startswith(f"{model_copy / 'config.json'}: model_type 'gpt_bogus' is not supported; supported: ")
    assert "llama" in str(e.value) and "mistral" in str(e.value)
    assert validate_folder(model_copy, check_sha=False)[0].startswith("config.json: model_type 'gpt_bogus'")


def test_not_a_layered_folder(tiny_hf):
    with pytest.raises(FormatError, match="not a LayerRun model, layerrun.json is missing .*run `layerrun convert` on it first"):
        layerrun.load(tiny_hf("llama_gqa"))


def test_missing_tokenizer_only_matters_for_text(model_copy):
    (model_copy / "tokenizer.json").unlink()
    eng = layerrun.load(model_copy)
    g = eng.generate([5, 6, 7], max_new_tokens=3, ignore_eos=True)  # token ids still work
    assert len(g.token_ids) == 3
    with pytest.raises(FormatError, match="tokenizer.json is missing; text prompts need it"):
        eng.generate("hello", max_new_tokens=2)


def test_bad_token_ids(model_copy):
    eng = layerrun.load(model_copy)
    with pytest.raises(layerrun.errors.LayerRunError, match=r"token ids must be in \[0, 320\)"):
        eng.logits(torch.tensor([[1, 999]]))
