"""A GGUF file's header: metadata and tensor table, parsed and checked without reading tensor data.

Everything in a GGUF header is untrusted: counts are checked against the file's size before a loop
runs on them, arrays may nest at most :data:`MAX_NESTING` deep, a metadata key or tensor name may
appear once, ``general.alignment`` must be a power of two that the tensor offsets and the file's end
agree with (a file whose stated alignment differs from how its data was laid out would otherwise be
read from the wrong offsets), tensor data may not overlap or run past the end, and the model keys a
config is built from (:func:`check_metadata`) must be present with the right type and sign.
Parsed with ``struct`` (``gguf.GGUFReader`` builds a numpy object per element: 14 s and 750 MB for a
262k-token vocabulary).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np

from layerrun.errors import FormatError
from layerrun.formats.files import open_user_file

GGUF_MAGIC = b"GGUF"
_KV_FORMAT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_KV_NUMPY = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
_STRING, _ARRAY = 8, 9


def _ggml_types() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, elements per block, bytes per block), from the gguf package."""
    import gguf

    return {int(t): (t.name, *gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType}


@dataclass(frozen=True)
class TensorInfo:
    name: str  # the GGUF name, e.g. blk.0.attn_q.weight
    shape: tuple[int, ...]  # torch order: (rows, columns)
    ggml_type: int
    type_name: str
    offset: int  # absolute offset of the data in the file
    nbytes: int


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict
    tensors: dict[str, TensorInfo]
    file_bytes: int

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "")

    def arch_key(self, key: str, default=None):
        return self.metadata.get(f"{self.architecture}.{key}", default)


MAX_NESTING = 4  # arrays of arrays of ...: llama.cpp writes none; a deeper file is damaged or hostile
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ALIGNMENT = 1 << 20


def read_header(path: str | Path) -> GGUFHeader:
    """Parse the metadata and the tensor table; reads no tensor data. Any damage is a FormatError."""
    path = Path(path)
    fd, st = open_user_file(path, "GGUF file")
    try:
        size = st.st_size
        if size < 24:
            raise FormatError(f"{path}: not a GGUF file ({size} bytes, too short for a GGUF header)")
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mm:
            if mm[:4] != GGUF_MAGIC:
                raise FormatError(f"{path}: not a GGUF file (starts with {bytes(mm[:4])!r}, expected b'GGUF')")
            try:
                return _parse(path, mm, size)
            except (struct.error, IndexError, ValueError, OverflowError) as e:
                raise FormatError(f"{path}: truncated or corrupt GGUF header ({e}); download the file again") from None
            except RecursionError:
                raise FormatError(f"{path}: corrupt GGUF header (metadata nested too deeply)") from None
    finally:
        os.close(fd)


