"""Every file's integrity, established before its bytes are used: hash on first read, then a stamp.

The manifest records each file's sha256. A reader that is about to hand a file's
bytes to compute for the first time in a process hashes them (it has just read
them, so this costs CPU, not I/O; streamed layers are hashed in the reader
threads, beside compute) and checks the float tensors for NaN/Inf. A file that
passes is remembered in a stamp, ``.layerrun-verified.json`` next to the
manifest, under its identity ``(device, inode, size, mtime_ns, ctime_ns)`` and
the sha256 it matched; a later run whose file has the same identity skips the
hash. Any change to the file (a rewrite, a copy, ``touch``, a restore from
backup) changes the identity, and the file is hashed again.

The stamp is a convenience, never a requirement: where the model folder is
read-only it is kept under ``$LAYERRUN_HOME/verified/`` instead, and where
neither can be written every run simply hashes again. A damaged or foreign stamp
is ignored. The stamp cannot vouch for a file the manifest does not describe
(each entry carries the sha256 it matched, which must equal the manifest's).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import torch

from layerrun.errors import FormatError
from layerrun.formats.files import read_json

STAMP_NAME = ".layerrun-verified.json"
STAMP_FORMAT = "layerrun-verified-v1"
MAX_STAMP_BYTES = 16 * 2**20
HASH_CHUNK = 8 * 2**20


def identity(st: os.stat_result) -> list[int]:
    """What must stay the same for a file verified once to count as verified still."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _fallback_path(folder: Path) -> Path | None:
    try:
        from layerrun.formats.store import home

        key = hashlib.sha256(os.path.realpath(folder).encode("utf-8", "surrogateescape")).hexdigest()[:32]
        return home() / "verified" / f"{key}.json"
    except (OSError, RuntimeError):  # no home directory
        return None


class Stamp:
    """The files of one folder that matched their manifest sha256, by identity."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._entries: dict[str, dict] = {}
        self._lock = threading.Lock()
        for path in (self.folder / STAMP_NAME, _fallback_path(self.folder)):
            if path is not None:
                self._entries.update(self._load(path))

    @staticmethod
    def _load(path: Path) -> dict[str, dict]:
        try:
            d = read_json(path.parent, path.name, "stamp", MAX_STAMP_BYTES)
        except FormatError:  # missing, unreadable or damaged: hash again
            return {}
        files = d.get("files") if d.get("format") == STAMP_FORMAT else None
        if not isinstance(files, dict):
            return {}
        return {n: e for n, e in files.items()
                if isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("id"), list)}

    def ok(self, name: str, sha256: str, st: os.stat_result) -> bool:
        e = self._entries.get(name)
        return e is not None and e["sha256"] == sha256 and e["id"] == identity(st)

    def add(self, items: list[tuple[str, str, os.stat_result]]) -> None:
        """Record files (name, sha256 they matched, stat) and save the stamp (best effort)."""
        with self._lock:
            for name, sha, st in items:
                self._entries[name] = {"sha256": sha, "id": identity(st)}
            self._save()

    def _save(self) -> None:
        data = json.dumps({"format": STAMP_FORMAT, "files": self._entries}, separators=(",", ":")).encode()
        fallback = _fallback_path(self.folder)
        for path in (self.folder / STAMP_NAME, fallback):
            if path is None:
                continue
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_atomic(path, data)
                return
            except OSError:
                continue  # a read-only folder: try the next place; none left: hash again next run


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def corrupt_message(path, digest: str, expected: str) -> str:
    return (f"{path}: the file is corrupt: its sha256 is {digest[:16]}…, the manifest says {expected[:16]}…; "
            "re-run `layerrun convert` (or download the model again) to rebuild it")


def check_finite(path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse float tensors holding NaN or Inf, naming the file and the tensor."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or not t.numel():
            continue
        lo, hi = torch.aminmax(t.reshape(-1))  # one pass; NaN propagates, +-Inf shows as a bound
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            bad = int((~torch.isfinite(t)).sum())
            raise FormatError(
                f"{path}: tensor {name} holds {bad} NaN/Inf value(s) of {t.numel()}; the model's weights are "
                "damaged (convert again from an undamaged source)"
            )


class Verifier:
    """Decides, per file, whether its bytes still need checking in this process, and checks them.

    Shared by every reader of one engine (resident loads, the streaming pipeline, memory maps).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.stamp = Stamp(self.folder)
        self._done: set[tuple] = set()
        self._lock = threading.Lock()
        self.hashed_bytes = 0  # what this process had to hash (0 on a run the stamp covered)
        self.seconds = 0.0  # time spent hashing and checking, summed over the threads that did it
        self.cpu_seconds = 0.0  # their CPU time for it

    def needed(self, entry, st: os.stat_result) -> bool:
        key = (entry.name, entry.sha256, *identity(st))
        with self._lock:
            if key in self._done:
                return False
            if self.stamp.ok(entry.name, entry.sha256, st):
                self._done.add(key)
                return False
        return True

    def finish(self, entry, st: os.stat_result, digest: str, tensors: dict[str, torch.Tensor] | None) -> None:
        """After hashing a whole file (and with its tensors, checking them): raise or record it verified."""
        path = self.folder / entry.name
        if digest != entry.sha256:
            raise FormatError(corrupt_message(path, digest, entry.sha256))
        if tensors is not None:
            check_finite(path, tensors)
        with self._lock:
            self._done.add((entry.name, entry.sha256, *identity(st)))
            self.hashed_bytes += st.st_size
        self.stamp.add([(entry.name, entry.sha256, st)])

    def spent(self, seconds: float, cpu_seconds: float) -> None:
        with self._lock:
            self.seconds += seconds
            self.cpu_seconds += cpu_seconds

    def hash_fd(self, fd: int, start: int, end: int, h=None):
        """Hash bytes [start, end) of an open file (pread, in chunks); returns the hash object."""
        h = h or hashlib.sha256()
        pos = start
        while pos < end:
            b = os.pread(fd, min(HASH_CHUNK, end - pos), pos)
            if not b:
                raise FormatError(f"{self.folder}: a file ended early while it was verified")
            h.update(b)
            pos += len(b)
        return h
