"""Faster matrix products on CPU: oneDNN's linear kernel, with weights packed once where they stay.

Decode is a chain of matrix-vector products, and which kernel runs them decides the speed. Measured
on this project's machine (bench/RESULTS.md, "Compute speed"), one thread, a model's worth of weights
cycled through so they come from memory as in decode:

- float32: ``F.linear`` runs MKL's gemv at ~14-16 GB/s of weights; oneDNN's linear
  (``torch.ops.mkldnn._linear_pointwise``) on the same, unpacked tensor runs at ~20 GB/s, and 2x
  faster on a large-vocabulary head, with no copy: so it is used for every float32 weight, streamed
  ones included.
- bfloat16: ``F.linear`` runs at ~11 GB/s; oneDNN on a weight reordered into its blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``) at ~17 GB/s, ~32 GB/s on a large head (a 262k x 640
  head: 22 ms -> 10 ms). The reorder is a copy (about as slow as a memcpy of the weight), so only
  weights that stay resident are packed; streamed bfloat16 layers keep ``F.linear``.

Prefill is faster too (float32 with 16-512 rows: 2.4x), and bfloat16 results are bit-identical to
``F.linear``; float32 ones differ in summation order only (relative ~1e-6).

Faster still for decode is the compiled matrix-vector kernel (:mod:`layerrun.models.kernels`), which
reads the PLAIN row-major weight: where it is built and checked, a product of up to ``KERNEL_ROWS``
rows with one torch thread runs on it, larger ones on oneDNN (or ``F.linear``) on the same tensor. A
weight is then never reordered (the kernel would need the plain one kept next to the packed copy):
resident weights are owned plain copies, and streamed bfloat16 weights are wrapped too.

A weight is wrapped in :class:`FastLinear`, a tensor-like object that ``F.linear`` dispatches to (as
the quantized weights in :mod:`layerrun.formats.quant` do), so the model code is unchanged. Where
neither oneDNN nor the kernel runs the dtype, weights are left as they are.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from layerrun.models.kernels import Kernel, kernel

KINDS = ("float32", "bfloat16")
KERNEL_ROWS = 8  # the compiled kernel's rows at most; at 16 rows oneDNN is faster (bench/matvec_speed.py)


@functools.cache
def available(dtype: torch.dtype) -> bool:
    """Whether oneDNN's linear runs ``dtype`` here and agrees with ``F.linear`` (checked once)."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(48, 32, generator=g).to(dtype)
        x = torch.randn(3, 32, generator=g).to(dtype)
        b = torch.randn(48, generator=g).to(dtype)
        ref = F.linear(x, w, b).float()
        for weight in (w, torch.ops.mkldnn._reorder_linear_weight(w, 1)):
            got = torch.ops.mkldnn._linear_pointwise(x, weight, b, "none", [], "").float()
            if not torch.allclose(got, ref, rtol=1e-2, atol=1e-2):
                return False
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def kernel_for(dtype: torch.dtype) -> Kernel | None:
    """The compiled matrix-vector kernel when it runs ``dtype`` here, else None."""
    return kernel() if dtype in (torch.float32, torch.bfloat16) else None


def usable(dtype: torch.dtype) -> bool:
    """Whether :class:`FastLinear` is faster than ``F.linear`` for ``dtype`` here (kernel or oneDNN)."""
    return kernel_for(dtype) is not None or available(dtype)


class FastLinear:
    """A linear weight (N, K); ``F.linear(x, w, b)`` on it runs the compiled kernel (a few rows, one
    thread) or oneDNN.

    ``pack``: the weight stays resident. With the compiled kernel it is kept plain, copied into memory
    of its own if it views a larger buffer (a file's read buffer or memory map); without it, it is
    reordered into oneDNN's blocked layout (an opaque tensor, ``packed``) and the original is not kept.
    Otherwise ``weight`` is the plain tensor itself (no copy).
    """

    __slots__ = ("weight", "shape", "dtype", "packed", "kernel", "onednn")

    def __init__(self, weight: torch.Tensor, pack: bool):
        self.shape = weight.shape
        self.dtype = weight.dtype
        self.kernel = kernel_for(weight.dtype)
        self.onednn = available(weight.dtype)
        self.packed = pack and self.kernel is None and self.onednn
        if self.packed:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
        elif self.kernel is not None and weight.dim() == 2 and weight.stride(1) != 1:
            self.weight = weight.contiguous()
        elif pack and _is_view(weight):
            self.weight = weight.clone()
        else:
            self.weight = weight

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def ndim(self) -> int:
        return 2

    def dim(self) -> int:
        return 2

    def size(self, d: int | None = None):
        return self.shape if d is None else self.shape[d]

    def is_floating_point(self) -> bool:
        return True

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"FastLinear({tuple(self.shape)}, {self.dtype}, packed={self.packed})"

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != self.dtype:
            raise TypeError(f"linear: input is {x.dtype}, weight is {self.dtype}")
        if (self.kernel is not None and x.numel() <= KERNEL_ROWS * x.shape[-1] and torch.get_num_threads() == 1
                and (bias is None or (bias.dtype == self.dtype and bias.is_contiguous()))):
            return self.kernel.linear(x, self.weight, bias)
        if not x.is_contiguous():
            x = x.contiguous()
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, bias, "none", [], "")
        return F.linear(x, self.weight, bias)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return w.linear(x, bias)
        raise TypeError(f"{func.__name__} is not supported on a FastLinear weight (only F.linear)")


def is_linear_weight(name: str, t) -> bool:
    """A 2-D floating ``*.weight`` of a layer or the head: what the families feed to ``F.linear``."""
    return isinstance(t, torch.Tensor) and t.dim() == 2 and t.is_floating_point() and name.endswith(".weight")


def fast_weights(w: dict, pack: bool) -> dict:
    """``w`` with its linear weights wrapped in :class:`FastLinear` where that is faster on this CPU.

    ``pack``: the weights stay resident (see :class:`FastLinear`; without the compiled kernel bfloat16
    gains 1.5x from oneDNN's layout; float32 is as fast unpacked, and stays unpacked). Non-CPU tensors,
    other dtypes and quantized weights are left alone.
    """
    out = dict(w)
    for name, t in w.items():
        if not is_linear_weight(name, t) or t.device.type != "cpu" or not usable(t.dtype):
            continue
        if kernel_for(t.dtype) is None and t.dtype == torch.bfloat16 and not pack:
            continue  # streamed bfloat16 on oneDNN: a reorder per read costs more than it saves
        out[name] = FastLinear(t, pack=pack and t.dtype == torch.bfloat16)
    return out


def streams_fast(dtype: torch.dtype) -> bool:
    """Whether streamed weights of ``dtype`` gain from :func:`fast_weights` (no copy on the way)."""
    return kernel_for(dtype) is not None or (dtype == torch.float32 and available(dtype))


def owned(w: dict) -> dict:
    """``w`` with every tensor that views a larger buffer copied into memory of its own.

    After fusing and packing, a resident layer's remaining small tensors (norms, biases) and any
    unpacked weight are views of the whole file's read buffer, which they would keep alive next to
    the fused / packed copies: +70% of the layer's bytes. Owning them lets the buffer go.
    """
    out = {}
    for k, v in w.items():
        if isinstance(v, torch.Tensor) and _is_view(v):
            v = v.clone()
        elif isinstance(v, FastLinear) and not v.packed and _is_view(v.weight):
            v = FastLinear(v.weight.clone(), pack=False)
        out[k] = v
    return out


def _is_view(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() > t.numel() * t.element_size()
