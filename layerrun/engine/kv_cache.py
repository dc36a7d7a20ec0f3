"""A layer-wise KV cache.

Each layer owns a preallocated (B, n_kv_heads, capacity, head_dim) buffer for
keys and values that grows by doubling, so decode steps append without
allocating. The engine hands each layer its own :class:`LayerKV`.

When the governor finds no room for the cache on the compute device (a GPU
with little VRAM), it lives in host memory (pinned on CUDA) as
:class:`HostLayerKV` and travels with its layer: the engine asks for layer
i+1's keys and values to be copied to the device while layer i computes, the
new entries go back to the host as the layer appends them, and the device copy
is dropped after the layer, so the device holds one layer's cache at a time.
"""

from __future__ import annotations

import torch

MIN_CAPACITY = 256


class LayerKV:
    """``k`` and ``v`` (B, n_kv, capacity, D) are views of one buffer (B, 2 * n_kv, capacity, D), keys' heads
    then values', so that a step's new keys and values, which the projection makes side by side
    ((B, T, 2 * n_kv, D), :meth:`update_kv`), are written in one copy. Code that replaces ``k`` / ``v``
    (batch rows joining or leaving) may leave them separate tensors; the next ``update_kv`` joins them again."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0
        self._joint: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (k, v, (B, cap, 2*n_kv, D))

    @property
    def nbytes(self) -> int:
        if self.k is None:
            return 0
        return 2 * self.k.numel() * self.k.element_size()

    def _empty(self, shape, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    def _grow(self, k: torch.Tensor, need: int) -> None:
        B, H, _, D = k.shape
        cap = max(MIN_CAPACITY, 1 << (need - 1).bit_length())
        kv = self._empty((B, 2 * H, cap, D), k)
        nk, nv = kv[:, :H], kv[:, H:]
        if self.k is not None and self.length:
            nk[:, :, : self.length] = self.k[:, :, : self.length]
            nv[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = nk, nv
        self._joint = (nk, nv, kv.transpose(1, 2))

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

    def update_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' keys and values given side by side, ``kv`` (B, T, 2 * n_kv, D) (each
        token's key heads, then its value heads); return the full (B, n_kv, S, D) views of keys and values."""
        j = self._joint
        need = self.length + kv.shape[1]
        if j is None or self.k is not j[0] or self.v is not j[1] or need > j[2].shape[1] or j[2].dtype != kv.dtype:
            self._grow(kv[:, :, : kv.shape[2] // 2].transpose(1, 2), need)  # (joins k and v if they were apart)
            j = self._joint
        j[2][:, self.length : need] = kv
        self.length = need
        return j[0][:, :, :need], j[1][:, :, :need]


class HostLayerKV(LayerKV):
    """A layer's cache kept in host memory, brought to ``device`` for the layer's compute.

    On CUDA every copy is issued on the current (compute) stream, so copies and the attention that
    reads them run in order without events; the host side waits for that stream before it touches
    the buffers itself (growing, or the batch generator's row changes).
    """

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._dev: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (length, k, v) prefetched

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()

    def _empty(self, shape, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(shape, dtype=like.dtype, pin_memory=self.cuda)  # host memory, pinned for CUDA copies

    def _grow(self, k: torch.Tensor, need: int) -> None:
        self.sync()  # pending device -> host copies into the old buffers land first
        super()._grow(k, need)

    def prefetch(self) -> None:
        """Start copying the cached keys and values to the device (ahead of this layer's compute)."""
        if self.k is None or not self.length or (self._dev is not None and self._dev[0] == self.length):
            return
        n = self.length
        self._dev = (n, self.k[:, :, :n].to(self.device, non_blocking=True),
                     self.v[:, :, :n].to(self.device, non_blocking=True))

    def update_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        H = kv.shape[2] // 2
        return self.update(kv[:, :, :H].transpose(1, 2), kv[:, :, H:].transpose(1, 2))

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        n = self.length
        need = n + T
        self.prefetch()
        dev = self._dev
        if self.k is None or need > self.k.shape[2] or self.k.dtype != k.dtype:
            self._grow(k, need)
        self.k[:, :, n:need].copy_(k, non_blocking=True)  # device -> host, ordered on the stream
        self.v[:, :, n:need].copy_(v, non_blocking=True)
        self.length = need
        self._dev = None  # the device copy lives only for this layer's compute
        if dev is None:
            return k, v
        return torch.cat([dev[1], k], dim=2), torch.cat([dev[2], v], dim=2)


class KVCache:
    def __init__(self, num_layers: int, host_device: torch.device | str | None = None):
        """``host_device``: keep the cache in host memory and bring each layer's part to this device
        for its compute (:class:`HostLayerKV`); None keeps it where the layer computes."""
        self.layers = [HostLayerKV(host_device) if host_device is not None else LayerKV() for _ in range(num_layers)]

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


def _host_sync(layer: LayerKV) -> None:
    if isinstance(layer, HostLayerKV):
        layer.sync()  # pending device -> host copies must land before the host rearranges the buffers
        layer._dev = None


def layer_select_rows(layer: LayerKV, idx: torch.Tensor) -> None:
    """Keep only the batch rows ``idx`` (a finished sequence leaves the batch)."""
    _host_sync(layer)
    layer.k, layer.v = _rows(layer.k, idx), _rows(layer.v, idx)


def layer_add_rows(layer: LayerKV, n: int) -> None:
    """Append ``n`` empty rows (sequences joining the batch); their keys are masked until written."""
    if layer.k is None or n == 0:
        return
    _host_sync(layer)
    B, H, C, D = layer.k.shape
    z = torch.zeros((n, H, C, D), dtype=layer.k.dtype, device=layer.k.device)
    layer.k = torch.cat([layer.k, z])
    layer.v = torch.cat([layer.v, z.clone()])


def layer_drop_prefix(layer: LayerKV, n: int) -> None:
    """Drop the first ``n`` columns (padding that no live sequence uses any more)."""
    if layer.k is None or n == 0:
        return
    _host_sync(layer)
    keep = layer.length - n
    k = layer.k[:, :, n : layer.length].clone()
    v = layer.v[:, :, n : layer.length].clone()
    layer.k, layer.v, layer.length = None, None, 0
    if keep:
        layer._grow(k, keep)
        layer.k[:, :, :keep] = k
        layer.v[:, :, :keep] = v
        layer.length = keep


@torch.inference_mode()
def layer_keep_columns(layer: LayerKV, start: int, index: torch.Tensor) -> None:
    """Keep, of the columns from ``start`` on, only ``index`` (long (B, L), relative to ``start``) per
    row, gathered to ``start .. start + L``; the cache ends there. After a token tree is verified
    this keeps each row's accepted path, so the cache grows by what was accepted, not by the tree."""
    if layer.k is None:
        return
    _host_sync(layer)
    B, H, _, D = layer.k.shape
    L = index.shape[1]
    idx = (index.to(layer.k.device) + start)[:, None, :, None].expand(B, H, L, D)  # (B, H, L, D)
    k, v = layer.k.gather(2, idx), layer.v.gather(2, idx)
    layer.k[:, :, start : start + L] = k
    layer.v[:, :, start : start + L] = v
    layer.length = start + L