def _parse(path: Path, mm: mmap.mmap, size: int) -> GGUFHeader:
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
    if version not in (2, 3):
        raise FormatError(f"{path}: GGUF version {version} is not supported (supported: 2, 3)")
    if n_kv * 12 > size or n_tensors * 24 > size:  # each entry takes at least that many bytes
        raise FormatError(f"{path}: corrupt GGUF header: it claims {n_kv} metadata entries and {n_tensors} tensors, "
                          f"more than {size} bytes can hold")
    pos = 24

    def string(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", mm, p)
        if p + 8 + n > size:
            raise ValueError(f"a string runs past the end of the file at offset {p}")
        return mm[p + 8 : p + 8 + n].decode("utf-8"), p + 8 + n

    def value(p: int, vtype: int, depth: int = 0):
        if vtype in _KV_FORMAT:
            fmt = "<" + _KV_FORMAT[vtype]
            return struct.unpack_from(fmt, mm, p)[0], p + struct.calcsize(fmt)
        if vtype == _STRING:
            return string(p)
        if vtype == _ARRAY:
            if depth >= MAX_NESTING:
                raise ValueError(f"arrays nested more than {MAX_NESTING} deep at offset {p}")
            etype, count = struct.unpack_from("<IQ", mm, p)
            p += 12
            if etype in _KV_NUMPY:
                dt = np.dtype(_KV_NUMPY[etype]).newbyteorder("<")
                end = p + count * dt.itemsize
                if end > size:
                    raise ValueError(f"an array runs past the end of the file at offset {p}")
                return np.frombuffer(mm[p:end], dtype=dt).tolist(), end
            if p + count * 8 > size:  # a string or an array takes at least 8 bytes
                raise ValueError(f"an array of {count} entries runs past the end of the file at offset {p}")
            out = []
            for _ in range(count):
                v, p = value(p, etype, depth + 1)
                out.append(v)
            return out, p
        raise ValueError(f"unknown metadata value type {vtype} at offset {p}")

    metadata: dict = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        if key in metadata:
            raise FormatError(f"{path}: corrupt GGUF header: metadata key {key!r} appears twice")
        (vtype,) = struct.unpack_from("<I", mm, pos)
        metadata[key], pos = value(pos + 4, vtype)

    types = _ggml_types()
    table = []
    seen = set()
    for _ in range(n_tensors):
        name, pos = string(pos)
        if name in seen:
            raise FormatError(f"{path}: corrupt GGUF file: tensor {name!r} appears twice in its tensor table")
        seen.add(name)
        (ndim,) = struct.unpack_from("<I", mm, pos)
        if not 1 <= ndim <= MAX_DIMS:
            raise FormatError(f"{path}: corrupt GGUF file: tensor {name!r} has {ndim} dimensions (1..{MAX_DIMS})")
        dims = struct.unpack_from(f"<{ndim}Q", mm, pos + 4)
        ggml_type, rel = struct.unpack_from("<IQ", mm, pos + 4 + 8 * ndim)
        pos += 4 + 8 * ndim + 12
        table.append((name, tuple(int(d) for d in reversed(dims)), int(ggml_type), int(rel)))

    align = metadata.get("general.alignment", 32)
    if not _is_int(align) or not 1 <= align <= MAX_ALIGNMENT or align & (align - 1):
        raise FormatError(f"{path}: corrupt GGUF header: general.alignment {align!r} is not a power of two "
                          f"(1..{MAX_ALIGNMENT})")
    data_start = (pos + align - 1) // align * align
    tensors: dict[str, TensorInfo] = {}
    for name, shape, ggml_type, rel in table:
        tname, block, block_bytes = types.get(ggml_type, (f"type{ggml_type}", 1, 0))
        if shape[-1] % block:
            raise FormatError(f"{path}: corrupt GGUF file: tensor {name!r} has rows of {shape[-1]} values, not a "
                              f"whole number of {tname} blocks of {block}")
        if rel % align:
            raise FormatError(
                f"{path}: tensor {name!r} starts at data offset {rel}, which is not a multiple of the file's "
                f"general.alignment ({align}); the alignment does not match the data, or the file is damaged"
            )
        n = prod(shape)
        nbytes = n // block * block_bytes
        tensors[name] = TensorInfo(name, shape, ggml_type, tname, data_start + rel, nbytes)
    header = GGUFHeader(path, version, metadata, tensors, size)
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (_, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise FormatError(f"{path}: corrupt GGUF file: the data of tensors {an!r} and {bn!r} overlap")
    end = max((b for _, b, _ in spans), default=data_start)
    short = [t.name for t in tensors.values() if t.offset + t.nbytes > size]
    if short and end - size < align and spans:
        raise FormatError(
            f"{path}: the tensor data runs {end - size} bytes past the end of the file: its general.alignment "
            f"({align}) does not match how the data was written, or the file is truncated; download it again"
        )
    if short:
        raise FormatError(
            f"{path}: truncated GGUF file ({size} bytes): the data of {len(short)} tensor(s) runs past the end "
            f"(first: {short[0]}); download the file again"
        )
    sized = all(t.ggml_type in types for t in tensors.values())  # an unknown type's size is unknown
    if spans and sized and size - end >= align:
        raise FormatError(
            f"{path}: {size - end} bytes follow the last tensor's data: the file's general.alignment ({align}) "
            "does not match how its data was written (the tensors would be read from the wrong place), or the "
            "file is damaged; download it again"
        )
    return header


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_REQUIRED_KEYS = ("block_count", "embedding_length", "attention.head_count")
_INT_KEYS = (*_REQUIRED_KEYS, "attention.head_count_kv", "feed_forward_length", "expert_feed_forward_length",
             "context_length", "vocab_size", "attention.key_length", "attention.value_length", "rope.dimension_count",
             "attention.sliding_window", "attention.sliding_window_pattern", "expert_count", "expert_used_count")
_FLOAT_KEYS = ("attention.layer_norm_rms_epsilon", "rope.freq_base", "attn_logit_softcapping",
               "final_logit_softcapping", "rope.scaling.factor")
_LIST_OK = ("attention.head_count_kv", "attention.sliding_window_pattern")  # per-layer values


def check_metadata(h: GGUFHeader) -> None:
    """The model's metadata has the keys a config needs, each of the right type and sign: a file that
    lacks ``head_count`` or says ``block_count = "abc"`` is refused naming the key, before any
    arithmetic on it."""
    arch = h.architecture
    for key in _REQUIRED_KEYS:
        if f"{arch}.{key}" not in h.metadata:
            raise FormatError(f"{h.path}: {arch}.{key} is missing; the file does not describe its model "
                              "(damaged or incomplete GGUF)")
    if f"{arch}.feed_forward_length" not in h.metadata and f"{arch}.expert_feed_forward_length" not in h.metadata:
        raise FormatError(f"{h.path}: {arch}.feed_forward_length is missing; the file does not describe its model")
    for key in _INT_KEYS:
        v = h.metadata.get(f"{arch}.{key}")
        if v is None or (key in _LIST_OK and isinstance(v, list) and all(_is_int(x) for x in v)):
            continue
        if not _is_int(v) or v < (0 if key in ("feed_forward_length", "expert_count", "expert_used_count") else 1):
            raise FormatError(f"{h.path}: {arch}.{key} is {v!r}, not a positive integer")
    for key in _FLOAT_KEYS:
        v = h.metadata.get(f"{arch}.{key}")
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf")):
            raise FormatError(f"{h.path}: {arch}.{key} is {v!r}, not a positive number")
    for key in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id"):
        v = h.metadata.get(f"tokenizer.ggml.{key}")
        if v is not None and (not _is_int(v) or v < 0):
            raise FormatError(f"{h.path}: tokenizer.ggml.{key} is {v!r}, not a token id")


