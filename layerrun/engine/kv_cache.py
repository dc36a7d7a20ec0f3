"""A layer-wise KV cache.

Each layer owns a preallocated (B, n_kv_heads, capacity, head_dim) buffer for
keys and values that grows by doubling, so decode steps append without
allocating. The engine hands each layer its own :class:`LayerKV`.
"""

from __future__ import annotations

import torch

MIN_CAPACITY = 256


class LayerKV:
    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    @property
    def nbytes(self) -> int:
        if self.k is None:
            return 0
        return 2 * self.k.numel() * self.k.element_size()

    def _grow(self, k: torch.Tensor, need: int) -> None:
        B, H, _, D = k.shape
        cap = max(MIN_CAPACITY, 1 << (need - 1).bit_length())
        nk = torch.empty((B, H, cap, D), dtype=k.dtype, device=k.device)
        nv = torch.empty_like(nk)
        if self.k is not None and self.length:
            nk[:, :, : self.length] = self.k[:, :, : self.length]
            nv[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = nk, nv

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v of shape (B, n_kv, T, D); return the full (B, n_kv, S, D) views."""
        T = k.shape[2]
        need = self.length + T
        if self.k is None or need > self.k.shape[2] or self.k.dtype != k.dtype:
            self._grow(k, need)
        self.k[:, :, self.length : need] = k
        self.v[:, :, self.length : need] = v
        self.length = need
        return self.k[:, :, :need], self.v[:, :, :need]


class KVCache:
    def __init__(self, num_layers: int):
        self.layers = [LayerKV() for _ in range(num_layers)]

    def __getitem__(self, i: int) -> LayerKV:
        return self.layers[i]

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)


def _rows(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.index_select(0, idx.to(t.device))


def layer_select_rows(layer: LayerKV, idx: torch.Tensor) -> None:
    """Keep only the batch rows ``idx`` (a finished sequence leaves the batch)."""
    layer.k, layer.v = _rows(layer.k, idx), _rows(layer.v, idx)


def layer_add_rows(layer: LayerKV, n: int) -> None:
    """Append ``n`` empty rows (sequences joining the batch); their keys are masked until written."""
    if layer.k is None or n == 0:
        return
    B, H, C, D = layer.k.shape
    z = torch.zeros((n, H, C, D), dtype=layer.k.dtype, device=layer.k.device)
    layer.k = torch.cat([layer.k, z])
    layer.v = torch.cat([layer.v, z.clone()])


def layer_drop_prefix(layer: LayerKV, n: int) -> None:
    """Drop the first ``n`` columns (padding that no live sequence uses any more)."""
    if layer.k is None or n == 0:
        return
    keep = layer.length - n
    k = layer.k[:, :, n : layer.length].clone()
    v = layer.v[:, :, n : layer.length].clone()
    layer.k, layer.v, layer.length = None, None, 0
    if keep:
        layer._grow(k, keep)
        layer.k[:, :, :keep] = k
        layer.v[:, :, :keep] = v
        layer.length = keep
