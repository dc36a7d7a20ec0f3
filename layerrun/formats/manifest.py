"""The layered folder's manifest, ``layerrun.json``.

The manifest is written last by the converter, so a folder with a manifest is
complete; a folder without one is a conversion in progress (or interrupted).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from layerrun.errors import FormatError, LayerRunError
from layerrun.formats.aligned import MAX_DIMS, ST_DTYPES, TensorInfo, check_no_overlap
from layerrun.formats.files import MAX_MANIFEST_BYTES, check_name, is_file, read_json

MANIFEST_NAME = "layerrun.json"
FORMAT_NAME = "layerrun-layered"
FORMAT_VERSION = 1

KIND_EMBEDDINGS = "embeddings"
KIND_LAYER = "layer"
KIND_FINAL = "final"
KINDS = (KIND_EMBEDDINGS, KIND_LAYER, KIND_FINAL)
# storage dtype names (the manifest's "dtype") -> the safetensors dtype its float tensors have
STORAGE_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
MAX_LAYERS = 10_000  # far above any real model; a manifest claiming more is damaged
_HEX = frozenset("0123456789abcdef")


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
    def from_json(cls, d: dict, where: str = "manifest") -> FileEntry:
        """An entry from untrusted JSON: every field is checked, so that nothing later indexes, allocates
        or opens on the strength of a bad value. Raises FormatError naming ``where`` and the entry."""
        if not isinstance(d, dict):
            raise FormatError(f"{where}: a file entry must be an object, found {type(d).__name__}")
        name = d.get("name")
        check_name(name, "file", where)
        at = f"{where}: {name}"
        missing = [k for k in ("kind", "bytes", "sha256", "tensors") if k not in d]
        if missing:
            raise FormatError(f"{at}: entry lacks {', '.join(missing)}")
        kind, nbytes, sha, tensors, layer = d["kind"], d["bytes"], d["sha256"], d["tensors"], d.get("layer")
        if kind not in KINDS:
            raise FormatError(f"{at}: kind {kind!r} is not one of {', '.join(KINDS)}")
        if not _is_int(nbytes) or nbytes < 8:
            raise FormatError(f"{at}: bytes {nbytes!r} is not a file size")
        if not isinstance(sha, str) or len(sha) != 64 or not set(sha) <= _HEX:
            raise FormatError(f"{at}: sha256 {sha!r} is not a sha256 hex digest")
        if layer is not None and (not _is_int(layer) or layer < 0):
            raise FormatError(f"{at}: layer {layer!r} is not a layer index")
        if not isinstance(tensors, dict):
            raise FormatError(f"{at}: tensors must be an object")
        infos = {n: _tensor_from_json(at, n, t, nbytes) for n, t in tensors.items()}
        check_no_overlap(at, infos.values())
        return cls(name, kind, nbytes, sha, infos, layer)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _tensor_from_json(at: str, n, t, file_bytes: int) -> TensorInfo:
    where = f"{at}: tensor {n!r}"
    if not isinstance(t, dict) or not {"dtype", "shape", "offsets"} <= set(t):
        raise FormatError(f"{where}: entry must be an object with dtype, shape and offsets")
    dtype, shape, offs = t["dtype"], t["shape"], t["offsets"]
    if not isinstance(dtype, str) or dtype not in ST_DTYPES:
        raise FormatError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(ST_DTYPES)})")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(x) and x >= 0 for x in shape):
        raise FormatError(f"{where}: shape {shape!r} is not a list of sizes >= 0")
    if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(x) for x in offs):
        raise FormatError(f"{where}: offsets {offs!r} is not a pair [start, end]")
    start, end = offs
    if not 8 <= start <= end <= file_bytes:
        raise FormatError(f"{where}: offsets [{start}, {end}] do not lie inside the file's {file_bytes} bytes")
    numel = 1
    for x in shape:
        numel *= x
    if (end - start) != numel * ST_DTYPES[dtype].itemsize:
        raise FormatError(f"{where}: offsets [{start}, {end}] hold {end - start} bytes; shape {shape} of {dtype} needs "
                          f"{numel * ST_DTYPES[dtype].itemsize}")
    return TensorInfo(n, dtype, tuple(shape), start, end)


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
        index = self.__dict__.get("_index")
        if index is None or len(index) != len(self.files):
            index = self.__dict__["_index"] = {f.name: f for f in self.files}
        entry = index.get(name)
        if entry is None:
            raise KeyError(name)
        return entry

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
        if not is_file(folder, MANIFEST_NAME):
            if not folder.exists():
                raise FormatError(f"{folder}: no such folder")
            if not folder.is_dir():
                raise FormatError(f"{folder}: not a folder (a LayerRun model is a folder with {MANIFEST_NAME})")
            if os.path.lexists(path):
                read_json(folder, MANIFEST_NAME, "manifest", MAX_MANIFEST_BYTES)  # says why it cannot be read
            hint = ""
            if any(folder.glob(".*.tmp")) or (folder / ".convert-state.json").exists():
                hint = " (a conversion into it was interrupted: run `layerrun convert` again to resume)"
            elif (folder / "config.json").exists():
                hint = " (this looks like a Hugging Face folder: run `layerrun convert` on it first)"
            raise FormatError(f"{folder}: not a LayerRun model, {MANIFEST_NAME} is missing{hint}")
        d = read_json(folder, MANIFEST_NAME, "manifest", MAX_MANIFEST_BYTES)
        if d.get("format") != FORMAT_NAME:
            raise FormatError(f"{path}: not a LayerRun manifest (format={d.get('format')!r})")
        version = d.get("format_version", 0)
        if not _is_int(version):
            raise FormatError(f"{path}: format_version {version!r} is not a number")
        if version > FORMAT_VERSION:
            raise FormatError(
                f"{path}: format version {version} is newer than this LayerRun supports "
                f"({FORMAT_VERSION}); upgrade layerrun"
            )
        known = {"format", "format_version", "model_type", "num_layers", "dtype", "tie_word_embeddings",
                 "layer_prefix", "quantization", "source", "files"}
        missing = [k for k in ("model_type", "num_layers", "dtype", "files") if k not in d]
        if missing:
            raise FormatError(f"{path}: manifest is malformed (it lacks {', '.join(missing)}); re-run `layerrun convert`")
        model_type, n, dtype, files = d["model_type"], d["num_layers"], d["dtype"], d["files"]
        if not isinstance(model_type, str) or not model_type:
            raise FormatError(f"{path}: model_type {model_type!r} is not a name")
        if not _is_int(n) or not 1 <= n <= MAX_LAYERS:
            raise FormatError(f"{path}: num_layers {n!r} is not a layer count (1..{MAX_LAYERS})")
        if not isinstance(dtype, str) or dtype not in STORAGE_DTYPES:
            raise FormatError(f"{path}: dtype {dtype!r} is not a storage dtype ({', '.join(STORAGE_DTYPES)})")
        if not isinstance(files, list):
            raise FormatError(f"{path}: files must be a list")
        quant = d.get("quantization")
        if quant is not None:
            quant = _check_quantization(path, quant)
        prefix = d.get("layer_prefix", "model.layers.{i}.")
        if not isinstance(prefix, str):
            raise FormatError(f"{path}: layer_prefix must be a string")
        source = d.get("source") or {}
        m = cls(
            model_type=model_type,
            num_layers=n,
            dtype=dtype,
            files=[FileEntry.from_json(f, str(path)) for f in files],
            source=source if isinstance(source, dict) else {},
            quantization=quant,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            layer_prefix=prefix,
            format_version=version,
            extra={k: v for k, v in d.items() if k not in known},
        )
        m._check_files(path)
        return m

    def _check_files(self, path: Path) -> None:
        """One entry per file; the embeddings, the final file and layers 0..num_layers-1 each exactly once;
        every float tensor in the manifest's dtype (quantized layers: their int parts and bf16 scales)."""
        seen: dict[str, FileEntry] = {}
        for f in self.files:
            if f.name in seen:
                raise FormatError(f"{path}: {f.name} is listed twice")
            seen[f.name] = f
        want = {"embeddings.safetensors": (KIND_EMBEDDINGS, None), "final.safetensors": (KIND_FINAL, None)}
        want.update({layer_file_name(i): (KIND_LAYER, i) for i in range(self.num_layers)})
        lost = [n for n in want if n not in seen]
        if lost:
            more = f" and {len(lost) - 3} more" if len(lost) > 3 else ""
            raise FormatError(f"{path}: no entry for {', '.join(lost[:3])}{more} (num_layers is {self.num_layers}); "
                              "the manifest is damaged: re-run `layerrun convert`")
        extra = [n for n in seen if n not in want]
        if extra:
            raise FormatError(f"{path}: unexpected file entries {', '.join(sorted(extra)[:3])} for a model of "
                              f"{self.num_layers} layers")
        for name, (kind, layer) in want.items():
            f = seen[name]
            if f.kind != kind or (kind == KIND_LAYER and f.layer != layer):
                raise FormatError(f"{path}: {name} has kind {f.kind!r} layer {f.layer!r}; expected {kind!r}"
                                  + (f" layer {layer}" if layer is not None else ""))
        stored = STORAGE_DTYPES[self.dtype]
        for f in self.files:
            for t in f.tensors.values():
                quant_part = self.quantization is not None and t.name.endswith((".q", ".scale", ".zero"))
                if quant_part:
                    continue  # checked against the scheme by formats.quant.check_quantized
                if t.dtype != stored:
                    kind = "a float" if ST_DTYPES[t.dtype].is_floating_point else "an integer"
                    raise FormatError(
                        f"{path}: {f.name}: tensor {t.name} is stored as {t.dtype} ({kind} type), but the model's "
                        f"dtype is {self.dtype} ({stored}); the file does not hold this model's weights"
                    )


def _check_quantization(path: Path, q) -> dict:
    from layerrun.formats.quant import GROUP_SIZES, QuantScheme

    if not isinstance(q, dict):
        raise FormatError(f"{path}: quantization must be an object or null")
    try:
        scheme = QuantScheme.from_json(q)
    except LayerRunError as e:
        raise FormatError(f"{path}: {e}") from None
    except (TypeError, ValueError):
        raise FormatError(f"{path}: quantization group_size {q.get('group_size')!r} is not a number") from None
    if scheme.group_size is not None and scheme.group_size not in GROUP_SIZES:
        raise FormatError(f"{path}: quantization group_size {scheme.group_size} is not one of {GROUP_SIZES}")
    return q
