"""Shared fixtures: tiny random-weight models built from transformers configs.

Building and converting a tiny model takes well under a second; each is built
once per test session into a temporary folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """tiny_hf(name) -> Path of a Hugging Face folder (see tools/tiny_models.py SPECS)."""
    import tiny_models

    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = tiny_models.build(name, tmp_path_factory.mktemp(f"hf_{name}"))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_layered(tiny_hf, tmp_path_factory):
    """tiny_layered(name) -> Path of the converted layered folder (do not modify it)."""
    from layerrun.formats.convert import convert

    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            dst = tmp_path_factory.mktemp(f"lr_{name}") / "model"
            convert(tiny_hf(name), dst, progress=False)
            cache[name] = dst
        return cache[name]

    return get
