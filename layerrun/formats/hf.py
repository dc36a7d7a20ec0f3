"""Reading a Hugging Face model folder (config + single or sharded safetensors)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from layerrun.errors import FormatError, UnsupportedModelError
from layerrun.formats.aligned import ST_DTYPES, TensorInfo, read_header
from layerrun.formats.files import (
    MAX_TOKENIZER_BYTES,
    MissingFileError,
    check_name,
    open_file,
    read_bytes,
    read_json,
    write_new,
)
from layerrun.formats.source import row_chunks

# Files copied verbatim into a layered folder when present.
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
)

_ST_TO_TORCH = ST_DTYPES


def read_config(folder: Path) -> dict:
    try:
        return read_json(folder, "config.json", "config")
    except MissingFileError:
        raise FormatError(f"{folder}: config.json is missing; a Hugging Face model folder needs its config.json") from None


def find_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a HF folder, in shard order. Names from the index are untrusted: each
    must be a plain file name inside the folder."""
    index = "model.safetensors.index.json"
    if os.path.lexists(folder / index):
        d = read_json(folder, index, "index")
        weight_map = d.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise FormatError(f"{folder / index}: weight_map must map tensor names to shard file names")
        files = sorted(set(weight_map.values()))
        for f in files:
            check_name(f, "shard", folder / index)
        missing = [f for f in files if not os.path.lexists(folder / f)]
        if missing:
            raise FormatError(f"{folder}: shard(s) listed in model.safetensors.index.json are missing: {', '.join(missing)}")
        return [folder / f for f in files]
    if os.path.lexists(folder / "model.safetensors"):
        return [folder / "model.safetensors"]
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    if shards:
        return shards
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    bins = sorted(p.name for p in folder.glob("pytorch_model*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if bins:
        raise UnsupportedModelError(
            f"{folder}: only PyTorch pickle weights found ({', '.join(bins[:3])}); LayerRun needs safetensors, "
            "because pickles can run arbitrary code when loaded and cannot be read one tensor at a time. "
            "Convert them first, e.g. with transformers: "
            "AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)"
        )
    raise FormatError(f"{folder}: no model weights found (expected model.safetensors or model-0000x-of-0000y.safetensors)")


def read_headers(folder: Path, files: list[Path], keep_open: bool = False):
    """{tensor name: (file, TensorInfo)} over the shards, and {file: (fd, stat)} when ``keep_open``.

    Each shard is opened under the folder's rule; a tensor named in two shards is refused."""
    infos: dict[str, tuple[Path, TensorInfo]] = {}
    fds: dict[Path, tuple[int, os.stat_result]] = {}
    try:
        for p in files:
            fd, st = open_file(folder, p.name, "weights file")
            fds[p] = (fd, st)
            with os.fdopen(os.dup(fd), "rb") as f:
                header, _ = read_header(f, p, st.st_size)
            for name, info in header.items():
                if name in infos:
                    raise FormatError(f"{folder}: tensor {name} is in both {infos[name][0].name} and {p.name}")
                infos[name] = (p, info)
            if not keep_open:
                os.close(fds.pop(p)[0])
    except BaseException:
        for fd, _ in fds.values():
            os.close(fd)
        raise
    return infos, fds


class HFSource:
    """A Hugging Face folder, read one tensor at a time.

    Tensors are read with ``pread`` into fresh buffers rather than through
    safetensors' mmap: mapped pages count as resident memory, so an mmap-based
    conversion of a model would show the whole model's size as its peak RSS.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FormatError(f"{self.folder}: no such folder")
        self.config = read_config(self.folder)
        self.files = find_weight_files(self.folder)
        self._infos, opened = read_headers(self.folder, self.files, keep_open=True)
        self._fds: dict[Path, int] = {p: fd for p, (fd, _) in opened.items()}
        self._stats: dict[Path, os.stat_result] = {p: st for p, (_, st) in opened.items()}

    def description(self) -> dict:
        dtypes = sorted({i.dtype for _, i in self._infos.values()})
        return {"kind": "huggingface", "path": str(self.folder.resolve()), "files": [p.name for p in self.files], "dtypes": dtypes}

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in self.files:
            st = self._stats[p]
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()[:16]

    def tensor_names(self) -> list[str]:
        return sorted(self._infos)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._infos[name][1].shape

    def tensor_dtype(self, name: str) -> torch.dtype:
        return _ST_TO_TORCH[self._infos[name][1].dtype]

    CAST_CHUNK = 16 * 2**20  # bytes of source read per step when casting

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor as stored, or cast to ``dtype`` a chunk of rows at a time (so an fp32 -> bf16
        conversion never holds a whole fp32 tensor next to its bf16 copy). Same values either way."""
        path, info = self._infos[name]
        fd = self._fds.get(path)
        if fd is None:
            raise FormatError(f"{self.folder}: source is closed")
        src = _ST_TO_TORCH[info.dtype]
        shape = tuple(info.shape)
        if dtype is None or dtype == src or len(shape) < 2 or info.nbytes <= self.CAST_CHUNK:
            t = self._pread(fd, path, name, info.start, info.nbytes).view(src).reshape(shape)
            return t if dtype is None or dtype == src else t.to(dtype)
        rows = info.nbytes // (shape[-1] * src.itemsize) if shape[-1] else 0
        row_bytes = info.nbytes // rows if rows else 0
        out = torch.empty((rows, shape[-1]), dtype=dtype)
        for r, n in row_chunks(rows, row_bytes, self.CAST_CHUNK):
            chunk = self._pread(fd, path, name, info.start + r * row_bytes, n * row_bytes)
            out[r : r + n] = chunk.view(src).reshape(n, shape[-1])
        return out.reshape(shape)

    @staticmethod
    def _pread(fd: int, path, name: str, start: int, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        pos = 0
        while pos < nbytes:
            got = os.preadv(fd, [view[pos:]], start + pos)
            if got <= 0:
                raise FormatError(f"{path}: unexpected end of file while reading {name}")
            pos += got
        return buf

    def aux_names(self) -> list[str]:
        """The files :meth:`write_aux_files` will write."""
        return [n for n in AUX_FILES if os.path.lexists(self.folder / n)]

    def write_aux_files(self, dst: Path) -> list[str]:
        """Copy the tokenizer, template and config files that exist (each read under the folder's rule,
        so a link out of the source folder is refused rather than copied into the model)."""
        copied = []
        for n in AUX_FILES:
            if os.path.lexists(self.folder / n):
                write_new(dst, n, read_bytes(self.folder, n, n, MAX_TOKENIZER_BYTES))
                copied.append(n)
        return copied

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
