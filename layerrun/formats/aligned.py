"""Safetensors files whose tensor data starts on a 4096-byte boundary.

A safetensors file is ``u64 header_len | JSON header | data``. The standard
writer pads the header to 8 bytes; we pad it with spaces (allowed by the spec)
so that ``8 + header_len`` is a multiple of :data:`ALIGN`. Tensors are stored
contiguously (the spec forbids holes) in descending element size (a
mixture-of-experts layer's experts last, grouped per expert; the linear weights a
family fuses back to back in product order), so every
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
    # Floating tensors a family fuses (q/k/v, gate/up) are stored back to back in product order, so a
    # streamed layer's fused product is a view of the file (models.base.storage_order).
    from layerrun.models.base import storage_order

    items.sort(key=lambda kv: (-kv[1].element_size(), _expert_rank(kv[0]),
                               storage_order(kv[0]) if kv[1].is_floating_point() else kv[0]))

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
    # O_NOFOLLOW: a symlink planted under the output name is refused, never written through
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
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


MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_DIMS = 8


def read_header(f: BinaryIO, path: str | os.PathLike, file_size: int | None = None) -> tuple[dict[str, TensorInfo], dict]:
    """Parse a safetensors header; return (tensor infos with absolute offsets, metadata).

    The header is untrusted: anything that is not an object of well-formed tensor entries whose
    byte ranges fit their shapes, lie inside the file and do not overlap is a FormatError naming
    the file and the tensor.
    """
    if file_size is None:
        file_size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) != 8:
        raise FormatError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    if 8 + n > file_size:
        raise FormatError(f"{path}: header length {n} runs past the end of the file ({file_size} bytes); the file is truncated or not safetensors")
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"{path}: header length {n} is implausible; not a safetensors file")
    raw = f.read(n)
    if len(raw) != n:
        raise FormatError(f"{path}: the file ended inside its header; it is truncated")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: safetensors header is not valid JSON ({e})") from None
    except RecursionError:
        raise FormatError(f"{path}: safetensors header nests JSON too deeply; not a safetensors file") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header must be a JSON object, found {type(header).__name__}")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{path}: safetensors __metadata__ must map names to strings")
    data_start = 8 + n
    infos = {}
    for name, h in header.items():
        infos[name] = _tensor_info(path, name, h, data_start, file_size)
    check_no_overlap(path, infos.values())
    return infos, meta


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _tensor_info(path, name: str, h, data_start: int, file_size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(h, dict):
        raise FormatError(f"{where}: its header entry must be an object with dtype, shape and data_offsets")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in h]
    if missing:
        raise FormatError(f"{where}: its header entry lacks {', '.join(missing)}")
    dtype, shape, offs = h["dtype"], h["shape"], h["data_offsets"]
    if not isinstance(dtype, str):
        raise FormatError(f"{where}: dtype {dtype!r} is not a dtype name")
    if dtype not in ST_DTYPES:
        from layerrun.errors import UnsupportedModelError

        raise UnsupportedModelError(f"{where} has dtype {dtype}, which LayerRun cannot read (supported: {', '.join(ST_DTYPES)})")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(f"{where}: shape {shape!r} is not a list of at most {MAX_DIMS} sizes >= 0")
    if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs):
        raise FormatError(f"{where}: data_offsets {offs!r} is not a pair of byte offsets [start, end]")
    s, e = offs
    if not 0 <= s <= e:
        raise FormatError(f"{where}: data_offsets [{s}, {e}] are reversed or negative")
    numel = 1
    for d in shape:
        numel *= d
    need = numel * ST_DTYPES[dtype].itemsize
    if e - s != need:
        raise FormatError(
            f"{where}: data_offsets [{s}, {e}] hold {e - s} bytes, but shape {shape} of {dtype} needs {need}"
        )
    if data_start + e > file_size:
        raise FormatError(
            f"{where}: its data (bytes {data_start + s}..{data_start + e}) runs past the end of the file "
            f"({file_size} bytes); the file is truncated"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + s, data_start + e)


def check_no_overlap(path, infos) -> None:
    """Two tensors sharing bytes would let a write to one change the other: refuse the file."""
    spans = sorted((t.start, t.end, t.name) for t in infos if t.nbytes)
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise FormatError(f"{path}: tensors {an!r} and {bn!r} overlap (bytes {a0}..{a1} and {b0}..{b1})")
