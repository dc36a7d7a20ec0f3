"""Reading layer files into aligned host buffers, as zero-copy tensor views.

Backends:
- ``pread``: ``os.preadv`` into the buffer (one copy: page cache -> buffer).
- ``direct``: the same with ``O_DIRECT`` (no page cache; needs 4096-aligned
  offsets, lengths and buffers, which the layered format guarantees). Falls back
  to ``pread`` where the filesystem refuses it (tmpfs), and says so.
- ``mmap``: for whole-file reads here, the same as ``pread``: a mapped page that a
  shrinking file no longer has kills the process (SIGBUS), so views of a mapping are
  handed out only under a file lease (:mod:`layerrun.io.guard`: the pipeline's
  streamed layers, the engine's mapped embeddings).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from layerrun.errors import FormatError
from layerrun.formats.aligned import ALIGN, ST_DTYPES
from layerrun.formats.files import MissingFileError, open_file
from layerrun.formats.integrity import Verifier
from layerrun.formats.manifest import FileEntry

BACKENDS = ("pread", "direct", "mmap")
MAX_IO_CHUNK = 64 * 1024 * 1024  # bytes per preadv call; several calls keep deep queues busy


def aligned_empty(nbytes: int, align: int = ALIGN, pin: bool = False) -> torch.Tensor:
    """A uint8 tensor of ``nbytes`` whose data pointer is ``align``-aligned."""
    n = ((nbytes + align - 1) // align) * align
    raw = torch.empty(n + align, dtype=torch.uint8, pin_memory=pin)
    off = (-raw.data_ptr()) % align
    return raw[off : off + n]


def views(entry: FileEntry, buf: torch.Tensor, base: int) -> dict[str, torch.Tensor]:
    """Tensors of ``entry`` as views of ``buf``, which holds the file from byte ``base`` on."""
    out = {}
    for name, t in entry.tensors.items():
        dt = ST_DTYPES[t.dtype]
        chunk = buf[t.start - base : t.end - base]
        out[name] = chunk.view(dt).view(t.shape) if t.nbytes else torch.empty(t.shape, dtype=dt)
    return out


@dataclass
class ReadStat:
    name: str
    bytes: int
    start: float
    end: float
    backend: str


def open_layer_file(folder: Path, entry: FileEntry, direct: bool = False) -> tuple[int, os.stat_result]:
    """Open a file the manifest names, under the model folder's rule (:mod:`layerrun.formats.files`:
    a plain name, a regular file inside the folder, opened without blocking or following links out)."""
    try:
        return open_file(folder, entry.name, "layer file" if entry.layer is not None else "model file", direct)
    except MissingFileError:
        raise FormatError(f"{folder / entry.name}: layer file is missing; run `layerrun validate {folder}`") from None


def check_size(folder: Path, entry: FileEntry, size: int) -> None:
    if size != entry.bytes:
        what = "truncated" if size < entry.bytes else "longer than expected"
        raise FormatError(
            f"{folder / entry.name}: file is {what} ({size} bytes, manifest says {entry.bytes}); "
            "re-run `layerrun convert` to rebuild it"
        )


def verify_buffer(verifier: Verifier, folder: Path, entry: FileEntry, st: os.stat_result, data, base: int,
                  tensors: dict[str, torch.Tensor] | None) -> None:
    """Check a file whose bytes from ``base`` on are in ``data`` (a buffer or a mapping): hash the first
    ``base`` bytes from the file and ``data`` from memory, compare with the manifest, check the tensors."""
    t0, c0 = time.perf_counter(), time.thread_time()
    fd, _ = open_layer_file(folder, entry)
    try:
        h = verifier.hash_fd(fd, 0, base, hashlib.sha256())
    finally:
        os.close(fd)
    h.update(data)
    try:
        verifier.finish(entry, st, h.hexdigest(), tensors)
    finally:
        verifier.spent(time.perf_counter() - t0, time.thread_time() - c0)


def verify_fd(verifier: Verifier, folder: Path, entry: FileEntry, fd: int, st: os.stat_result) -> None:
    """Check a file without holding it: hash it and look for NaN/Inf a chunk at a time (for reads of
    only some of its tensors, which must not cost a whole-file buffer)."""
    from layerrun.formats.integrity import check_finite
    from layerrun.formats.validate import nonfinite_tensors, sha256_fd

    t0, c0 = time.perf_counter(), time.thread_time()
    try:
        digest = sha256_fd(fd, st.st_size)
        if digest == entry.sha256:
            bad = nonfinite_tensors(fd, entry)
            if bad:
                t = entry.tensors[bad[0]]
                raw = bytearray(os.pread(fd, t.nbytes, t.start))
                check_finite(folder / entry.name, {bad[0]: torch.frombuffer(raw, dtype=ST_DTYPES[t.dtype])})
        verifier.finish(entry, st, digest, None)
    finally:
        verifier.spent(time.perf_counter() - t0, time.thread_time() - c0)


class FileReader:
    """Reads whole layer files (their data region) into caller-provided aligned buffers.

    With a :class:`~layerrun.formats.integrity.Verifier`, a file's bytes are hashed and checked the
    first time they are read (unless the verifier's stamp vouches for the file), before they are
    returned: a damaged file is an error naming it, never silently different output.
    """

    def __init__(self, folder: str | Path, backend: str = "pread", verifier: Verifier | None = None):
        if backend not in BACKENDS:
            raise FormatError(f"reader backend {backend!r} is not one of: {', '.join(BACKENDS)}")
        self.folder = Path(folder)
        self.backend = backend
        self.verifier = verifier
        self.fallback_note: str | None = None

    def _open(self, entry: FileEntry) -> tuple[int, str, os.stat_result]:
        if self.backend == "direct" and hasattr(os, "O_DIRECT"):
            try:
                fd, st = open_layer_file(self.folder, entry, direct=True)
                return fd, "direct", st
            except OSError as e:
                self.fallback_note = f"O_DIRECT unavailable on this filesystem ({e.strerror}); using pread"
                self.backend = "pread"
        fd, st = open_layer_file(self.folder, entry)
        return fd, "pread", st

    def _check_size(self, entry: FileEntry, size: int) -> None:
        check_size(self.folder, entry, size)

    def read(self, entry: FileEntry, buf: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], ReadStat]:
        """Read ``entry`` into ``buf`` (allocated if None); return tensor views and timing."""
        t0 = time.perf_counter()
        base = entry.data_start
        n = entry.bytes - base
        fd, used, st = self._open(entry)
        try:
            self._check_size(entry, st.st_size)
            if buf is None:
                buf = aligned_empty(n)
            elif buf.numel() < n:
                raise ValueError(f"buffer of {buf.numel()} bytes is too small for {entry.name} ({n} bytes)")
            want = ((n + ALIGN - 1) // ALIGN) * ALIGN if used == "direct" else n
            if buf.numel() < want:
                want = n
            arr = memoryview(buf.numpy())
            pos = 0
            while pos < n:
                m = min(MAX_IO_CHUNK, want - pos)
                got = os.preadv(fd, [arr[pos : pos + m]], base + pos)
                if got <= 0:
                    raise FormatError(f"{self.folder / entry.name}: unexpected end of file at byte {base + pos}")
                pos += got
        finally:
            os.close(fd)
        w = views(entry, buf, base)
        if self.verifier is not None and self.verifier.needed(entry, st):
            verify_buffer(self.verifier, self.folder, entry, st, memoryview(buf.numpy())[:n], base, w)
        return w, ReadStat(entry.name, n, t0, time.perf_counter(), used)

    def read_tensors(self, entry: FileEntry, names) -> tuple[dict[str, torch.Tensor], ReadStat]:
        """Only tensors ``names`` of ``entry``, in memory of their own (not views of a whole-file
        buffer or mapping that would keep the rest alive). Reads just their byte ranges."""
        t0 = time.perf_counter()
        names = set(names)
        path = self.folder / entry.name
        fd, st = open_layer_file(self.folder, entry)
        out, n = {}, 0
        try:
            self._check_size(entry, st.st_size)
            if self.verifier is not None and self.verifier.needed(entry, st):
                verify_fd(self.verifier, self.folder, entry, fd, st)  # the whole file, a chunk at a time
            for name, t in entry.tensors.items():
                if name not in names:
                    continue
                buf = bytearray(t.nbytes)
                got = os.preadv(fd, [buf], t.start) if t.nbytes else 0
                if got != t.nbytes:
                    raise FormatError(f"{path}: unexpected end of file in tensor {name}")
                dt = ST_DTYPES[t.dtype]
                out[name] = torch.frombuffer(buf, dtype=dt).view(t.shape) if t.nbytes else torch.empty(t.shape, dtype=dt)
                n += t.nbytes
        finally:
            os.close(fd)
        return out, ReadStat(entry.name, n, t0, time.perf_counter(), "pread")

    def close(self) -> None:
        pass
