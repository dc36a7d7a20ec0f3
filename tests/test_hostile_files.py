"""Hostile and damaged model files through the real CLI: one clear line naming the file, never a crash.

Each case crafts a broken input from a tiny model (tests/crafted.py), runs ``layerrun`` commands on it
and asserts: a non-zero exit, exactly one ``error:`` line (or ``problem:`` lines from ``validate``) that
names the file and says what is wrong, and no "internal error" or traceback. Most run the CLI's
``main()`` in this process; cases that could hang (a FIFO) or need another user run ``python -m
layerrun`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import crafted as C
import numpy as np
import pytest
import torch

import layerrun
from layerrun.errors import FormatError

ROOT = Path(__file__).resolve().parent.parent


def run_cli(capsys, *argv) -> tuple[int, str]:
    from layerrun.cli import main

    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out + out.err


def assert_refused(rc: int, output: str, fragment: str, name: str) -> None:
    assert rc != 0, output
    assert "internal error" not in output and "Traceback" not in output, output
    errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
    problems = [ln for ln in output.splitlines() if ln.startswith("problem:")]
    if errors:
        assert len(errors) == 1, output
        said = errors[0]
    else:
        assert problems, output  # validate lists problems, one line each
        said = "\n".join(problems)
    assert fragment in said, said
    assert name in said, said


# ---- the inputs ----------------------------------------------------------------------------------------


def _symlink_out(folder: Path) -> None:
    """layer_001 replaced by a link to a copy of itself outside the folder (so only the link is wrong)."""
    p = folder.parent / "outside.bin"
    shutil.move(folder / "layer_001.safetensors", p)
    os.symlink(p, folder / "layer_001.safetensors")


def _template(src: str):
    def craft(m: Path) -> None:
        (m / "chat_template.jinja").write_text(src)

    return craft


def _nan_layer(m: Path) -> None:
    p = m / "layer_001.safetensors"
    header, _ = C.read_safetensors(p)
    raw = bytearray(p.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little") + header["mlp.up_proj.weight"]["data_offsets"][0]
    raw[start : start + 4] = np.array([np.nan], dtype=np.float32).tobytes()
    p.write_bytes(bytes(raw))
    C.restamp(m, "layer_001.safetensors")  # the manifest agrees: only the NaN check can catch it


def _id_past_vocab(m: Path) -> None:
    tok = json.loads((m / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": 5000, "content": "<|zz|>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (m / "tokenizer.json").write_text(json.dumps(tok))


def _i32_weight(m: Path) -> None:
    C.edit_manifest(m, lambda d: C.entry(d, "layer_000.safetensors")["tensors"]["mlp.up_proj.weight"]
                    .update(dtype="I32"))


def _overlap(m: Path) -> None:
    def edit(d):
        t = C.entry(d, "layer_000.safetensors")["tensors"]
        a, b = t["mlp.up_proj.weight"], t["mlp.gate_proj.weight"]
        b["offsets"] = [a["offsets"][0] + 4, a["offsets"][1] + 4]

    C.edit_manifest(m, edit)


def _flip(m: Path) -> None:
    p = m / "layer_002.safetensors"
    raw = bytearray(p.read_bytes())
    for i in range(64):
        raw[-100 - i] ^= 0x5A
    p.write_bytes(bytes(raw))


LAYERED = [
    # (id, craft(folder), command, fragment, file named)
    ("name-dotdot", lambda m: C.edit_manifest(m, lambda d: C.entry(d, "layer_001.safetensors").update(name="../x")),
     ["generate", "validate", "inspect"], "may only name plain files", "layerrun.json"),
    ("name-absolute", lambda m: C.edit_manifest(
        m, lambda d: C.entry(d, "layer_001.safetensors").update(name="/etc/passwd")),
     ["generate", "validate"], "contains a path separator", "layerrun.json"),
    ("layer-symlink-out", _symlink_out,
     ["generate", "validate"], "outside the model folder", "layer_001.safetensors"),
    ("layer-is-dir", lambda m: (os.unlink(m / "layer_001.safetensors"), os.mkdir(m / "layer_001.safetensors")),
     ["generate", "validate"], "not a regular file", "layer_001.safetensors"),
    ("manifest-missing-layer", lambda m: C.edit_manifest(
        m, lambda d: d.update(files=[f for f in d["files"] if f["name"] != "layer_002.safetensors"])),
     ["generate", "validate", "inspect"], "no entry for layer_002.safetensors", "layerrun.json"),
    ("manifest-unknown-tensor-dtype", lambda m: C.edit_manifest(
        m, lambda d: C.entry(d, "final.safetensors")["tensors"]["norm.weight"].update(dtype="F8")),
     ["generate", "validate", "inspect"], "unknown dtype 'F8'", "layerrun.json"),
    ("manifest-dtype", lambda m: C.edit_manifest(m, lambda d: d.update(dtype="int8")),
     ["generate", "validate"], "is not a storage dtype", "layerrun.json"),
    ("manifest-float-as-i32", _i32_weight, ["generate", "validate"], "stored as I32", "layerrun.json"),
    ("manifest-1e9-layers", lambda m: C.edit_manifest(m, lambda d: d.update(num_layers=10**9)),
     ["generate", "inspect"], "is not a layer count", "layerrun.json"),
    ("manifest-overlap", _overlap, ["generate", "validate"], "overlap", "layerrun.json"),
    ("manifest-reversed", lambda m: C.edit_manifest(
        m, lambda d: C.entry(d, "final.safetensors")["tensors"]["norm.weight"]["offsets"].reverse()),
     ["generate"], "do not lie inside the file", "layerrun.json"),
    ("manifest-past-end", lambda m: C.edit_manifest(
        m, lambda d: C.entry(d, "final.safetensors").update(bytes=100)),
     ["generate"], "do not lie inside the file", "layerrun.json"),
    ("manifest-list", lambda m: (m / "layerrun.json").write_text("[1, 2]"),
     ["generate", "validate", "inspect"], "must be a JSON object, found an array", "layerrun.json"),
    ("manifest-lacks-bytes", lambda m: C.edit_manifest(m, lambda d: [C.entry(d, "layer_000.safetensors").pop("bytes")]
                                                       and None),
     ["generate"], "entry lacks bytes", "layerrun.json"),
    ("config-list", lambda m: (m / "config.json").write_text("[]"),
     ["generate", "validate", "inspect"], "must be a JSON object", "config.json"),
    ("config-zero-heads", lambda m: C.edit_config(m, num_attention_heads=0),
     ["generate", "validate"], "num_attention_heads=0 is out of range", "config.json"),
    ("config-1e9-hidden", lambda m: C.edit_config(m, hidden_size=10**9),
     ["generate"], "hidden_size=1000000000 is out of range", "config.json"),
    ("config-1e12-context", lambda m: C.edit_config(m, max_position_embeddings=10**12),
     ["generate"], "max_position_embeddings=1000000000000 is out of range", "config.json"),
    ("config-vocab-zero", lambda m: C.edit_config(m, vocab_size=0), ["generate"], "vocab_size=0 is out of range",
     "config.json"),
    ("config-vocab-negative", lambda m: C.edit_config(m, vocab_size=-5), ["generate"], "vocab_size=-5", "config.json"),
    ("config-string-layers", lambda m: C.edit_config(m, num_hidden_layers="3"), ["generate"], "is not an integer",
     "config.json"),
    ("config-disagrees-with-files", lambda m: C.edit_config(m, intermediate_size=96),
     ["generate"], "config implies [96, 64]", "config.json"),
    ("tokenizer-config-list", lambda m: (m / "tokenizer_config.json").write_text('["x"]'),
     ["generate"], "must be a JSON object", "tokenizer_config.json"),
    ("template-syntax", _template("{% for %}"), ["generate"], "syntax error", "chat_template.jinja"),
    ("template-raise", _template("{{ raise_exception('roles must alternate') }}"), ["generate"],
     "refused the messages: roles must alternate", "chat_template.jinja"),
    ("template-security", _template("{{ [].append(1) }}"), ["generate"], "sandbox forbids", "chat_template.jinja"),
    ("template-loops", _template("{% for i in range(99999) %}{% for j in range(99999) %}{{ i }}{% endfor %}"
                                 "{% endfor %}"), ["generate"], "went over its budget", "chat_template.jinja"),
    ("template-repeat", _template("{{ 'a' * 10**10 }}"), ["generate"], "went over its budget", "chat_template.jinja"),
    ("token-id-past-vocab", lambda m: (_id_past_vocab(m), _template("<|zz|>{{ messages[0].content }}")(m)),
     ["generate"], "the tokenizer produced token id", "tokenizer.json"),
    ("layer-corrupt", _flip, ["generate"], "the file is corrupt", "layer_002.safetensors"),
    ("layer-nan", _nan_layer, ["generate", "validate"], "NaN/Inf", "layer_001.safetensors"),
    ("layer-truncated", lambda m: os.truncate(m / "layer_000.safetensors", 5000), ["generate", "validate"],
     "truncated", "layer_000.safetensors"),
]


def _hf_header(edit):
    def craft(src: Path) -> None:
        C.rewrite_header(src / "model.safetensors", edit)

    return craft


def _first(h: dict) -> str:
    return next(k for k in h if k != "__metadata__")


def _set(h: dict, name: str, **kw) -> dict:
    h[name].update(kw)
    return h


def _hf_overlap(h: dict) -> dict:
    a, b = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"
    h[b]["data_offsets"] = [h[a]["data_offsets"][0] + 4, h[a]["data_offsets"][1] + 4]
    return h


def _hf_index(weight_map):
    def craft(src: Path) -> None:
        (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    return craft


def _hf_nan(src: Path) -> None:
    from safetensors.torch import load_file, save_file

    w = load_file(src / "model.safetensors")
    w["model.layers.1.mlp.down_proj.weight"][3, 3] = float("inf")
    save_file(w, src / "model.safetensors", metadata={"format": "pt"})


def _hf_shard_out(src: Path) -> None:
    shutil.move(src / "model.safetensors", src.parent / "elsewhere.safetensors")
    os.symlink(src.parent / "elsewhere.safetensors", src / "model.safetensors")


HF = [
    ("header-list", lambda s: (s / "model.safetensors").write_bytes(C.safetensors_bytes([1, 2, 3])),
     ["inspect", "convert"], "header must be a JSON object", "model.safetensors"),
    ("header-no-offsets", _hf_header(lambda h: (h[_first(h)].pop("data_offsets"), h)[1]),
     ["inspect", "convert"], "lacks data_offsets", "model.safetensors"),
    ("header-reversed", _hf_header(lambda h: (h[_first(h)]["data_offsets"].reverse(), h)[1]),
     ["inspect", "convert"], "reversed", "model.safetensors"),
    ("header-overlap", _hf_header(_hf_overlap), ["inspect", "convert"], "overlap", "model.safetensors"),
    ("header-past-end", _hf_header(lambda h: _set(h, "lm_head.weight", data_offsets=[10**9, 10**9 + 81920])),
     ["inspect", "convert"], "runs past the end of the file", "model.safetensors"),
    ("header-length-huge", lambda s: (s / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}"),
     ["inspect", "convert"], "runs past the end of the file", "model.safetensors"),
    ("header-not-json", lambda s: (s / "model.safetensors").write_bytes(C.safetensors_bytes(b"{not json")),
     ["inspect", "convert"], "not valid JSON", "model.safetensors"),
    ("header-bad-shape", _hf_header(lambda h: _set(h, "lm_head.weight", shape=[-1, 5])),
     ["inspect", "convert"], "is not a list of at most", "model.safetensors"),
    ("header-float-as-i32", _hf_header(lambda h: _set(h, "model.layers.0.mlp.up_proj.weight", dtype="I32")),
     ["convert"], "must be floating point", "model.layers.0.mlp.up_proj.weight"),
    ("weights-inf", _hf_nan, ["convert"], "NaN/Inf", "model.layers.1.mlp.down_proj.weight"),
    ("index-dotdot", _hf_index({"lm_head.weight": "../model.safetensors"}), ["inspect", "convert"],
     "may only name plain files", "model.safetensors.index.json"),
    ("index-absolute", _hf_index({"lm_head.weight": "/etc/passwd"}), ["inspect", "convert"],
     "path separator", "model.safetensors.index.json"),
    ("index-not-a-map", _hf_index(["model.safetensors"]), ["inspect", "convert"],
     "weight_map must map", "model.safetensors.index.json"),
    ("shard-symlink-out", _hf_shard_out, ["inspect", "convert"], "outside the model folder", "model.safetensors"),
    ("hf-config-list", lambda s: (s / "config.json").write_text("[1]"), ["inspect", "convert"],
     "must be a JSON object", "config.json"),
    ("hf-config-zero-heads", lambda s: C.edit_config(s, num_attention_heads=0), ["convert"],
     "num_attention_heads=0 is out of range", "config.json"),
    ("hf-tokenizer-config-list", lambda s: (s / "tokenizer_config.json").write_text("[]"), ["inspect"],
     "must be a JSON object", "tokenizer_config.json"),
]


def _gguf(edit_kv=None, **kw):
    def craft(folder: Path, kv, tensors) -> Path:
        kv = edit_kv(kv) if edit_kv else kv
        p = folder / "m.gguf"
        p.write_bytes(C.gguf_bytes(kv, tensors, **kw))
        return p

    return craft


def _dup_tensor(folder: Path, kv, tensors) -> Path:
    p = folder / "m.gguf"
    p.write_bytes(C.gguf_bytes(kv, tensors + [tensors[0]]))
    return p


def _nested(kv):
    deep = (C.U32, [1])
    for _ in range(40):
        deep = (C.ARRAY, [deep])
    return [*kv, ("x.nested", C.ARRAY, deep)]


def _misaligned(folder: Path, kv, tensors) -> Path:
    """general.alignment says 64, the data is laid out at 32, and the header ends where the two differ."""
    for k in range(64):
        meta = C.replace_kv(kv, "general.alignment", C.U32, 64) + [("x.pad", C.STRING, "a" * k)]
        raw = C.gguf_bytes(meta, tensors, data_align=32)
        data_start = len(raw) - sum(-(-np.asarray(a).nbytes // 32) * 32 for _, a in tensors)
        if data_start % 64:
            p = folder / "m.gguf"
            p.write_bytes(raw)
            return p
    raise AssertionError("no padding put the header at an odd multiple of 32")


GGUF = [
    ("alignment-zero", _gguf(lambda kv: C.replace_kv(kv, "general.alignment", C.U32, 0)), ["inspect", "convert"],
     "general.alignment 0 is not a power of two", "m.gguf"),
    ("alignment-mismatch", _misaligned, ["inspect", "convert"], "does not match how", "m.gguf"),
    ("nested-arrays", _gguf(_nested), ["inspect", "convert"], "nested", "m.gguf"),
    ("no-head-count", _gguf(lambda kv: C.replace_kv(kv, "llama.attention.head_count")), ["convert"],
     "llama.attention.head_count is missing", "m.gguf"),
    ("string-block-count", _gguf(lambda kv: C.replace_kv(kv, "llama.block_count", C.STRING, "abc")), ["convert"],
     "llama.block_count is 'abc', not a positive integer", "m.gguf"),
    ("zero-heads", _gguf(lambda kv: C.replace_kv(kv, "llama.attention.head_count", C.U32, 0)), ["convert"],
     "llama.attention.head_count is 0", "m.gguf"),
    ("duplicate-tensor", _dup_tensor, ["inspect", "convert"], "appears twice", "m.gguf"),
    ("kv-count-huge", _gguf(n_kv=2**60), ["inspect", "convert"], "more than", "m.gguf"),
    ("tokens-not-strings", _gguf(lambda kv: [*kv, ("tokenizer.ggml.model", C.STRING, "gpt2"),
                                             ("tokenizer.ggml.tokens", C.ARRAY, (C.U32, [1, 2, 3]))]),
     ["convert"], "tokenizer.ggml.tokens is not a list of strings", "m.gguf"),
    ("five-dims", _gguf(dims={"output_norm.weight": [4, 4, 4, 1, 1]}), ["inspect", "convert"],
     "dimensions", "m.gguf"),
]


# ---- the tests ----------------------------------------------------------------------------------------


@pytest.fixture
def layered(tiny_layered, tmp_path) -> Path:
    dst = tmp_path / "m"
    shutil.copytree(tiny_layered("llama_gqa"), dst)
    return dst


@pytest.fixture
def hf(tiny_hf, tmp_path) -> Path:
    dst = tmp_path / "hf"
    shutil.copytree(tiny_hf("llama_gqa"), dst)
    return dst


def _command(cmd: str, path: Path, tmp_path: Path) -> list:
    return {
        "generate": ["generate", path, "hello", "--max-new-tokens", "2"],
        "validate": ["validate", path],
        "inspect": ["inspect", path],
        "convert": ["convert", path, tmp_path / "out", "--quiet"],
    }[cmd]


@pytest.mark.parametrize("case", LAYERED, ids=[c[0] for c in LAYERED])
def test_layered_folder_refused_in_one_line(case, layered, tmp_path, capsys):
    _, craft, commands, fragment, name = case
    craft(layered)
    for cmd in commands:
        rc, out = run_cli(capsys, *_command(cmd, layered, tmp_path))
        assert_refused(rc, out, fragment, name)


@pytest.mark.parametrize("case", HF, ids=[c[0] for c in HF])
def test_hf_folder_refused_in_one_line(case, hf, tmp_path, capsys):
    _, craft, commands, fragment, name = case
    craft(hf)
    for cmd in commands:
        rc, out = run_cli(capsys, *_command(cmd, hf, tmp_path))
        assert_refused(rc, out, fragment, name)
        assert not (tmp_path / "out" / "layerrun.json").exists()


@pytest.fixture(scope="module")
def gguf_parts(tiny_hf):
    return C.tiny_gguf_parts(tiny_hf("llama_gqa"))


def test_crafted_gguf_baseline_converts(gguf_parts, tmp_path, capsys):
    """The untouched crafted file is valid: each GGUF case below breaks exactly one thing."""
    p = _gguf()(tmp_path, *gguf_parts)
    rc, out = run_cli(capsys, "convert", p, tmp_path / "out", "--quiet")
    assert rc == 0, out
    assert layerrun.load(tmp_path / "out").logits([[1, 2, 3]]).shape == (1, 3, 320)


@pytest.mark.parametrize("case", GGUF, ids=[c[0] for c in GGUF])
def test_gguf_refused_in_one_line(case, gguf_parts, tmp_path, capsys):
    _, craft, commands, fragment, name = case
    p = craft(tmp_path, *gguf_parts)
    for cmd in commands:
        rc, out = run_cli(capsys, *_command(cmd, p, tmp_path))
        assert_refused(rc, out, fragment, name)


# ---- things that could hang, or need another user: a real subprocess ------------------------------


def run_subprocess(*argv, user: int | None = None, timeout: int = 300) -> tuple[int, str]:
    """``python -m layerrun ...``; the timeout only guards against a hang (it is not a speed bound)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "layerrun", *map(str, argv)], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=ROOT, user=user)
    return p.returncode, p.stdout + p.stderr


