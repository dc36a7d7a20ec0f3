"""The `layerrun` command, run as a real subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


def run(*args, check_rc=0, env=None):
    p = subprocess.run([sys.executable, "-m", "layerrun", *map(str, args)], capture_output=True, text=True, env=env)
    if check_rc is not None:
        assert p.returncode == check_rc, (p.returncode, p.stdout, p.stderr)
    return p


def assert_one_line_error(p, fragment):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert fragment in lines[0]


def test_convert_inspect_validate_generate(tiny_hf, tmp_path):
    dst = tmp_path / "m"
    p = run("convert", tiny_hf("qwen2"), dst, "--quiet")
    assert "converted" in p.stderr and "3 layers" in p.stderr
    info = json.loads(run("inspect", dst, "--json").stdout)
    assert info["model_type"] == "qwen2" and info["layers"] == 3 and info["kv_heads"] == 2
    assert info["tensor_check"] == {"missing": [], "unexpected": [], "shape_mismatch": []}
    assert info["chat_template"] is True and info["tokenizer"] is True
    hf_info = json.loads(run("inspect", tiny_hf("qwen2"), "--json").stdout)
    assert hf_info["parameters"] == info["parameters"]
    table = run("inspect", dst).stdout
    assert "kv heads" in table and "all expected tensors present" in table
    assert "OK" in run("validate", dst).stdout

    g = json.loads(run("generate", dst, "Hello there", "--max-new-tokens", "8", "--json").stdout)
    assert set(g) == {"text", "token_ids", "finish_reason", "stats"}
    assert g["stats"]["prompt_tokens"] > 3 and g["stats"]["generated_tokens"] >= 1

    p = run("generate", dst, "Hello there", "--max-new-tokens", "8", "--raw", "--temperature", "0.8", "--seed", "3")
    assert "prompt" in p.stderr and "decode" in p.stderr and "tok/s" in p.stderr and "peak RSS" in p.stderr
    p2 = run("generate", dst, "Hello there", "--max-new-tokens", "8", "--raw", "--temperature", "0.8", "--seed", "3")
    assert p.stdout == p2.stdout

    t = json.loads(run("tokenize", dst, "Hello  world ✓", "--json").stdout)
    assert t["round_trip"] is True and len(t["ids"]) == len(t["tokens"])
    tc = json.loads(run("tokenize", dst, "Hi", "--chat", "--json").stdout)
    assert tc["text"].startswith("<|im_start|>user\nHi<|im_end|>")


def test_validate_names_each_problem_and_fails(tiny_layered, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_layered("llama_gqa"), dst)
    (dst / "layer_002.safetensors").unlink()
    with open(dst / "layer_000.safetensors", "r+b") as f:
        f.truncate(5000)
    p = run("validate", dst, check_rc=1)
    assert "problem: layer_000.safetensors: truncated: 5000 bytes" in p.stderr
    assert "problem: layer_002.safetensors: missing" in p.stderr
    assert "2 problem(s)" in p.stderr
    j = json.loads(run("validate", dst, "--json", check_rc=1).stdout)
    assert j["ok"] is False and len(j["problems"]) == 2


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["generate", "/no/such/model", "hi"], "/no/such/model: no such model folder"),
        (["convert", "/no/such/src", "/tmp/x"], "/no/such/src: no such file or folder"),
        (["inspect", "/no/such/thing"], "/no/such/thing: no such model folder"),
        (["validate", "/tmp"], "/tmp: not a LayerRun model, layerrun.json is missing"),
    ],
)
def test_errors_are_one_line(args, fragment):
    assert_one_line_error(run(*args, check_rc=None), fragment)


def test_bad_flags_and_unknown_model_type(tiny_layered, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_layered("llama_gqa"), dst)
    assert_one_line_error(run("generate", dst, "hi", "--top-p", "2", check_rc=None), "top_p must be in (0, 1]")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "nope"
    (dst / "config.json").write_text(json.dumps(cfg))
    p = run("generate", dst, "hi", check_rc=None)
    assert_one_line_error(p, "model_type 'nope' is not supported; supported: ")
    p = run("--debug", "generate", dst, "hi", check_rc=None)
    assert "Traceback" in p.stderr


def test_failed_convert_leaves_no_complete_looking_folder(tiny_hf, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_hf("llama_gqa"), src)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated source
    p = run("convert", src, tmp_path / "out", "--quiet", check_rc=None)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert not (tmp_path / "out" / "layerrun.json").exists()
