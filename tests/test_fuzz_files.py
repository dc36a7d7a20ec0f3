"""A small seeded fuzz pass: damaged headers, manifests and configs never reach the CLI's catch-all.

Each round mutates one file of a tiny model (random byte flips, a truncation, or a JSON value swapped
for a nasty one), runs commands through the CLI's ``main()`` and checks the outcome is either success
or one clear line, never "internal error", a traceback or a crash. Bounded and seeded: the same
mutations every run (set LAYERRUN_FUZZ_ROUNDS to run more locally).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path

import crafted as C
import pytest

ROUNDS = int(os.environ.get("LAYERRUN_FUZZ_ROUNDS", "12"))
NASTY = [-1, 0, 1, 10**12, 2**64, -(2**63), 1.5, float("nan"), True, None, "", "x", "../x", "/etc/passwd",
         [], [0, 0], {}, {"a": 1}, "F8", "I32"]


def run(capsys, *argv) -> tuple[int, str]:
    from layerrun.cli import main

    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out + out.err


def check(rc: int, out: str, what: str) -> None:
    assert "internal error" not in out and "Traceback" not in out, f"{what}:\n{out}"
    if rc != 0:
        errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
        problems = [ln for ln in out.splitlines() if ln.startswith("problem:")]
        assert len(errors) == 1 or (not errors and problems), f"{what}:\n{out}"


def flip_bytes(raw: bytes, rng: random.Random, lo: int, hi: int) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(lo, max(lo + 1, min(hi, len(b))))
        b[i] = rng.randrange(256)
    return bytes(b)


def mutate_json(value, rng: random.Random):
    """``value`` with one randomly chosen leaf (or container) replaced by a nasty value."""
    paths = []

    def walk(v, path):
        paths.append(path)
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, (*path, k))
        elif isinstance(v, list):
            for i, x in enumerate(v[:8]):
                walk(x, (*path, i))

    walk(value, ())
    path = rng.choice(paths[1:] or paths)
    if not path:
        return rng.choice(NASTY)
    parent = value
    for k in path[:-1]:
        parent = parent[k]
    if rng.random() < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = rng.choice(NASTY)
    return value


def damage(raw: bytes, rng: random.Random, header_end: int) -> bytes:
    r = rng.random()
    if r < 0.5:
        return flip_bytes(raw, rng, 0, header_end)
    if r < 0.7:
        return raw[: rng.randrange(0, len(raw))]
    if r < 0.85:
        return flip_bytes(raw, rng, header_end, len(raw))
    return raw[:header_end] + raw[header_end:][::-1]


@pytest.fixture
def layered(tiny_layered, tmp_path) -> Path:
    dst = tmp_path / "m"
    shutil.copytree(tiny_layered("llama_gqa"), dst)
    return dst


def test_fuzz_layered_folder(tiny_layered, tmp_path, capsys):
    rng = random.Random(16)
    base = tiny_layered("llama_gqa")
    for i in range(ROUNDS):
        m = tmp_path / f"m{i}"
        shutil.copytree(base, m)
        target = rng.choice(["manifest", "config", "layer", "tokenizer_config"])
        if target == "manifest":
            d = json.loads((m / "layerrun.json").read_text())
            (m / "layerrun.json").write_text(json.dumps(mutate_json(d, rng)))
        elif target == "config":
            d = json.loads((m / "config.json").read_text())
            (m / "config.json").write_text(json.dumps(mutate_json(d, rng)))
        elif target == "tokenizer_config":
            d = json.loads((m / "tokenizer_config.json").read_text())
            (m / "tokenizer_config.json").write_text(json.dumps(mutate_json(d, rng)))
        else:
            p = m / rng.choice(["embeddings.safetensors", "layer_001.safetensors", "final.safetensors"])
            raw = p.read_bytes()
            (n,) = struct.unpack("<Q", raw[:8])
            p.write_bytes(damage(raw, rng, 8 + n))
        for argv in (["validate", m], ["generate", m, "hello", "--max-new-tokens", "2"], ["inspect", m]):
            check(*run(capsys, *argv), f"round {i} ({target}): {argv[0]}")
        shutil.rmtree(m)


def test_fuzz_hf_safetensors(tiny_hf, tmp_path, capsys):
    rng = random.Random(17)
    base = tiny_hf("llama_gqa")
    for i in range(ROUNDS):
        src = tmp_path / f"hf{i}"
        shutil.copytree(base, src)
        p = src / "model.safetensors"
        header, data = C.read_safetensors(p)
        if rng.random() < 0.6:
            p.write_bytes(C.safetensors_bytes(mutate_json(header, rng), data))
        else:
            raw = p.read_bytes()
            (n,) = struct.unpack("<Q", raw[:8])
            p.write_bytes(damage(raw, rng, 8 + n))
        for argv in (["inspect", src], ["convert", src, tmp_path / f"out{i}", "--quiet"]):
            check(*run(capsys, *argv), f"round {i}: {argv[0]}")
        shutil.rmtree(src)
        shutil.rmtree(tmp_path / f"out{i}", ignore_errors=True)


def test_fuzz_gguf(tiny_hf, tmp_path, capsys):
    rng = random.Random(18)
    kv, tensors = C.tiny_gguf_parts(tiny_hf("llama_gqa"))
    good = C.gguf_bytes(kv, tensors)
    data = sum(-(-a.nbytes // 32) * 32 for _, a in tensors)
    header_end = len(good) - data
    for i in range(2 * ROUNDS):
        p = tmp_path / f"f{i}.gguf"
        p.write_bytes(damage(good, rng, header_end))
        for argv in (["inspect", p], ["convert", p, tmp_path / f"out{i}", "--quiet"]):
            check(*run(capsys, *argv), f"round {i}: {argv[0]}")
        p.unlink()
        shutil.rmtree(tmp_path / f"out{i}", ignore_errors=True)
