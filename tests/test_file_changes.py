"""Model files that change under a running server (`layerrun serve` in a subprocess, real HTTP on loopback).

A layer file truncated while the server streams from it used to kill the process with SIGBUS (a
mapped page past the file's new end). Now: the request that needs the file fails with an
OpenAI-shaped error naming it, /health says what is wrong, the server stays up, and once the file
is restored requests succeed again with the same tokens. A file replaced by one with other bytes is
refused, never used. Every reader: mmap (lease-guarded mappings), pread and O_DIRECT.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()

PROMPT = [5, 17, 42, 7, 99, 3]
LAYER = "layer_001.safetensors"


class Server:
    def __init__(self, folder: Path, reader: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "layerrun", "serve", str(folder), "--port", str(self.port), "--mode", "stream",
               "--reader", reader, "--prefetch", "1", "--batch-size", "4", "--log-level", "warning"]
        self.log = open(folder.parent / f"server-{reader}.log", "w+")
        self.p = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "LAYERRUN_API_KEY": ""})

    def up(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=5).status_code in (200, 503)
        except httpx.TransportError:
            return False

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def alive(self) -> bool:
        return self.p.poll() is None

    def complete(self, **kw) -> httpx.Response:
        body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "return_token_ids": True, **kw}
        return httpx.post(self.url + "/v1/completions", json=body, timeout=120)

    def tokens(self) -> list[int]:
        r = self.complete()
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    def stop(self) -> None:
        if self.alive():
            self.p.send_signal(signal.SIGINT)
            try:
                self.p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.p.kill()
        self.log.close()


@pytest.fixture(scope="module", params=["mmap", "pread", "direct"])
def server(request, tiny_layered, tmp_path_factory):
    """One server per reader for the module; each test leaves the model files as it found them."""
    folder = tmp_path_factory.mktemp(f"changes-{request.param}") / "model"
    shutil.copytree(tiny_layered("qwen2"), folder)
    s = Server(folder, request.param)
    try:
        assert wait_for(lambda: s.up() or not s.alive(), timeout=300), "the server did not come up"
        assert s.alive(), s.output()
        yield s, folder, request.param
    finally:
        s.stop()


@pytest.fixture
def served(server):
    s, folder, reader = server
    path = folder / LAYER
    original = path.read_bytes()
    yield s, folder, reader
    if path.read_bytes() != original:  # a failed test: put it back for the next one
        (folder / "restore").write_bytes(original)
        os.replace(folder / "restore", path)


def _check_refused(r: httpx.Response, path: Path, what: str) -> None:
    """A request that needs a changed file: 500 (found while running) or 503 (known, checked again), naming it."""
    assert r.status_code in (500, 503), r.text
    err = r.json()["error"]
    assert err["code"] == "model_file_changed"
    assert str(path) in err["message"] and what in err["message"], err["message"]


def _health(s: Server) -> tuple[int, dict]:
    r = httpx.get(s.url + "/health", timeout=60)
    return r.status_code, r.json()


def _mapped(pid: int, path: Path) -> bool:
    return str(path) in Path(f"/proc/{pid}/maps").read_text()


def test_truncated_then_restored_layer(served):
    s, folder, reader = served
    path = folder / LAYER
    want = s.tokens()
    if reader == "mmap":
        assert _mapped(s.p.pid, path), "the server was to stream this layer from a mapping"
    original = path.read_bytes()

    os.truncate(path, 4096)  # the mmap server holds a lease: this waits until it lets go of the pages
    _check_refused(s.complete(), path, "truncated to 4096 bytes")
    assert s.alive(), s.output()
    status, body = _health(s)
    assert status == 503 and body["status"] == "model_file_changed"
    assert LAYER in body["files"] and "truncated to 4096 bytes" in body["files"][LAYER]
    _check_refused(s.complete(), path, "truncated")  # still damaged: refused again, checked again

    with open(path, "r+b") as f:  # restored in place (the same inode, new contents)
        f.write(original)
    assert _health(s) == (200, {"status": "ok"})
    assert s.tokens() == want
    assert s.alive()


def test_replaced_layer_is_refused_not_used(served):
    s, folder, _ = served
    path = folder / LAYER
    want = s.tokens()
    original = path.read_bytes()
    other = bytearray(original)
    other[-64:] = bytes(64)  # same size, other bytes: only the sha256 tells
    (folder / "new").write_bytes(other)
    os.replace(folder / "new", path)  # a new inode at the path
    r = s.complete()
    assert r.status_code != 200, "a replaced model file must not silently give other output"
    _check_refused(r, path, "sha256")
    status, body = _health(s)
    assert status == 503 and "sha256" in body["files"][LAYER]
    (folder / "new").write_bytes(original)
    os.replace(folder / "new", path)  # the original bytes back, yet another inode: checked, and used
    assert s.tokens() == want
    assert _health(s)[0] == 200


def test_truncated_while_streaming(served):
    """The case that killed the server: the file shrinks while a streaming request is reading it."""
    s, folder, _ = served
    path = folder / LAYER
    want = s.tokens()
    original = path.read_bytes()
    body = {"prompt": PROMPT, "max_tokens": 240, "temperature": 0, "ignore_eos": True, "stream": True}
    events, truncated = [], threading.Event()
    with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 3:
                os.truncate(path, len(original) // 2)
                truncated.set()
    assert truncated.is_set()
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert "error" in last, f"the stream ended without an error after {len(events)} events: {last}"
    assert last["error"]["code"] == "model_file_changed" and str(path) in last["error"]["message"]
    assert s.alive(), s.output()
    assert _health(s)[0] == 503
    path.write_bytes(original)  # O_TRUNC then write: the same inode
    assert s.tokens() == want
    assert _health(s)[0] == 200


def test_mapped_embeddings_truncated_under_the_engine(tiny_layered, tmp_path):
    """A bfloat16 tied head packs its own copy and leaves the embeddings a memory map of their file (the
    speed branch's choice): that map is lease-guarded too, so a truncated embeddings file is an error
    naming it, never SIGBUS, and the restored file is used again with the same tokens."""
    import layerrun
    from layerrun.errors import FileChangedError

    folder = tmp_path / "model"
    shutil.copytree(tiny_layered("qwen2_bf16"), folder)
    with layerrun.load(folder, mode="full") as eng:
        if eng._emb_map is None:
            pytest.skip("no oneDNN bfloat16 kernel here: the embeddings are a private copy, nothing is mapped")
        path = folder / eng.manifest.embeddings.name
        assert _mapped(os.getpid(), path)
        want = eng.generate(PROMPT, max_new_tokens=4, ignore_eos=True).token_ids
        original = path.read_bytes()
        os.truncate(path, 4096)  # waits (at most a poll) for the engine to let go of the lease
        with pytest.raises(FileChangedError, match=r"truncated to 4096 bytes") as e:
            eng.generate(PROMPT, max_new_tokens=4, ignore_eos=True)
        assert str(path) in str(e.value)
        assert eng.file_problems()
        with open(path, "r+b") as f:  # restored in place
            f.write(original)
        assert eng.recheck_files() == {}
        assert eng.generate(PROMPT, max_new_tokens=4, ignore_eos=True).token_ids == want


def test_file_found_corrupt_in_a_step_is_named_and_reported(tiny_layered, tmp_path):
    """A layer file corrupt from the start (same size, other bytes) is found by the integrity check when
    the server first stages it, inside a step: the request gets an OpenAI-shaped error naming the file
    (not "internal error"), /health reports it, requests get 503 while it stays so, and a good copy put
    in its place is picked up."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_layered("qwen2"), folder)
    path = folder / LAYER
    original = path.read_bytes()
    raw = bytearray(original)
    for i in range(64):
        raw[-100 - i] ^= 0x5A
    path.write_bytes(bytes(raw))
    s = Server(folder, "pread")
    try:
        assert wait_for(lambda: s.up() or not s.alive(), timeout=300), "the server did not come up"
        assert s.alive(), s.output()
        r = s.complete()
        assert r.status_code in (500, 503), r.text
        err = r.json()["error"]
        assert err["code"] in ("model_file_error", "model_file_changed"), err
        assert str(path) in err["message"] and "corrupt" in err["message"], err["message"]
        assert "internal error" not in err["message"]
        status, body = _health(s)
        assert status == 503 and LAYER in body["files"] and "corrupt" in body["files"][LAYER]
        r = s.complete()
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_file_changed"
        (folder / "good").write_bytes(original)
        os.replace(folder / "good", path)  # a good copy: another inode, hashed against the manifest
        assert _health(s) == (200, {"status": "ok"})
        assert len(s.tokens()) == 12
        assert s.alive()
    finally:
        s.stop()


def test_mapped_layers_prepared_once_and_again_after_a_change(tiny_layered, tmp_path):
    """mmap stream mode keeps a layer's prepared views while its file keeps its mapping (no per-layer
    Python work in a warm step), and builds them again when the file is replaced: same tokens throughout."""
    import layerrun

    dst = tmp_path / "model"
    shutil.copytree(tiny_layered("llama_gqa"), dst)
    with layerrun.load(dst, mode="full") as ref:
        want = ref.generate(PROMPT, max_new_tokens=6, ignore_eos=True).token_ids
    with layerrun.load(dst, mode="stream", reader="mmap", prefetch=1) as eng:
        assert eng.generate(PROMPT, max_new_tokens=6, ignore_eos=True).token_ids == want
        first = {k: v[1] for k, v in eng._stream._prepared.items()}
        assert len(first) == eng.args.num_hidden_layers  # every layer's views kept
        assert eng.generate(PROMPT, max_new_tokens=6, ignore_eos=True).token_ids == want
        assert all(eng._stream._prepared[k][1] is w for k, w in first.items())  # reused, not rebuilt
        copy = tmp_path / "copy.safetensors"
        shutil.copy(dst / LAYER, copy)
        os.replace(copy, dst / LAYER)  # the same bytes in a new file: mapped anew
        assert eng.generate(PROMPT, max_new_tokens=6, ignore_eos=True).token_ids == want
        rebuilt = [k for k, w in first.items() if eng._stream._prepared[k][1] is not w]
        assert len(rebuilt) == 1  # only the replaced layer's
