"""Safetensors files whose tensor data starts on a 4096-byte boundary.

A safetensors file is ``u64 header_len | JSON header | data``. The standard
writer pads the header to 8 bytes; we pad it with spaces (allowed by the spec)
so that ``8 + header_len`` is a multiple of :data:`ALIGN`. Tensors are stored
contiguously (the spec forbids holes) in descending element size (a
mixture-of-experts layer's experts last, grouped per expert), so every
tensor also starts at a multiple of its own element size: the whole data block
can be read with ``O_DIRECT`` into an aligned buffer and every tensor used as a
zero-copy view of it. Files stay readable by any safetensors loader.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

import torch

from layerrun.errors import FormatError

ALIGN = 4096

# safetensors dtype names <-> torch dtypes
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives inside a file; offsets are absolute file offsets."""

    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "offsets": [self.start, self.end]}


def _expert_rank(name: str) -> int:
    from layerrun.models.base import expert_index

    j = expert_index(name)
    return -1 if j is None else j


def _header_bytes(header: dict, align: int) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    total = 8 + len(raw)
    pad = (-total) % align
    return raw + b" " * pad


def write_aligned(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    align: int = ALIGN,
) -> tuple[list[TensorInfo], int, str]:
    """Write ``tensors`` to ``path``; return (tensor infos, file bytes, sha256).

    The sha256 is computed while writing, so the file is not read back.
    """
    import hashlib

    items = []
    for name, t in tensors.items():
        if t.dtype not in TORCH_TO_ST:
            raise FormatError(f"{path}: tensor {name} has unsupported dtype {t.dtype}")
        items.append((name, t.contiguous()))
    # Larger elements first keeps every tensor naturally aligned without holes. Within one element
    # size, a mixture-of-experts layer's experts come last, each expert's tensors together, so the
    # engine can read attention + router in one range and then only the experts a step routes to.
    items.sort(key=lambda kv: (-kv[1].element_size(), _expert_rank(kv[0]), kv[0]))

    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    rel = 0
    for name, t in items:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [rel, rel + n]}
        rel += n
    hbytes = _header_bytes(header, align)
    data_start = 8 + len(hbytes)

    sha = hashlib.sha256()
    infos: list[TensorInfo] = []
    with open(path, "wb") as f:
        head = struct.pack("<Q", len(hbytes)) + hbytes
        f.write(head)
        sha.update(head)
        for name, t in items:
            h = header[name]
            s, e = h["data_offsets"]
            infos.append(TensorInfo(name, h["dtype"], tuple(h["shape"]), data_start + s, data_start + e))
            if t.numel() == 0:
                continue
            buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            f.write(buf)
            sha.update(buf)
        f.flush()
        os.fsync(f.fileno())
    infos.sort(key=lambda i: i.name)
    return infos, data_start + rel, sha.hexdigest()


def read_header(f: BinaryIO, path: str | os.PathLike, file_size: int | None = None) -> tuple[dict[str, TensorInfo], dict]:
    """Parse a safetensors header; return (tensor infos with absolute offsets, metadata)."""
    head = f.read(8)
    if len(head) != 8:
        raise FormatError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    if file_size is not None and 8 + n > file_size:
        raise FormatError(f"{path}: header length {n} runs past the end of the file ({file_size} bytes); the file is truncated or not safetensors")
    if n > 100 * 1024 * 1024:
        raise FormatError(f"{path}: header length {n} is implausible; not a safetensors file")
    raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: safetensors header is not valid JSON ({e})") from None
    meta = header.pop("__metadata__", {}) or {}
    data_start = 8 + n
    infos = {}
    for name, h in header.items():
        s, e = h["data_offsets"]
        infos[name] = TensorInfo(name, h["dtype"], tuple(h["shape"]), data_start + s, data_start + e)
    return infos, meta
