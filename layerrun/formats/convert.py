"""Convert a model source into the layered format, streaming one file at a time.

Peak memory is about one layer: tensors are read from the source one at a time
(safetensors mmap, or GGUF dequantised per tensor), cast, written to a temp
file and renamed into place. A state file records each finished file, so an
interrupted conversion resumes where it stopped; the manifest is written last,
so an unfinished folder never looks complete.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from layerrun import __version__
from layerrun.errors import FormatError, LayerRunError
from layerrun.formats.aligned import write_aligned
from layerrun.formats.manifest import (
    KIND_LAYER,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    layer_file_name,
)
from layerrun.formats.source import ModelSource, layer_prefix_of, split_name

STATE_NAME = ".convert-state.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def open_source(src: str | Path) -> ModelSource:
    """A HF folder or a ``.gguf`` file."""
    p = Path(src)
    if not p.exists():
        raise FormatError(f"{p}: no such file or folder")
    if p.is_file() and p.suffix.lower() == ".gguf":
        from layerrun.formats.gguf import GGUFSource

        return GGUFSource(p)
    if p.is_file():
        raise FormatError(f"{p}: expected a Hugging Face model folder or a .gguf file")
    from layerrun.formats.hf import HFSource

    return HFSource(p)


def choose_dtype(requested: str, source_dtypes: set[torch.dtype]) -> tuple[torch.dtype, str | None]:
    """The storage dtype for ``--dtype`` and a note to show the user, if any."""
    if requested != "auto":
        if requested not in DTYPES:
            raise LayerRunError(f"--dtype {requested!r} is not one of: auto, {', '.join(DTYPES)}")
        note = None
        if requested == "float16":
            note = "float16 weights are computed in float32 on CPU (CPUs without fp16 units are very slow at fp16)"
        return DTYPES[requested], note
    floats = {d for d in source_dtypes if d.is_floating_point}
    if floats == {torch.bfloat16}:
        return torch.bfloat16, None
    if floats == {torch.float16}:
        return torch.bfloat16, (
            "source is float16; storing bfloat16 because fp16 compute is extremely slow on CPUs "
            "(pass --dtype float16 to keep it, e.g. for a CUDA-only setup)"
        )
    return torch.float32, None


class _Progress:
    """A rich progress bar with bytes and ETA, or nothing when disabled."""

    def __init__(self, total: int, enabled: bool, label: str):
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                transient=False,
                console=Console(stderr=True),
            )
            self.bar.start()
            self.task = self.bar.add_task(label, total=total)

    def advance(self, n: int, desc: str | None = None) -> None:
        if self.bar:
            self.bar.update(self.task, advance=n, **({"description": desc} if desc else {}))

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def _group(source: ModelSource, model) -> dict[str, dict[str, str]]:
    """Output file name -> {name inside file: source tensor name}."""
    groups: dict[str, dict[str, str]] = {}
    n_layers = model.args.num_hidden_layers
    for name in source.tensor_names():
        kind, idx, short = split_name(name)
        if kind == KIND_LAYER:
            if idx >= n_layers:
                raise FormatError(f"tensor {name} belongs to layer {idx}, but config says num_hidden_layers={n_layers}")
            fname = layer_file_name(idx)
        else:
            fname = f"{kind}.safetensors"
        groups.setdefault(fname, {})[short] = name
    return groups


def _some(names: list[str], show: int = 12) -> str:
    """A sorted list for an error message; a long one (a config that disagrees with a checkpoint's
    expert count, say) is cut after ``show`` names with a count of the rest."""
    names = sorted(names)
    more = f" ... and {len(names) - show} more ({len(names)} in all)" if len(names) > show else ""
    return ", ".join(names[:show]) + more


def _check_expected(groups, model, tie: bool) -> None:
    """Strict load: every missing and unexpected tensor, sorted, in one message."""
    exp = model.expected_tensors()
    missing, unexpected, bad_shape = [], [], []
    checks = [("embeddings.safetensors", exp["embeddings"])]
    checks += [(layer_file_name(i), exp["layer"]) for i in range(model.args.num_hidden_layers)]
    checks.append(("final.safetensors", exp["final"]))
    for fname, want in checks:
        have = groups.get(fname, {})
        for n in want:
            if n not in have:
                missing.append(f"{fname}:{n}")
        for n in have:
            if n not in want and not (tie and n == "lm_head.weight"):
                unexpected.append(f"{fname}:{n}")
    problems = []
    if missing:
        problems.append(f"missing tensors: {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_some(unexpected)}")
    if bad_shape:
        problems.append(f"shape mismatches: {', '.join(bad_shape)}")
    if problems:
        raise FormatError("source does not match its config: " + "; ".join(problems))


def convert(
    src,
    dst: str | Path,
    dtype: str = "auto",
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    quantize: str | None = None,
) -> Manifest:
    """Convert ``src`` (HF folder, GGUF file, or a ModelSource object) into the layered folder ``dst``.

    ``quantize`` ("int8", "int4", or with a group size such as "int4-g32"; see
    :mod:`layerrun.formats.quant`) stores the decoder layers' weights quantized;
    everything else keeps ``dtype``.
    """
    from layerrun.models import build_model

    log = log or (lambda s: None)
    dst = Path(dst)
    scheme = None
    if quantize:
        from layerrun.formats.quant import parse_scheme, quantizable, quantize_tensor

        scheme = parse_scheme(quantize)  # a bad --quantize fails before the source is opened
    source = src if hasattr(src, "tensor_names") else open_source(src)
    try:
        config = source.config
        model = build_model(config)
        tie = bool(config.get("tie_word_embeddings", model.args.tie_word_embeddings))
        names = source.tensor_names()
        out_dtype, note = choose_dtype(dtype, {source.tensor_dtype(n) for n in names})
        if note:
            log(f"note: {note}")

        groups = _group(source, model)
        for fname in list(groups):
            groups[fname] = {k: groups[fname][k] for k in model.sanitize(dict.fromkeys(groups[fname]))}
        if tie:
            groups.get("final.safetensors", {}).pop("lm_head.weight", None)
        _check_expected(groups, model, tie)
        exp = model.expected_tensors()
        for fname, members in groups.items():
            want = exp["layer"] if fname.startswith("layer_") else exp[fname.split(".")[0]]
            for short, full in members.items():
                shp = tuple(source.tensor_shape(full))
                if short in want and shp != tuple(want[short]):
                    raise FormatError(f"tensor {full} has shape {list(shp)}, config implies {list(want[short])}")

        fingerprint = f"{source.fingerprint()}:{DTYPE_NAMES[out_dtype]}"
        if scheme is not None:
            fingerprint += f":{scheme.name}"  # a resumed conversion never mixes schemes
        if (dst / MANIFEST_NAME).exists():
            if not force:
                raise LayerRunError(f"{dst}: already holds a converted model; pass --force to overwrite it")
            (dst / MANIFEST_NAME).unlink()
        if dst.exists() and not dst.is_dir():
            raise LayerRunError(f"{dst}: exists and is not a folder")
        dst.mkdir(parents=True, exist_ok=True)
        if any(dst.iterdir()) and not (dst / STATE_NAME).exists() and not force:
            raise LayerRunError(f"{dst}: folder is not empty; choose an empty folder or pass --force")

        state = {"fingerprint": fingerprint, "done": {}}
        state_path = dst / STATE_NAME
        if state_path.exists() and not force:
            try:
                old = json.loads(state_path.read_text())
                if old.get("fingerprint") == fingerprint:
                    state = old
                    if state["done"]:
                        log(f"resuming: {len(state['done'])} file(s) already converted")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError):
                pass

        def save_state():
            tmp = dst / (STATE_NAME + ".tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, state_path)

        save_state()
        order = ["embeddings.safetensors"] + [layer_file_name(i) for i in range(model.args.num_hidden_layers)]
        order.append("final.safetensors")

        def out_bytes(fname):
            return sum(
                torch.Size(source.tensor_shape(n)).numel() * _out_dtype(source.tensor_dtype(n), out_dtype).itemsize
                for n in groups.get(fname, {}).values()
            )

        total = sum(out_bytes(f) for f in order)
        # A source whose get() takes a dtype (GGUF, HF folders) casts chunk by chunk: no whole float32 copy.
        takes_dtype = "dtype" in inspect.signature(source.get).parameters
        bar = _Progress(total, progress, "converting")
        entries: list[FileEntry] = []
        t0 = time.perf_counter()
        try:
            for fname in order:
                kind = fname.split(".")[0] if not fname.startswith("layer_") else KIND_LAYER
                layer = int(fname[6:9]) if kind == KIND_LAYER else None
                done = state["done"].get(fname)
                if done and (dst / fname).is_file() and (dst / fname).stat().st_size == done["bytes"]:
                    entries.append(FileEntry.from_json(done))
                    bar.advance(out_bytes(fname))
                    continue
                tensors = {}
                converted = 0  # source bytes at the storage dtype, as the progress total counts them
                for short, full in groups.get(fname, {}).items():
                    if takes_dtype and (scheme is None or kind != KIND_LAYER):  # quantize_tensor wants source values
                        t = source.get(full, dtype=_out_dtype(source.tensor_dtype(full), out_dtype))
                    else:
                        t = source.get(full)
                    converted += t.numel() * _out_dtype(t.dtype, out_dtype).itemsize
                    if scheme is not None and kind == KIND_LAYER and quantizable(short, t):
                        parts = quantize_tensor(t, scheme)  # from the source values, not a storage-dtype cast
                        if parts is not None:
                            tensors.update({short + sfx: p for sfx, p in parts.items()})
                            continue
                    tensors[short] = t.to(_out_dtype(t.dtype, out_dtype))
                tmp = dst / f".{fname}.tmp"
                infos, nbytes, sha = write_aligned(tmp, tensors, metadata={"format": "pt", "layerrun": kind})
                os.replace(tmp, dst / fname)
                entry = FileEntry(fname, kind, nbytes, sha, {i.name: i for i in infos}, layer)
                entries.append(entry)
                state["done"][fname] = entry.to_json()
                save_state()
                bar.advance(converted, desc=f"converting {fname}")
                del tensors
        finally:
            bar.close()

        aux = source.write_aux_files(dst)
        if "config.json" not in aux:
            (dst / "config.json").write_text(json.dumps(config, indent=2))
        manifest = Manifest(
            model_type=config["model_type"],
            num_layers=model.args.num_hidden_layers,
            dtype=DTYPE_NAMES[out_dtype],
            files=entries,
            source={**source.description(), "converted_by": f"layerrun {__version__}",
                    "seconds": round(time.perf_counter() - t0, 2)},
            tie_word_embeddings=tie,
            layer_prefix=layer_prefix_of(names),
            quantization=scheme.to_json() if scheme is not None else None,
        )
        manifest.write(dst)
        state_path.unlink(missing_ok=True)
        return manifest
    finally:
        source.close()


def _out_dtype(src: torch.dtype, out: torch.dtype) -> torch.dtype:
    """Floating tensors take the output dtype; integer tensors keep theirs."""
    return out if src.is_floating_point else src


def remove_partial(dst: Path) -> None:
    """Remove an interrupted conversion (used by --force on a non-empty folder)."""
    if (dst / MANIFEST_NAME).exists():
        return
    shutil.rmtree(dst, ignore_errors=True)
