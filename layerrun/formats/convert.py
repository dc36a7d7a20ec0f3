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
import time
from collections.abc import Callable
from pathlib import Path

import torch

from layerrun import __version__
from layerrun.errors import FormatError, LayerRunError
from layerrun.formats.aligned import ALIGN, write_aligned
from layerrun.formats.destination import (
    BOOKKEEPING,
    LOCK_NAME,
    STATE_NAME,
    ConvertLock,
    check_free_space,
    check_overwrites,
    owned_names,
    write_error,
)
from layerrun.formats.files import open_file, optional_json, write_new
from layerrun.formats.hf import AUX_FILES
from layerrun.formats.integrity import Stamp
from layerrun.formats.manifest import (
    KIND_LAYER,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    layer_file_name,
)
from layerrun.formats.source import ModelSource, layer_prefix_of, split_name
from layerrun.formats.validate import sha256_fd

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def open_source(src: str | Path) -> ModelSource:
    """A HF folder or a ``.gguf`` file."""
    p = Path(src)
    if not os.path.lexists(p):
        raise FormatError(f"{p}: no such file or folder")
    if p.is_dir():
        from layerrun.formats.hf import HFSource

        if os.path.lexists(p / MANIFEST_NAME):
            raise FormatError(f"{p}: is already a LayerRun model ({MANIFEST_NAME}); it needs no conversion")

        return HFSource(p)
    if p.suffix.lower() == ".gguf":
        from layerrun.formats.gguf import GGUFSource

        return GGUFSource(p)  # refuses anything but a regular file (a FIFO would block)
    raise FormatError(f"{p}: expected a Hugging Face model folder or a .gguf file")


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


def _check_expected(groups, model, tie: bool, where="source") -> None:
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
        raise FormatError(f"{where}: the source does not match its config: " + "; ".join(problems))


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
        from layerrun.formats.quant import parse_scheme

        scheme = parse_scheme(quantize)  # a bad --quantize fails before the source is opened
    if not hasattr(src, "tensor_names"):
        _check_distinct(Path(src), dst)
    source = src if hasattr(src, "tensor_names") else open_source(src)
    where = getattr(source, "path", None) or getattr(source, "folder", None) or "source"
    try:
        config = source.config
        try:
            model = build_model(config)
        except LayerRunError as e:
            raise type(e)(f"{where}: {e}") from None
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
        _check_expected(groups, model, tie, where)
        exp = model.expected_tensors()
        for fname, members in groups.items():
            want = exp["layer"] if fname.startswith("layer_") else exp[fname.split(".")[0]]
            for short, full in members.items():
                shp = tuple(source.tensor_shape(full))
                if short in want and shp != tuple(want[short]):
                    raise FormatError(f"{where}: tensor {full} has shape {list(shp)}, config implies {list(want[short])}")
                dt = source.tensor_dtype(full)
                if not dt.is_floating_point:
                    raise FormatError(f"{where}: tensor {full} is stored as {str(dt).replace('torch.', '')}; model "
                                      "weights must be floating point (F32, F16 or BF16)")

        fingerprint = f"{source.fingerprint()}:{DTYPE_NAMES[out_dtype]}"
        if scheme is not None:
            fingerprint += f":{scheme.name}"  # a resumed conversion never mixes schemes
        if dst.exists() and not dst.is_dir():
            raise LayerRunError(f"{dst}: exists and is not a folder")
        if (dst / MANIFEST_NAME).exists() and not force:
            raise LayerRunError(f"{dst}: already holds a converted model; pass --force to overwrite it")
        dst.mkdir(parents=True, exist_ok=True)
        with ConvertLock(dst):
            return _convert_locked(source, dst, model, config, groups, names, out_dtype, scheme, fingerprint,
                                   tie, force, progress, log, where)
    finally:
        source.close()


def _check_distinct(src: Path, dst: Path) -> None:
    """`convert SRC SRC` (or a destination inside a GGUF's own name) would write over the source."""
    if dst.exists() and src.exists() and os.path.samefile(src, dst):
        raise LayerRunError(f"{dst}: the destination is the source itself; convert into another folder")


