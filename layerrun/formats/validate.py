"""`layerrun validate`: is a layered folder complete and consistent?

Checks that every file in the manifest is present with the recorded size and
sha256, that each file's own safetensors header agrees with the manifest, and
that tensor shapes agree with what config.json implies. Returns every problem,
not just the first.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from layerrun.errors import LayerRunError
from layerrun.formats.aligned import read_header
from layerrun.formats.manifest import Manifest, layer_file_name

HASH_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def validate_folder(
    folder: str | Path,
    check_sha: bool = True,
    on_file: Callable[[str], None] | None = None,
) -> list[str]:
    """Every problem found, as one line each; an empty list means the folder is valid."""
    folder = Path(folder)
    manifest = Manifest.read(folder)  # raises FormatError with a clear message
    problems: list[str] = []
    for entry in manifest.files:
        if on_file:
            on_file(entry.name)
        path = folder / entry.name
        if not path.is_file():
            problems.append(f"{entry.name}: missing")
            continue
        size = os.path.getsize(path)
        if size != entry.bytes:
            what = "truncated" if size < entry.bytes else "too long"
            problems.append(f"{entry.name}: {what}: {size} bytes, manifest says {entry.bytes}")
            continue
        try:
            with open(path, "rb") as f:
                infos, _ = read_header(f, path, size)
        except LayerRunError as e:
            problems.append(f"{entry.name}: {e}")
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
            digest = sha256_file(path)
            if digest != entry.sha256:
                problems.append(f"{entry.name}: sha256 mismatch: file {digest[:16]}…, manifest {entry.sha256[:16]}…")
    problems.extend(check_shapes(folder, manifest))
    return problems


def check_shapes(folder: Path, manifest: Manifest) -> list[str]:
    """Tensor shapes against config.json: missing, unexpected and mismatched tensors."""
    from layerrun.models import build_model

    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return ["config.json: missing"]
    try:
        model = build_model(json.loads(cfg_path.read_text()))
    except LayerRunError as e:
        return [f"config.json: {e}"]
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        return [f"config.json: cannot be read as a model config ({e})"]
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
