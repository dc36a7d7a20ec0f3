"""Reading a Hugging Face model folder (config + single or sharded safetensors)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from layerrun.errors import FormatError, UnsupportedModelError

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

_ST_TO_TORCH = {
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
    """A Hugging Face folder, read one tensor at a time through safetensors' mmap."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FormatError(f"{self.folder}: no such folder")
        self.config = read_config(self.folder)
        self.files = find_weight_files(self.folder)
        self._handles = {}
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        for p in self.files:
            try:
                h = safe_open(str(p), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise FormatError(f"{p}: cannot read safetensors file ({e})") from None
            self._handles[p] = h
            for name in h.keys():
                self._where[name] = p
                sl = h.get_slice(name)
                self._meta[name] = (sl.get_dtype(), tuple(sl.get_shape()))

    def description(self) -> dict:
        dtypes = sorted({m[0] for m in self._meta.values()})
        return {"kind": "huggingface", "path": str(self.folder.resolve()), "files": [p.name for p in self.files], "dtypes": dtypes}

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in self.files:
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()[:16]

    def tensor_names(self) -> list[str]:
        return sorted(self._where)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][1]

    def tensor_dtype(self, name: str) -> torch.dtype:
        return _ST_TO_TORCH.get(self._meta[name][0], torch.float32)

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def write_aux_files(self, dst: Path) -> list[str]:
        copied = []
        for n in AUX_FILES:
            p = self.folder / n
            if p.is_file():
                shutil.copyfile(p, dst / n)
                copied.append(n)
        return copied

    def close(self) -> None:
        self._handles.clear()
