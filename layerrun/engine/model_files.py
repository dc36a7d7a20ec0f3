"""Opening a layered model folder for the engine: config.json, and every file checked before use.

Both run before anything is sized by the folder's contents: a config or manifest that lies about the
files is refused here, naming the file, instead of becoming a huge allocation or an index error later.
"""

from __future__ import annotations

import os
from pathlib import Path

from layerrun.errors import FormatError, LayerRunError
from layerrun.formats.files import MissingFileError, read_json
from layerrun.formats.manifest import Manifest
from layerrun.models import build_model


def load_config(folder: Path) -> tuple[dict, object]:
    """config.json (an untrusted JSON object) and the model it builds; errors name the file."""
    try:
        config = read_json(folder, "config.json", "config")
    except MissingFileError:
        raise FormatError(f"{folder}: config.json is missing") from None
    try:
        return config, build_model(config)
    except LayerRunError as e:
        msg = str(e)
        raise type(e)(f"{folder}/{msg}" if msg.startswith("config.json") else f"{folder / 'config.json'}: {msg}") from None


def check_model_files(folder: Path, manifest: Manifest, model) -> None:
    """Before anything is allocated from the manifest's sizes: every file it names is a regular file
    inside the folder with the size the manifest says, and every tensor agrees with config.json."""
    from layerrun.formats.validate import check_against_config
    from layerrun.io.reader import check_size, open_layer_file

    problems = check_against_config(manifest, model)
    if problems:
        more = f" (and {len(problems) - 3} more; `layerrun validate {folder}` lists them all)" if len(problems) > 3 else ""
        raise FormatError(f"{folder}: the files do not match config.json: {'; '.join(problems[:3])}{more}")
    for entry in manifest.files:
        fd, st = open_layer_file(folder, entry)
        os.close(fd)
        check_size(folder, entry, st.st_size)
