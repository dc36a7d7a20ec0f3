"""The model store: Hugging Face cache pulls (offline), variants, import, show, rm, list, .gguf paths.

This machine cannot reach the Hugging Face Hub, so the hub path is tested the
way a user who downloaded earlier would meet it: a real huggingface_hub cache
layout on disk (``models--ORG--REPO/{blobs,snapshots/<rev>,refs/main}``, the
snapshot files symlinked to their blobs) holding tiny models, and
``HF_HUB_OFFLINE=1`` in a real ``layerrun pull`` process. Nothing of
huggingface_hub is replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import layerrun
from layerrun.cli import main
from layerrun.errors import LayerRunError
from layerrun.formats import store
from layerrun.store_cli import fit_lines

REV = "0123456789abcdef0123456789abcdef01234567"
PROMPT = [5, 6, 7, 8]


def hf_cache(hf_home: Path, repo: str, files: dict[str, Path | bytes]) -> Path:
    """Lay ``files`` out as huggingface_hub's cache holds a downloaded repo; returns the snapshot folder."""
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / REV
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(REV)
    for name, src in files.items():
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snap


def pull_cli(*args: str, hf_home: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "LAYERRUN_HOME": str(home)}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "layerrun", "pull", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERRUN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def tiny_gguf_file(tiny_hf, folder: Path, qtype_name: str) -> Path:
    gguf = pytest.importorskip("gguf")
    from test_gguf import _gpt2_vocab, write_gguf

    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    out = folder / f"Tiny-{qtype_name}.gguf"
    return write_gguf(tiny_hf("llama_gqa"), out, qtype, _gpt2_vocab(tiny_hf("llama_gqa")))


