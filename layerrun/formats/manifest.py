"""The layered folder's manifest, ``layerrun.json``.

The manifest is written last by the converter, so a folder with a manifest is
complete; a folder without one is a conversion in progress (or interrupted).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from layerrun.errors import FormatError
from layerrun.formats.aligned import TensorInfo

MANIFEST_NAME = "layerrun.json"
FORMAT_NAME = "layerrun-layered"
FORMAT_VERSION = 1

KIND_EMBEDDINGS = "embeddings"
KIND_LAYER = "layer"
KIND_FINAL = "final"


def layer_file_name(i: int) -> str:
    return f"layer_{i:03d}.safetensors"


@dataclass
class FileEntry:
    name: str
    kind: str
    bytes: int
    sha256: str
    tensors: dict[str, TensorInfo]
    layer: int | None = None

    @property
    def data_start(self) -> int:
        return min((t.start for t in self.tensors.values()), default=0)

    def to_json(self) -> dict:
        d = {"name": self.name, "kind": self.kind}
        if self.layer is not None:
            d["layer"] = self.layer
        d.update(
            bytes=self.bytes,
            sha256=self.sha256,
            tensors={n: t.to_json() for n, t in sorted(self.tensors.items())},
        )
        return d

    @classmethod
    def from_json(cls, d: dict) -> FileEntry:
        tensors = {
            n: TensorInfo(n, t["dtype"], tuple(t["shape"]), int(t["offsets"][0]), int(t["offsets"][1]))
            for n, t in d["tensors"].items()
        }
        return cls(d["name"], d["kind"], int(d["bytes"]), d["sha256"], tensors, d.get("layer"))


@dataclass
class Manifest:
    model_type: str
    num_layers: int
    dtype: str
    files: list[FileEntry]
    source: dict = field(default_factory=dict)
    quantization: dict | None = None
    tie_word_embeddings: bool = False
    layer_prefix: str = "model.layers.{i}."
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    # ---- lookups -------------------------------------------------------
    def file(self, name: str) -> FileEntry:
        for f in self.files:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def embeddings(self) -> FileEntry:
        return self.file("embeddings.safetensors")

    @property
    def final(self) -> FileEntry:
        return self.file("final.safetensors")

    def layer(self, i: int) -> FileEntry:
        return self.file(layer_file_name(i))

    @property
    def layers(self) -> list[FileEntry]:
        return [self.layer(i) for i in range(self.num_layers)]

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @property
    def max_layer_bytes(self) -> int:
        return max((f.bytes for f in self.layers), default=0)

    # ---- (de)serialisation --------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "dtype": self.dtype,
            "tie_word_embeddings": self.tie_word_embeddings,
            "layer_prefix": self.layer_prefix,
            "quantization": self.quantization,
            "source": self.source,
            **self.extra,
            "files": [f.to_json() for f in self.files],
        }

    def write(self, folder: str | os.PathLike) -> None:
        """Write atomically: a temp file renamed over the final name."""
        folder = Path(folder)
        tmp = folder / (MANIFEST_NAME + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / MANIFEST_NAME)

    @classmethod
    def read(cls, folder: str | os.PathLike) -> Manifest:
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not path.is_file():
            if not folder.exists():
                raise FormatError(f"{folder}: no such folder")
            hint = ""
            if any(folder.glob(".*.tmp")) or (folder / ".convert-state.json").exists():
                hint = " (a conversion into it was interrupted: run `layerrun convert` again to resume)"
            elif (folder / "config.json").exists():
                hint = " (this looks like a Hugging Face folder: run `layerrun convert` on it first)"
            raise FormatError(f"{folder}: not a LayerRun model, {MANIFEST_NAME} is missing{hint}")
        try:
            d = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: manifest is not valid JSON ({e})") from None
        if d.get("format") != FORMAT_NAME:
            raise FormatError(f"{path}: not a LayerRun manifest (format={d.get('format')!r})")
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise FormatError(
                f"{path}: format version {d['format_version']} is newer than this LayerRun supports "
                f"({FORMAT_VERSION}); upgrade layerrun"
            )
        known = {"format", "format_version", "model_type", "num_layers", "dtype", "tie_word_embeddings",
                 "layer_prefix", "quantization", "source", "files"}
        try:
            return cls(
                model_type=d["model_type"],
                num_layers=int(d["num_layers"]),
                dtype=d["dtype"],
                files=[FileEntry.from_json(f) for f in d["files"]],
                source=d.get("source", {}),
                quantization=d.get("quantization"),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                layer_prefix=d.get("layer_prefix", "model.layers.{i}."),
                format_version=int(d["format_version"]),
                extra={k: v for k, v in d.items() if k not in known},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{path}: manifest is malformed ({type(e).__name__}: {e})") from None