def _aux_bytes(source) -> int:
    """About what the tokenizer and config files will take (a GGUF's tokenizer.json is built, not copied)."""
    folder = getattr(source, "folder", None)
    if folder is not None:
        return sum(os.lstat(folder / n).st_size for n in _aux_names(source) if os.path.lexists(folder / n))
    tokens = getattr(source, "header", None) and source.header.metadata.get("tokenizer.ggml.tokens")
    return 64 * sum(len(t) + 8 for t in tokens) if isinstance(tokens, list) else 0


def _aux_names(source) -> list[str]:
    names = getattr(source, "aux_names", None)
    return list(names()) if names else list(AUX_FILES)


def _convert_locked(source, dst: Path, model, config: dict, groups, names, out_dtype, scheme, fingerprint: str,
                    tie: bool, force: bool, progress: bool, log, where) -> Manifest:
    """The conversion proper, holding the destination's lock."""
    if scheme is not None:
        from layerrun.formats.quant import quantizable, quantize_tensor
    owned = owned_names(dst)
    order = ["embeddings.safetensors"] + [layer_file_name(i) for i in range(model.args.num_hidden_layers)]
    order.append("final.safetensors")
    aux_names = set(_aux_names(source)) | {"config.json"}
    will_write = set(order) | aux_names | {MANIFEST_NAME, STATE_NAME}
    will_write |= {f".{n}.tmp" for n in will_write}
    present = set(os.listdir(dst)) - {LOCK_NAME}
    state_path = dst / STATE_NAME
    if present and not os.path.lexists(state_path) and not force:
        raise LayerRunError(f"{dst}: folder is not empty; choose an empty folder or pass --force")
    check_overwrites(dst, will_write, owned)
    if force and os.path.lexists(dst / MANIFEST_NAME):
        (dst / MANIFEST_NAME).unlink()  # from here on the folder no longer looks complete

    state = {"fingerprint": fingerprint, "done": {}}
    if os.path.lexists(state_path) and not force:
        try:
            old = optional_json(dst, STATE_NAME, "conversion state") or {}
        except FormatError:
            old = {}
        if old.get("fingerprint") == fingerprint and isinstance(old.get("done"), dict):
            state["done"] = {n: e for n, e in old["done"].items() if n in order and isinstance(e, dict)}
            if state["done"]:
                log(f"resuming: {len(state['done'])} file(s) already converted")

    def save_state():
        write_new(dst, STATE_NAME, json.dumps(state).encode())

    def out_bytes(fname):
        total = 0
        for short, n in groups.get(fname, {}).items():
            numel = torch.Size(source.tensor_shape(n)).numel()
            size = numel * _out_dtype(source.tensor_dtype(n), out_dtype).itemsize
            if scheme is not None and fname.startswith("layer_") and short.endswith(".weight") \
                    and len(source.tensor_shape(n)) == 2:
                size = numel * scheme.bits // 8 + numel // (scheme.group_size or source.tensor_shape(n)[1]) * 4
            total += size
        return total

    total = sum(out_bytes(f) for f in order)
    done_bytes = sum(out_bytes(f) for f in state["done"])
    headers = 2 * ALIGN * (len(order) - len(state["done"]))  # each file's header, padded to a block
    try:
        save_state()
        check_free_space(dst, total - done_bytes + headers + _aux_bytes(source))
    except OSError as e:
        raise write_error(e, dst, STATE_NAME, total - done_bytes) from None
    # A source whose get() takes a dtype (GGUF, HF folders) casts chunk by chunk: no whole float32 copy.
    takes_dtype = "dtype" in inspect.signature(source.get).parameters
    bar = _Progress(total, progress, "converting")
    entries: list[FileEntry] = []
    stamped = []
    written_bytes = 0
    t0 = time.perf_counter()
    try:
        for fname in order:
            kind = fname.split(".")[0] if not fname.startswith("layer_") else KIND_LAYER
            layer = int(fname[6:].split(".")[0]) if kind == KIND_LAYER else None
            done = state["done"].get(fname)
            if done is not None:
                kept = _recheck(dst, fname, done, log)  # a file from an earlier run: is it still what it was?
                if kept is not None:
                    entries.append(kept[0])
                    stamped.append((fname, kept[0].sha256, kept[1]))
                    bar.advance(out_bytes(fname))
                    continue
                del state["done"][fname]
            tensors = {}
            for short, full in groups.get(fname, {}).items():
                if takes_dtype and (scheme is None or kind != KIND_LAYER):  # quantize_tensor wants source values
                    t = source.get(full, dtype=_out_dtype(source.tensor_dtype(full), out_dtype))
                else:
                    t = source.get(full)
                _check_finite(where, full, t, out_dtype)
                if scheme is not None and kind == KIND_LAYER and quantizable(short, t):
                    parts = quantize_tensor(t, scheme)  # from the source values, not a storage-dtype cast
                    if parts is not None:
                        tensors.update({short + sfx: p for sfx, p in parts.items()})
                        continue
                tensors[short] = t.to(_out_dtype(t.dtype, out_dtype))
            tmp = dst / f".{fname}.tmp"
            try:
                _unlink(tmp)
                infos, nbytes, sha = write_aligned(tmp, tensors, metadata={"format": "pt", "layerrun": kind})
                os.replace(tmp, dst / fname)
            except OSError as e:
                _unlink(tmp)
                raise write_error(e, dst, fname, total - done_bytes - written_bytes) from None
            written_bytes += nbytes
            entry = FileEntry(fname, kind, nbytes, sha, {i.name: i for i in infos}, layer)
            entries.append(entry)
            stamped.append((fname, sha, None))
            state["done"][fname] = entry.to_json()
            try:
                save_state()
            except OSError as e:
                raise write_error(e, dst, STATE_NAME, total - done_bytes - written_bytes) from None
            bar.advance(out_bytes(fname), desc=f"converting {fname}")  # as the total counts it (quantized sizes)
            del tensors
    finally:
        bar.close()

    try:
        for n in aux_names:
            _unlink(dst / n)  # ours (check_overwrites said so): written afresh, never through a link
        aux = source.write_aux_files(dst)
        if "config.json" not in aux:
            write_new(dst, "config.json", json.dumps(config, indent=2).encode())
            aux = [*aux, "config.json"]
        written = set(order) | set(aux)
        for stale in owned - written - BOOKKEEPING:  # an earlier conversion's files this one does not replace
            if not stale.endswith(".tmp") or not os.path.lexists(dst / stale[1:-4]):
                _unlink(dst / stale)
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
            extra={"aux_files": sorted(aux)},
        )
        manifest.write(dst)
    except OSError as e:
        raise write_error(e, dst, MANIFEST_NAME, 0) from None
    state_path.unlink(missing_ok=True)
    # Files written (hashed as written) or re-checked in this run need no hash at their first load.
    Stamp(dst).add([(n, sha, st or os.stat(dst / n)) for n, sha, st in stamped])
    return manifest


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _recheck(dst: Path, fname: str, done: dict, log) -> tuple[FileEntry, os.stat_result] | None:
    """A file an interrupted run wrote: keep it only if it still hashes to what that run recorded."""
    try:
        entry = FileEntry.from_json(done, str(dst / STATE_NAME))
        fd, st = open_file(dst, fname, "converted file")
    except FormatError:
        log(f"{fname}: missing or unreadable since the interrupted run; converting it again")
        return None
    try:
        if entry.name != fname or st.st_size != entry.bytes or sha256_fd(fd, st.st_size) != entry.sha256:
            log(f"{fname}: changed since the interrupted run; converting it again")
            return None
    finally:
        os.close(fd)
    return entry, st


def _check_finite(where, name: str, t: torch.Tensor, out: torch.dtype) -> None:
    if not t.is_floating_point() or not t.numel():
        return
    lo, hi = torch.aminmax(t.reshape(-1))
    if torch.isfinite(lo) and torch.isfinite(hi):
        return
    if out == torch.float16 and t.dtype == torch.float16:
        raise FormatError(f"{where}: tensor {name} has values outside float16's range (±65504) or NaN: convert with "
                          "--dtype bfloat16 or float32")
    raise FormatError(f"{where}: tensor {name} holds NaN/Inf values; the source is damaged")


def _out_dtype(src: torch.dtype, out: torch.dtype) -> torch.dtype:
    """Floating tensors take the output dtype; integer tensors keep theirs."""
    return out if src.is_floating_point else src
