"""`validate --reference`: LayerRun against transformers on the same weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import layerrun
from layerrun.engine.reference import PROMPT, compare


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2", "gemma3"])
def test_tiny_models_match(name, tiny_layered):
    with layerrun.load(tiny_layered(name), mode="full") as eng:
        rep = compare(eng, n_tokens=8)
    assert rep.ok, rep.to_dict()
    assert rep.first_divergent_layer is None
    names = [c.name for c in rep.checks]
    assert "logits" in names and "greedy 8 tokens" in names and "hidden: layer 0 output" in names


def test_divergence_is_located_at_its_layer(tiny_layered, monkeypatch):
    from layerrun.models import llama

    real = llama.Model.layer

    def faulty(self, i, w, x, cache, ctx):
        out = real(self, i, w, x, cache, ctx)
        return out + 1e-2 if i == 1 else out  # a bug in layer 1 only

    monkeypatch.setattr(llama.Model, "layer", faulty)
    with layerrun.load(tiny_layered("llama_gqa"), mode="full") as eng:
        rep = compare(eng, n_tokens=4)
    assert not rep.ok
    assert rep.first_divergent_layer == 1
    by = {c.name: c for c in rep.checks}
    assert by["hidden: layer 0 output"].ok and not by["hidden: layer 1 output"].ok


def test_cli_reference_json(tiny_layered):
    p = subprocess.run([sys.executable, "-m", "layerrun", "validate", str(tiny_layered("qwen2")), "--reference",
                        "--json", "--tokens", "6"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["ok"] is True and all(c["ok"] for c in d["checks"])


@pytest.mark.slow
def test_bf16_within_top5_rule(tiny_layered):
    with layerrun.load(tiny_layered("qwen2"), mode="full", dtype="bfloat16") as eng:
        assert eng.dtype == torch.bfloat16
        rep = compare(eng, n_tokens=8)
    assert rep.ok, rep.to_dict()


def test_greedy_check_when_eos_is_the_argmax(tiny_layered, tmp_path):
    """The greedy check runs both sides past end-of-sequence: where the model's eos token is the greedy
    pick, transformers must not be steered to the runner-up (min_new_tokens masks the eos logit)."""
    import shutil

    src = tiny_layered("llama_gqa")
    with layerrun.load(src, mode="full") as eng:  # compare()'s prompt, as it encodes it
        first = eng.generate(eng.encode_prompt(PROMPT, chat=False), max_new_tokens=1).token_ids[0]
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    for name in ("config.json", "generation_config.json"):
        p = dst / name
        if p.exists():
            cfg = json.loads(p.read_text())
            cfg["eos_token_id"] = first  # the first greedy token is now end-of-sequence
            p.write_text(json.dumps(cfg))
    with layerrun.load(dst, mode="full", verify=False) as eng:
        rep = compare(eng, n_tokens=6)
    by = {c.name: c for c in rep.checks}
    assert by["greedy 6 tokens"].ok, by["greedy 6 tokens"].detail
