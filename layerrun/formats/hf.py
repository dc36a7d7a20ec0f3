"""Reading a Hugging Face model folder (config + single or sharded safetensors)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from layerrun.errors import FormatError, UnsupportedModelError
from layerrun.formats.aligned import ST_DTYPES, TensorInfo, read_header
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
    path = folder / "config.json"
    if not path.is_file():
        raise FormatError(f"{folder}: config.json is missing; a Hugging Face model folder needs its config.json")
    try:
        cfg = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return cfg


def find_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a HF folder, in shard order."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{index}: malformed index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise FormatError(f"{folder}: shard(s) listed in model.safetensors.index.json are missing: {', '.join(missing)}")
        return [folder / f for f in files]
    if single.is_file():
        return [single]
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
        self._fds: dict[Path, int] = {}
        self._infos: dict[str, tuple[Path, TensorInfo]] = {}
        for p in self.files:
            size = p.stat().st_size
            with open(p, "rb") as f:
                infos, _ = read_header(f, p, size)
            for name, info in infos.items():
                if info.end > size:
                    raise FormatError(f"{p}: tensor {name} runs past the end of the file; the file is truncated")
                if info.dtype not in _ST_TO_TORCH:
                    raise UnsupportedModelError(f"{p}: tensor {name} has unsupported dtype {info.dtype}")
                self._infos[name] = (p, info)

    def description(self) -> dict:
        dtypes = sorted({i.dtype for _, i in self._infos.values()})
        return {"kind": "huggingface", "path": str(self.folder.resolve()), "files": [p.name for p in self.files], "dtypes": dtypes}

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in self.files:
            st = p.stat()
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
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
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

    def write_aux_files(self, dst: Path) -> list[str]:
        copied = []
        for n in AUX_FILES:
            p = self.folder / n
            if p.is_file():
                shutil.copyfile(p, dst / n)
                copied.append(n)
        return copied

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
