"""What the converter reads from: a model source (a Hugging Face folder or a GGUF file).

A source exposes its config (Hugging Face ``config.json`` field names), the names
and shapes of its tensors under Hugging Face names, one tensor at a time (so a
conversion never holds more than a layer), and the auxiliary files (tokenizer,
chat template, generation config) it can place into the destination folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

import torch

LAYER_RE = re.compile(r"^(?P<prefix>.*?layers\.)(?P<idx>\d+)\.(?P<rest>.+)$")


class ModelSource(Protocol):
    config: dict

    def description(self) -> dict: ...

    def fingerprint(self) -> str: ...

    def tensor_names(self) -> list[str]: ...

    def tensor_shape(self, name: str) -> tuple[int, ...]: ...

    def tensor_dtype(self, name: str) -> torch.dtype: ...

    def get(self, name: str) -> torch.Tensor:
        """The tensor's values. A source may also accept ``get(name, dtype=...)`` and cast while it
        reads (the converter then asks for the storage dtype, so no whole-precision copy is held)."""
        ...

    def write_aux_files(self, dst: Path) -> list[str]: ...

    def close(self) -> None: ...


def split_name(name: str) -> tuple[str, int | None, str]:
    """Map a Hugging Face tensor name to (group, layer index, name inside the group file).

    ``model.layers.3.self_attn.q_proj.weight`` -> ("layer", 3, "self_attn.q_proj.weight");
    ``model.embed_tokens.weight`` -> ("embeddings", None, "embed_tokens.weight");
    ``model.norm.weight`` -> ("final", None, "norm.weight"); ``lm_head.weight`` likewise.
    """
    m = LAYER_RE.match(name)
    if m:
        return "layer", int(m.group("idx")), m.group("rest")
    short = name[len("model.") :] if name.startswith("model.") else name
    if "embed_tokens" in short:
        return "embeddings", None, short
    return "final", None, short


def layer_prefix_of(names: list[str]) -> str:
    for n in names:
        m = LAYER_RE.match(n)
        if m:
            return m.group("prefix") + "{i}."
    return "model.layers.{i}."


def row_chunks(rows: int, row_bytes: int, chunk_bytes: int):
    """(first row, row count) for chunks of about ``chunk_bytes`` of stored data (at least one row):
    how the sources read and cast or dequantize a large tensor without a whole-tensor temporary."""
    step = max(1, chunk_bytes // max(1, row_bytes))
    for r in range(0, rows, step):
        yield r, min(step, rows - r)
