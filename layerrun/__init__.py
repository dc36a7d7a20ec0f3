"""LayerRun: run language models larger than your memory by streaming layers from disk."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(path, **options):
    """Load a layered model folder (or a model-store name); see :class:`layerrun.engine.Engine`."""
    from layerrun.engine.engine import Engine

    return Engine(path, **options)