def test_pull_safetensors_repo_from_the_hf_cache_offline(tiny_hf, tiny_layered, tmp_path, home, capsys):
    src = tiny_hf("llama_gqa")
    files = {p.name: p for p in src.iterdir() if p.is_file()}
    files["README.md"] = b"---\nlicense: apache-2.0\ntags: [tiny]\n---\n# a tiny llama\n"
    hf_cache(tmp_path / "hf", "tinyorg/tiny-llama", files)
    r = pull_cli("tinyorg/tiny-llama", hf_home=tmp_path / "hf", home=home)
    assert r.returncode == 0, r.stderr
    folder = Path(r.stdout.strip())
    assert folder == home / "models" / "tinyorg--tiny-llama@float32"
    assert "no download needed (cached)" in r.stderr and "fits in memory" in r.stderr
    # the same weights as converting the folder directly: the same greedy tokens
    want = layerrun.load(tiny_layered("llama_gqa")).generate(PROMPT, max_new_tokens=8, ignore_eos=True).token_ids
    assert layerrun.load("tinyorg/tiny-llama").generate(PROMPT, max_new_tokens=8, ignore_eos=True).token_ids == want
    # again: nothing converted
    r2 = pull_cli("tinyorg/tiny-llama", hf_home=tmp_path / "hf", home=home)
    assert r2.returncode == 0 and "already pulled" in r2.stderr and r2.stdout.strip() == str(folder)

    assert main(["show", "tinyorg/tiny-llama", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["license"] == "apache-2.0" and info["source"] == "huggingface: tinyorg/tiny-llama"
    assert info["variant"] == "float32" and info["layers"] == json.loads((src / "config.json").read_text())["num_hidden_layers"] and info["size_on_disk"] >= info["bytes_total"]
    assert main(["list", "--json", "--usage"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["tag"] for m in listed["models"]] == ["tinyorg/tiny-llama@float32"]
    assert listed["usage"]["models"] == listed["models"][0]["size"] > 0
    assert main(["rm", "tinyorg/tiny-llama"]) == 0
    assert "deleted tinyorg/tiny-llama@float32" in capsys.readouterr().out
    assert store.list_models() == [] and main(["rm", "tinyorg/tiny-llama"]) == 1


def test_gguf_files_from_the_hf_cache_keep_their_size(tiny_hf, tmp_path, home):
    """A 4-bit GGUF is stored as int4, an 8-bit one as int8 (the default variant follows the weights)."""
    q4 = tiny_gguf_file(tiny_hf, tmp_path, "Q4_0")
    q8 = tiny_gguf_file(tiny_hf, tmp_path, "Q8_0")
    hf_cache(tmp_path / "hf", "tinyorg/tiny-gguf", {q4.name: q4, f"sub/{q8.name}": q8})
    r = pull_cli(f"tinyorg/tiny-gguf:{q4.name}", hf_home=tmp_path / "hf", home=home)
    assert r.returncode == 0, r.stderr
    assert "storing int4 (4-bit layers (Q4_0 100%))" in r.stderr
    r = pull_cli(f"tinyorg/tiny-gguf:sub/{q8.name}", hf_home=tmp_path / "hf", home=home)
    assert r.returncode == 0, r.stderr
    tags = {m["tag"]: m for m in store.list_models()}
    assert set(tags) == {f"tinyorg/tiny-gguf:{q4.name}@int4", f"tinyorg/tiny-gguf:sub/{q8.name}@int8"}
    m = store.find(f"tinyorg/tiny-gguf:{q4.name}")
    assert m.variant == "int4" and m.info["source"]["file"] == q4.name
    g = layerrun.load(m.folder).generate(PROMPT, max_new_tokens=4, ignore_eos=True)
    assert len(g.token_ids) == 4
    # a file the repo does not have, offline: one line
    r = pull_cli("tinyorg/tiny-gguf:nope.gguf", hf_home=tmp_path / "hf", home=home)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "tinyorg/tiny-gguf:nope.gguf is not in the Hugging Face cache" in r.stderr


def test_offline_and_not_cached_is_one_clear_line(tmp_path, home):
    r = pull_cli("someorg/somemodel", hf_home=tmp_path / "empty-hf", home=home)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: someorg/somemodel is not in the Hugging Face cache (")
    assert "HF_HUB_OFFLINE is set" in r.stderr and r.stderr.count("\n") == 1


def test_gguf_path_is_converted_into_the_store_once(tiny_hf, tmp_path, home, capsys):
    q4 = tiny_gguf_file(tiny_hf, tmp_path, "Q4_0")
    eng = layerrun.load(q4)
    err = capsys.readouterr().err
    assert f"{q4.name}: converting into the model store as 'tiny-q4_0'" in err
    first = eng.generate(PROMPT, max_new_tokens=5, ignore_eos=True).token_ids
    eng.close()
    again = layerrun.load(str(q4))
    assert "converting" not in capsys.readouterr().err  # found by the file's identity
    assert again.generate(PROMPT, max_new_tokens=5, ignore_eos=True).token_ids == first
    assert again.path == store.resolve_name("tiny-q4_0") and store.find("tiny-q4_0").variant == "int4"
    again.close()
    # int4 layers are about a quarter of float32 ones (plus scales)
    fp32 = tmp_path / "fp32"
    from layerrun.formats.convert import convert

    m32 = convert(q4, fp32, dtype="float32", progress=False)
    from layerrun.formats.manifest import Manifest

    m4 = Manifest.read(again.path)
    assert sum(f.bytes for f in m4.layers) < 0.4 * sum(f.bytes for f in m32.layers)


def test_import_variants_and_rm(tiny_hf, tiny_layered, home, capsys):
    assert main(["import", str(tiny_layered("llama_gqa")), "mine"]) == 0
    assert main(["import", str(tiny_hf("llama_gqa")), "mine", "--dtype", "int8", "--quiet"]) == 0
    capsys.readouterr()
    assert store.find("mine").variant == "float32"  # what its source is by default
    assert store.find("mine@int8").variant == "int8"
    with pytest.raises(LayerRunError, match="already in the store"):
        store.import_model(tiny_layered("llama_gqa"), "mine", log=None)
    with pytest.raises(LayerRunError, match="unknown variant 'int3'"):
        store.import_model(tiny_layered("llama_gqa"), "mine@int3", log=None)
    assert main(["rm", "mine@int8"]) == 0
    assert [m["tag"] for m in store.list_models()] == ["mine@float32"]
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "mine" in out and "in all, under" in out
    assert main(["show", "nothere"]) == 1
    assert "nothere: not in the model store" in capsys.readouterr().err


def test_legacy_folders_are_found_and_never_rewritten(tiny_layered, home):
    """A folder written before variants (models/NAME) resolves by its manifest's variant; a pull of another
    variant adds a folder next to it."""
    legacy = home / "models" / "org--tiny"
    shutil.copytree(tiny_layered("llama_gqa"), legacy)
    before = {p.name: p.stat().st_mtime_ns for p in legacy.iterdir()}
    assert store.resolve_name("org/tiny") == legacy == store.resolve_name("org/tiny@float32")
    assert store.resolve_name("org/tiny@int4") is None
    assert {p.name: p.stat().st_mtime_ns for p in legacy.iterdir()} == before


def test_fit_estimate_says_mode_and_stream_speed():
    info = {"name": "org/m", "variant": "bfloat16", "download_bytes": 14e9, "source_bytes": 14e9, "cached": False,
            "source_format": "safetensors",
            "config": {"num_hidden_layers": 32, "hidden_size": 4096, "vocab_size": 32000, "num_attention_heads": 32,
                       "num_key_value_heads": 8, "torch_dtype": "bfloat16", "tie_word_embeddings": False}}
    rate = {"gb_s": 2.0, "date": "2026-01-01"}
    full = fit_lines(info, rate, avail=64 * 2**30)
    assert "13.04 GiB to download" in full[0] and "fits in memory" in full[1]
    part = fit_lines(info, rate, avail=8 * 2**30)
    assert "partial mode, about" in part[1] and "tokens/s" in part[2]
    stream = fit_lines(info, rate, avail=int(2.8 * 2**30))
    assert "runs in stream mode" in stream[1]
    tok_s = float(stream[2].split("about ")[1].split(" tokens/s")[0])
    assert 0.1 < tok_s < 0.2  # 2 GB/s over ~13 GB of layers
    assert "does not fit" in fit_lines(info, rate, avail=200 * 2**20)[1]
    assert "run `layerrun bench io MODEL` once" in fit_lines(info, None, avail=64 * 2**30)[2]


def test_ollama_api_pull_into_the_store(tiny_hf, tiny_layered, tmp_path, home, monkeypatch):
    """POST /api/pull streams the store's progress lines and ends with success (the HF cache, offline)."""
    hub = pytest.importorskip("huggingface_hub.constants")
    httpx = pytest.importorskip("httpx")
    from layerrun.server import running_server

    src = tiny_hf("llama_gqa")
    hf_cache(tmp_path / "hf", "tinyorg/pullme", {p.name: p for p in src.iterdir() if p.is_file()})
    # huggingface_hub reads these at call time (the environment variables only at import)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    eng = layerrun.load(tiny_layered("qwen2"), mode="full")
    with running_server(eng, model_name="tiny") as s:
        with httpx.stream("POST", s.url + "/api/pull", json={"model": "tinyorg/pullme"}, timeout=300) as r:
            lines = [json.loads(x) for x in r.iter_lines() if x]
        bad = httpx.post(s.url + "/api/pull", json={"model": "tinyorg/absent", "stream": False}, timeout=60)
    eng.close()
    assert lines[0] == {"status": "pulling manifest"} and lines[-1]["status"] == "success"
    assert any("storing float32" in x.get("status", "") for x in lines)
    assert Path(lines[-1]["path"]) == store.resolve_name("tinyorg/pullme")
    assert bad.status_code == 400 and "not in the Hugging Face cache" in bad.json()["error"]


def test_estimate_reads_a_local_gguf_header(tiny_hf, tmp_path, home):
    """With the GGUF already here, the estimate counts its tensors: close to what the store then writes."""
    from layerrun.formats.manifest import Manifest
    from layerrun.store_cli import estimate

    q4 = tiny_gguf_file(tiny_hf, tmp_path, "Q4_0")
    e = estimate({"name": "t", "variant": "int4", "source_bytes": q4.stat().st_size, "source_format": "gguf",
                  "local_path": q4})
    m = Manifest.read(store.ensure_gguf(q4, progress=False, log=None))
    layer_tensor_bytes = sum(t.nbytes for f in m.layers for t in f.tensors.values())
    assert e["layers"] == m.num_layers
    assert 0.85 < e["layer_bytes"] / layer_tensor_bytes < 1.15
