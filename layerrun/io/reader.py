"""Reading layer files into aligned host buffers, as zero-copy tensor views.

Backends:
- ``pread``: ``os.preadv`` into the buffer (one copy: page cache -> buffer).
- ``direct``: the same with ``O_DIRECT`` (no page cache; needs 4096-aligned
  offsets, lengths and buffers, which the layered format guarantees). Falls back
  to ``pread`` where the filesystem refuses it (tmpfs), and says so.
- ``mmap``: for whole-file reads here, the same as ``pread``: a mapped page that a
  shrinking file no longer has kills the process (SIGBUS), so views of a mapping are
  handed out only by the pipeline, under a file lease (:mod:`layerrun.io.guard`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from layerrun.errors import FormatError
from layerrun.formats.aligned import ALIGN, ST_DTYPES
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


class FileReader:
    """Reads whole layer files (their data region) into caller-provided aligned buffers."""

    def __init__(self, folder: str | Path, backend: str = "pread"):
        if backend not in BACKENDS:
            raise FormatError(f"reader backend {backend!r} is not one of: {', '.join(BACKENDS)}")
        self.folder = Path(folder)
        self.backend = backend
        self.fallback_note: str | None = None

    def _open(self, entry: FileEntry) -> tuple[int, str]:
        path = self.folder / entry.name
        if self.backend == "direct" and hasattr(os, "O_DIRECT"):
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT), "direct"
            except FileNotFoundError:
                raise FormatError(f"{path}: layer file is missing; run `layerrun validate {self.folder}`") from None
            except OSError as e:
                self.fallback_note = f"O_DIRECT unavailable on this filesystem ({e.strerror}); using pread"
                self.backend = "pread"
        try:
            return os.open(path, os.O_RDONLY), "pread"
        except FileNotFoundError:
            raise FormatError(f"{path}: layer file is missing; run `layerrun validate {self.folder}`") from None

    def _check_size(self, entry: FileEntry, size: int) -> None:
        if size != entry.bytes:
            what = "truncated" if size < entry.bytes else "longer than expected"
            raise FormatError(
                f"{self.folder / entry.name}: file is {what} ({size} bytes, manifest says {entry.bytes}); "
                "re-run `layerrun convert` to rebuild it"
            )

    def read(self, entry: FileEntry, buf: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], ReadStat]:
        """Read ``entry`` into ``buf`` (allocated if None); return tensor views and timing."""
        t0 = time.perf_counter()
        base = entry.data_start
        n = entry.bytes - base
        fd, used = self._open(entry)
        try:
            self._check_size(entry, os.fstat(fd).st_size)
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
        return views(entry, buf, base), ReadStat(entry.name, n, t0, time.perf_counter(), used)

    def read_tensors(self, entry: FileEntry, names) -> tuple[dict[str, torch.Tensor], ReadStat]:
        """Only tensors ``names`` of ``entry``, in memory of their own (not views of a whole-file
        buffer or mapping that would keep the rest alive). Reads just their byte ranges."""
        t0 = time.perf_counter()
        names = set(names)
        path = self.folder / entry.name
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise FormatError(f"{path}: layer file is missing; run `layerrun validate {self.folder}`") from None
        out, n = {}, 0
        try:
            self._check_size(entry, os.fstat(fd).st_size)
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
