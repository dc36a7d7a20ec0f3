"""`layerrun validate`: is a layered folder complete and consistent?

Checks that every file in the manifest is present with the recorded size and
sha256, holds no NaN/Inf in its float tensors, that each file's own safetensors
header agrees with the manifest, and that tensor shapes agree with what
config.json implies. Returns every problem, not just the first. Files that
pass are recorded in the folder's verification stamp
(:mod:`layerrun.formats.integrity`), so the next run need not hash them again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from layerrun.errors import FormatError, LayerRunError
from layerrun.formats.aligned import ST_DTYPES, read_header
from layerrun.formats.files import MissingFileError, open_file, read_json
from layerrun.formats.integrity import HASH_CHUNK, Stamp
from layerrun.formats.manifest import FileEntry, Manifest, layer_file_name

FINITE_CHUNK = 8 * 1024 * 1024


def sha256_fd(fd: int, size: int) -> str:
    import hashlib

    h = hashlib.sha256()
    pos = 0
    while pos < size:
        b = os.pread(fd, min(HASH_CHUNK, size - pos), pos)
        if not b:
            break
        h.update(b)
        pos += len(b)
    return h.hexdigest()


def nonfinite_tensors(fd: int, entry: FileEntry) -> list[str]:
    """Float tensors of an open file holding NaN or Inf (read a chunk at a time, from the page cache
    the hash just filled)."""
    import torch

    bad = []
    for name, t in sorted(entry.tensors.items()):
        dt = ST_DTYPES[t.dtype]
        if not dt.is_floating_point or not t.nbytes:
            continue
        step = FINITE_CHUNK - FINITE_CHUNK % dt.itemsize
        for pos in range(t.start, t.end, step):
            raw = bytearray(os.pread(fd, min(step, t.end - pos), pos))
            if len(raw) % dt.itemsize:
                break  # short read: the size check reports it
            x = torch.frombuffer(raw, dtype=dt) if raw else None
            if x is not None and x.numel():
                lo, hi = torch.aminmax(x)
                if not (torch.isfinite(lo) and torch.isfinite(hi)):
                    bad.append(name)
                    break
    return bad


def validate_folder(
    folder: str | Path,
    check_sha: bool = True,
    on_file: Callable[[str], None] | None = None,
) -> list[str]:
    """Every problem found, as one line each; an empty list means the folder is valid."""
    folder = Path(folder)
    manifest = Manifest.read(folder)  # raises FormatError with a clear message
    problems: list[str] = []
    verified = []
    for entry in manifest.files:
        if on_file:
            on_file(entry.name)
        try:
            fd, st = open_file(folder, entry.name, "file")
        except MissingFileError:
            problems.append(f"{entry.name}: missing")
            continue
        except FormatError as e:
            problems.append(f"{entry.name}: {_reason(e, folder / entry.name)}")
            continue
        try:
            size = st.st_size
            if size != entry.bytes:
                what = "truncated" if size < entry.bytes else "too long"
                problems.append(f"{entry.name}: {what}: {size} bytes, manifest says {entry.bytes}")
                continue
            try:
                with os.fdopen(os.dup(fd), "rb") as f:
                    infos, _ = read_header(f, folder / entry.name, size)
            except LayerRunError as e:
                problems.append(f"{entry.name}: {_reason(e, folder / entry.name)}")
                continue
            if set(infos) != set(entry.tensors):
                extra = sorted(set(infos) - set(entry.tensors))
                lost = sorted(set(entry.tensors) - set(infos))
                problems.append(f"{entry.name}: header tensors differ from manifest (missing {lost}, unexpected {extra})")
            else:
                for n, t in entry.tensors.items():
                    if infos[n] != t:
                        problems.append(f"{entry.name}: tensor {n} header {infos[n].to_json()} != manifest {t.to_json()}")
            if check_sha:
                digest = sha256_fd(fd, size)
                if digest != entry.sha256:
                    problems.append(f"{entry.name}: sha256 mismatch: file {digest[:16]}…, manifest {entry.sha256[:16]}…")
                    continue
                bad = nonfinite_tensors(fd, entry)
                if bad:
                    problems.append(f"{entry.name}: NaN/Inf values in tensor(s) {', '.join(bad[:5])}")
                    continue
                verified.append((entry.name, entry.sha256, st))
        finally:
            os.close(fd)
    if verified:
        Stamp(folder).add(verified)
    problems.extend(check_shapes(folder, manifest))
    return problems


def _reason(e: Exception, path: Path) -> str:
    """A FormatError's message without its leading path (the caller prefixes the file name)."""
    msg = str(e)
    return msg[len(f"{path}: "):] if msg.startswith(f"{path}: ") else msg


def check_shapes(folder: Path, manifest: Manifest) -> list[str]:
    """Tensor shapes against config.json: missing, unexpected and mismatched tensors."""
    from layerrun.models import build_model

    try:
        config = read_json(folder, "config.json", "config")
    except MissingFileError:
        return ["config.json: missing"]
    except FormatError as e:
        return [f"config.json: {_reason(e, folder / 'config.json')}"]
    try:
        model = build_model(config)
    except LayerRunError as e:
        return [f"config.json: {e}"]
    return check_against_config(manifest, model)


def check_against_config(manifest: Manifest, model) -> list[str]:
    """What in the manifest disagrees with the model its config.json describes (every problem, one line
    each): layer count, missing / unexpected tensors, shapes, quantized parts. Reads no file."""
    exp = model.expected_tensors()
    problems = []
    if model.args.num_hidden_layers != manifest.num_layers:
        problems.append(f"config.json: num_hidden_layers={model.args.num_hidden_layers} but manifest has {manifest.num_layers} layers")
    checks = [("embeddings.safetensors", exp["embeddings"]), ("final.safetensors", exp["final"])]
    checks += [(layer_file_name(i), exp["layer"]) for i in range(manifest.num_layers)]
    for fname, want in checks:
        if not _has(manifest, fname):
            problems.append(f"{fname}: not in manifest")
            continue
        stored = manifest.file(fname).tensors
        if manifest.quantization:
            from layerrun.formats.quant import check_quantized, logical_tensors

            problems += [f"{fname}: {p}" for p in check_quantized(stored, manifest.quantization)]
            have = logical_tensors(stored, manifest.quantization)
        else:
            have = {n: tuple(t.shape) for n, t in stored.items()}
        for n in sorted(set(want) - set(have)):
            problems.append(f"{fname}: missing tensor {n}")
        for n in sorted(set(have) - set(want)):
            if not (n == "lm_head.weight" and manifest.tie_word_embeddings):
                problems.append(f"{fname}: unexpected tensor {n}")
        for n in sorted(set(want) & set(have)):
            if tuple(have[n]) != tuple(want[n]):
                problems.append(f"{fname}: tensor {n} has shape {list(have[n])}, config implies {list(want[n])}")
    return problems


def _has(manifest: Manifest, name: str) -> bool:
    try:
        manifest.file(name)
        return True
    except KeyError:
        return False