def test_fifo_and_device_files_never_block(layered, hf, gguf_parts, tmp_path):
    C.make_fifo(layered / "layer_001.safetensors")
    rc, out = run_subprocess("generate", layered, "hello", "--max-new-tokens", "2")
    assert_refused(rc, out, "is a FIFO (named pipe), not a regular file", "layer_001.safetensors")
    C.make_fifo(hf / "tokenizer.json")
    rc, out = run_subprocess("convert", hf, tmp_path / "out", "--quiet")
    assert_refused(rc, out, "FIFO", "tokenizer.json")
    C.make_fifo(tmp_path / "pipe.gguf")
    rc, out = run_subprocess("inspect", tmp_path / "pipe.gguf")
    assert_refused(rc, out, "FIFO", "pipe.gguf")
    os.unlink(layered / "layer_001.safetensors")
    try:
        os.mknod(layered / "layer_001.safetensors", 0o600 | 0o020000, os.makedev(1, 5))  # /dev/zero's numbers
    except PermissionError:
        return
    rc, out = run_subprocess("generate", layered, "hello", "--max-new-tokens", "2")
    assert_refused(rc, out, "character device", "layer_001.safetensors")


def run_as_nobody(capsys, *argv) -> tuple[int, str]:
    """The CLI's main() in a forked child that dropped to user nobody (root reads every file): the
    interpreter and the package are already loaded, so no file outside the model is needed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        rc = 99
        try:
            os.dup2(w, 1)
            os.dup2(w, 2)
            os.setgid(65534)
            os.setuid(65534)
            from layerrun.cli import main

            sys.stdout = sys.stderr = os.fdopen(w, "w", buffering=1)
            rc = main([str(x) for x in argv])
            sys.stdout.flush()
        finally:
            os._exit(rc)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_unreadable_files_are_one_line(tiny_layered, capsys):
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="layerrun-perm-"))
    try:
        m = base / "m"
        shutil.copytree(tiny_layered("llama_gqa"), m)
        for p in [base, *base.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.chmod(m / "layer_001.safetensors", 0o600)
        rc, out = run_as_nobody(capsys, "validate", m, "--no-checksum")
        assert_refused(rc, out, "permission denied", "layer_001.safetensors")
        os.chmod(m / "config.json", 0o600)
        rc, out = run_as_nobody(capsys, "inspect", m)
        assert_refused(rc, out, "permission denied", "config.json")
    finally:
        shutil.rmtree(base)


# ---- integrity: hash on first read, stamp, --no-verify ------------------------------------------------


def test_first_run_hashes_later_runs_trust_the_stamp(layered):
    from layerrun.formats.integrity import STAMP_NAME

    (layered / STAMP_NAME).unlink(missing_ok=True)
    eng = layerrun.load(layered, mode="stream", reader="pread")
    want = eng.logits([[1, 2, 3]])
    assert eng.verifier.hashed_bytes == sum(f.bytes for f in eng.manifest.files)  # every file, once
    eng.logits([[4, 5]])
    assert eng.verifier.hashed_bytes == sum(f.bytes for f in eng.manifest.files)  # not again in this process
    eng.close()
    assert (layered / STAMP_NAME).is_file()
    eng = layerrun.load(layered, mode="stream", reader="pread")
    assert torch.equal(eng.logits([[1, 2, 3]]), want)
    assert eng.verifier.hashed_bytes == 0  # the stamp vouches for every file
    eng.close()
    os.utime(layered / "layer_001.safetensors")  # a changed file is hashed again
    eng = layerrun.load(layered, mode="full")
    assert eng.verifier.hashed_bytes == (layered / "layer_001.safetensors").stat().st_size
    eng.close()


def test_stamp_falls_back_when_the_folder_cannot_take_it(layered, tmp_path, monkeypatch):
    from layerrun.formats.integrity import STAMP_NAME

    monkeypatch.setenv("LAYERRUN_HOME", str(tmp_path / "home"))
    (layered / STAMP_NAME).unlink(missing_ok=True)
    (layered / STAMP_NAME).mkdir()  # the stamp's place cannot be written (as a read-only folder)
    layerrun.load(layered, mode="full").close()
    assert list((tmp_path / "home" / "verified").glob("*.json"))
    eng = layerrun.load(layered, mode="full")
    assert eng.verifier.hashed_bytes == 0
    eng.close()
    (tmp_path / "home").chmod(0o500)
    shutil.rmtree(tmp_path / "home")
    (tmp_path / "home").write_text("not a folder")  # nowhere to write: every run just hashes again
    eng = layerrun.load(layered, mode="full")
    assert eng.verifier.hashed_bytes > 0
    eng.close()


def test_damaged_stamp_is_ignored(layered):
    from layerrun.formats.integrity import STAMP_NAME

    (layered / STAMP_NAME).write_text('{"format": "layerrun-verified-v1", "files": [1, 2')
    eng = layerrun.load(layered, mode="full")
    assert eng.verifier.hashed_bytes > 0
    eng.close()


def test_stamp_cannot_vouch_for_changed_bytes(layered):
    """A file rewritten in place with its old identity (mtime restored) but a new manifest hash: the stamp's
    recorded sha256 no longer matches the manifest's, so the file is hashed again."""
    layerrun.load(layered, mode="full").close()
    _flip(layered)
    C.restamp(layered, "layer_002.safetensors")
    eng = layerrun.load(layered, mode="full")
    assert eng.verifier.hashed_bytes == (layered / "layer_002.safetensors").stat().st_size
    eng.close()


@pytest.mark.parametrize("mode,reader", [("stream", "pread"), ("stream", "mmap"), ("full", "pread")])
def test_corruption_is_caught_before_use_in_every_reader(layered, mode, reader):
    _flip(layered)
    with pytest.raises(FormatError, match="layer_002.safetensors: the file is corrupt"):
        layerrun.load(layered, mode=mode, reader=reader).generate([1, 2, 3], max_new_tokens=2)
    g = layerrun.load(layered, mode=mode, reader=reader, verify=False).generate([1, 2, 3], max_new_tokens=2)
    assert len(g.token_ids) >= 1  # --no-verify: the user's call


def test_nan_weights_name_the_layer_with_and_without_verify(layered):
    _nan_layer(layered)
    with pytest.raises(FormatError, match=r"layer_001.safetensors: tensor mlp.up_proj.weight holds 1 NaN/Inf"):
        layerrun.load(layered, mode="stream").generate([1, 2, 3], max_new_tokens=2)
    eng = layerrun.load(layered, mode="stream", verify=False)
    with pytest.raises(FormatError, match=r"output became NaN/Inf because of its layer 1: .*mlp.up_proj.weight"):
        eng.generate([1, 2, 3], max_new_tokens=2, temperature=0.7)  # never reaches the sampler


def test_resumed_conversion_rechecks_what_it_did_not_write(tiny_hf, tmp_path, monkeypatch):
    import layerrun.formats.convert as conv
    from layerrun.formats.validate import validate_folder

    src, dst = tiny_hf("llama_gqa"), tmp_path / "o"
    real = conv.write_aligned
    calls = {"n": 0}

    def dying(path, tensors, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(path, tensors, **kw)

    monkeypatch.setattr(conv, "write_aligned", dying)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(src, dst, progress=False)
    monkeypatch.setattr(conv, "write_aligned", real)
    raw = bytearray((dst / "layer_000.safetensors").read_bytes())
    raw[-1] ^= 1  # damaged between the runs; size unchanged
    (dst / "layer_000.safetensors").write_bytes(bytes(raw))
    logs = []
    conv.convert(src, dst, progress=False, log=logs.append)
    assert any("layer_000.safetensors: changed since the interrupted run" in s for s in logs)
    assert validate_folder(dst) == []


# ---- convert's destination ---------------------------------------------------------------------------


def test_convert_into_itself_is_refused(hf, capsys):
    rc, out = run_cli(capsys, "convert", hf, hf, "--force", "--quiet")
    assert_refused(rc, out, "the destination is the source itself", str(hf))


def test_force_overwrites_only_what_convert_wrote(tiny_hf, tmp_path, capsys):
    dst = tmp_path / "o"
    dst.mkdir()
    (dst / "config.json").write_text('{"mine": true}')
    (dst / "notes.txt").write_text("mine")
    rc, out = run_cli(capsys, "convert", tiny_hf("llama_gqa"), dst, "--force", "--quiet")
    assert_refused(rc, out, "holds config.json, which layerrun did not write", str(dst))
    assert json.loads((dst / "config.json").read_text()) == {"mine": True}
    (dst / "config.json").unlink()
    rc, out = run_cli(capsys, "convert", tiny_hf("llama_gqa"), dst, "--force", "--quiet")
    assert rc == 0, out
    assert (dst / "notes.txt").read_text() == "mine"  # a file convert does not write is left alone
    # Over its own earlier output, --force replaces it and removes its stale files.
    (dst / "layer_007.safetensors").write_bytes(b"")
    from layerrun.formats.manifest import Manifest

    C.edit_manifest(dst, lambda d: d["aux_files"].append("layer_007.safetensors"))
    rc, out = run_cli(capsys, "convert", tiny_hf("llama_gqa"), dst, "--force", "--quiet")
    assert rc == 0, out
    assert not (dst / "layer_007.safetensors").exists() and (dst / "notes.txt").exists()
    assert Manifest.read(dst).num_layers == 3
    # A manifest from before manifests listed their tokenizer and config files: those are still its own.
    C.edit_manifest(dst, lambda d: d.pop("aux_files") and None)
    rc, out = run_cli(capsys, "convert", tiny_hf("llama_gqa"), dst, "--force", "--quiet")
    assert rc == 0, out


def test_second_conversion_is_told_who_holds_the_folder(tiny_hf, tmp_path, capsys):
    from layerrun.formats.destination import LOCK_NAME, ConvertLock

    dst = tmp_path / "o"
    dst.mkdir()
    with ConvertLock(dst):
        rc, out = run_cli(capsys, "convert", tiny_hf("llama_gqa"), dst, "--quiet")
        assert_refused(rc, out, f"another conversion (pid {os.getpid()}) is writing into this folder", str(dst))
    (dst / LOCK_NAME).write_text("999999999\n")  # left by a process that died: not held, taken over
    rc, out = run_cli(capsys, "convert", tiny_hf("llama_gqa"), dst, "--quiet")
    assert rc == 0, out
    assert not (dst / LOCK_NAME).exists()


def _unshare_tmpfs(options: str, mnt: Path, *argv) -> tuple[int, str] | None:
    """Run ``python -m layerrun ARGV`` with a fresh tmpfs (``options``) mounted on ``mnt``, in a private
    mount namespace; None where that is not possible here."""
    if shutil.which("unshare") is None:
        return None
    mnt.mkdir(parents=True, exist_ok=True)
    cmd = (f"mount -t tmpfs -o {options} none {mnt} && PYTHONPATH={ROOT} {sys.executable} -m layerrun "
           + " ".join(f"'{a}'" for a in argv))
    try:
        p = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", cmd],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    if "mount:" in p.stderr or "unshare:" in p.stderr:
        return None
    return p.returncode, p.stdout + p.stderr


def test_not_enough_space_is_said_before_starting(tiny_hf, tmp_path):
    got = _unshare_tmpfs("size=256k", tmp_path / "small", "convert", tiny_hf("llama_gqa"), tmp_path / "small" / "out",
                         "--quiet")
    if got is None:
        pytest.skip("no private mount namespace here")
    assert_refused(*got, "not enough free disk space: this conversion writes about", "small/out")


def test_disk_full_while_writing_names_the_folder(tiny_hf, tmp_path):
    # Room for the bytes, but for only a few files: the filesystem says ENOSPC part way.
    got = _unshare_tmpfs("size=64m,nr_inodes=6", tmp_path / "few", "convert", tiny_hf("llama_gqa"),
                         tmp_path / "few" / "out", "--quiet")
    if got is None:
        pytest.skip("no private mount namespace here")
    assert_refused(*got, "the disk is full (while writing", "few/out")
    assert "it resumes where it stopped" in got[1]


# ---- chat templates: the budget ------------------------------------------------------------------------


@pytest.mark.parametrize("src,fragment", [
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "s of CPU time"),
    ("{% set ns = namespace(x='ab') %}{% for i in range(64) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x }}",
     "a concatenation (~) would build"),
    ("{{ 'x'|center(10**10) }}", "the center filter would build"),
    ("{{ 'x'.ljust(10**10) }}", "str.ljust would build"),
    ("{{ 10 ** (10 ** 10) }}", "a power (**)"),
    ("{{ '{:>999999999}'.format(1) }}", "field width"),
    ("{% for i in range(99999) %}{{ 'x' * 1000 }}{% endfor %}", "its output passed"),
    ("{% set ns = namespace(l=[]) %}{% for i in range(99999) %}{% set ns.l = ns.l + ['x' * 4000000] %}{% endfor %}",
     "characters in all"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed too deeply"),
])
def test_template_budget_gives_a_clear_error(layered, src, fragment):
    """Templates that would take minutes or gigabytes stop with one error naming the template (no time bound
    is asserted: the budget is CPU time, which a busy machine does not eat)."""
    from layerrun.engine.template import TemplateFailed
    from layerrun.engine.tokenizer import Tokenizer

    (layered / "chat_template.jinja").write_text(src)
    with pytest.raises(TemplateFailed) as e:
        Tokenizer(layered).apply_chat_template([{"role": "user", "content": "hi"}])
    assert str(e.value).startswith(f"{layered / 'chat_template.jinja'}: the chat template")
    assert fragment in str(e.value)


def test_budgeted_render_equals_plain_jinja(layered):
    """The budget changes nothing for a real template: the same prompt as transformers' sandbox renders."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from layerrun.engine.tokenizer import Tokenizer

    tok = Tokenizer(layered)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Why is the sky blue?" * 50}]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    want = env.from_string(tok.chat_template).render(messages=msgs, add_generation_prompt=True, eos_token="<|im_end|>")
    assert tok.apply_chat_template(msgs) == want


def test_partial_reads_check_the_whole_file_a_chunk_at_a_time(layered):
    """Reading some tensors of a file (a MoE layer's resident attention) still checks all of it first."""
    from layerrun.formats.integrity import STAMP_NAME, Verifier
    from layerrun.formats.manifest import Manifest
    from layerrun.io.reader import FileReader

    (layered / STAMP_NAME).unlink(missing_ok=True)
    m = Manifest.read(layered)
    r = FileReader(layered, "pread", Verifier(layered))
    w, _ = r.read_tensors(m.layer(0), ["input_layernorm.weight"])
    assert set(w) == {"input_layernorm.weight"} and r.verifier.hashed_bytes == m.layer(0).bytes
    _flip(layered)
    with pytest.raises(FormatError, match="layer_002.safetensors: the file is corrupt"):
        r.read_tensors(m.layer(2), ["input_layernorm.weight"])
    _nan_layer(layered)
    m = Manifest.read(layered)
    with pytest.raises(FormatError, match="layer_001.safetensors: tensor mlp.up_proj.weight holds 1 NaN/Inf"):
        FileReader(layered, "pread", Verifier(layered)).read_tensors(m.layer(1), ["input_layernorm.weight"])


def test_extreme_sampling_values_never_reach_the_sampler_as_nan(layered):
    """A repetition penalty the API allows (any > 0) can overflow a logit; it samples, not crashes."""
    eng = layerrun.load(layered, mode="full")
    g = eng.generate([1, 2, 3, 4], max_new_tokens=3, temperature=0.01, repetition_penalty=5e-324, ignore_eos=True)
    assert len(g.token_ids) == 3
    g = eng.generate([1, 2, 3, 4], max_new_tokens=3, temperature=1.0, repetition_penalty=5e-324, ignore_eos=True)
    assert len(g.token_ids) == 3
