"""Weight-only quantized layers: int8 and int4, written by ``layerrun convert --quantize``.

What is quantized: the 2-D ``*.weight`` tensors of the decoder layers (the
projections that models feed to ``F.linear``). Embeddings, the LM head, norms
and biases stay in the storage dtype: they are small, or (embeddings) resident
and read by index, not streamed.

Schemes (``--quantize int8|int4``, optionally ``-gN`` for the group size):

- ``int8``: symmetric, ``w = q * scale``, ``q`` in [-127, 127], one scale per
  output channel by default (``int8-g32`` … ``int8-g256`` for per-group scales).
- ``int4``: asymmetric per group of 32 input channels (``int4-g64`` … ``-g256``),
  ``w = (q - 8) * scale + zero``, ``q`` in [0, 15]; two values per byte.

Scales and zeros are stored in bfloat16 (their values are chosen before ``q``
is rounded, so nothing is lost by storing them so); a group size that does not
divide a tensor's input width falls back to the next smaller power of two
(down to 32), and a tensor that fits none (or, for int4, whose output width is
not a multiple of 16) stays unquantized. The group size of
each tensor is implied by its scale's shape: ``K / scale.shape[1]``.

On disk a quantized tensor ``mlp.up_proj.weight`` (N, K) becomes
``mlp.up_proj.weight.q`` (int8 (N, K); for int4 uint8 (N, K/2), two values a
byte in the layout PyTorch's CPU int4 kernel uses on AVX2, see :func:`_cpu_pack`),
``mlp.up_proj.weight.scale`` (N, G) and, for int4, ``mlp.up_proj.weight.zero``
(N, G). :func:`logical_tensors` maps these names and shapes back to the
logical ones that ``expected_tensors()`` lists.

Kernels. Dequantization happens after the read, on the compute device, one
linear at a time: :func:`dequantize_weights` wraps each quantized tensor in a
:class:`QuantizedWeight`, a tensor-like object whose ``F.linear`` runs a fused
kernel, so no full-precision copy of a layer, let alone the model, is made in
decode. We use PyTorch's own weight-only kernels rather than adding a
dependency or writing our own: ``torch._weight_int8pack_mm`` (int8 weights,
per-channel scales) and ``torch._weight_int4pack_mm_for_cpu`` (tinygemm-style
group-wise int4 with scale and zero; AVX2/AVX-512 vectorised). torchao's CPU
int8/int4 weight-only paths call the same two ops, so torchao would add a
dependency and a model-rewriting API but no speed. The int8 kernel takes only
per-channel scales, which is why int8 defaults to per-channel: per-group int8
(``int8-g128``) is supported but computes by dequantizing each weight before a
dense matmul. The int4 kernel wants its own blocked layout, which depends on the
CPU's vector width (rows in blocks of 32 with AVX2, 64 with AVX-512). A file is
written in the converting CPU's layout and says which in its manifest
(``int4_layout``; files without it hold the AVX2 one), so on a machine like the
converting one a layer is used as read, with no copy; on others the bytes are
repacked after the read, AVX2 -> AVX-512 by moving nibbles between the halves of
each 64-row block (:func:`_avx2_to_avx512`), otherwise by :func:`_cpu_pack` (4x
faster than ``torch._convert_weight_to_int4pack_for_cpu``). Which layout this
PyTorch build uses is checked once per process against that op
(:func:`cpu_int4_layout`).

When the kernels are used: on CPU, for up to :data:`FUSED_MAX_ROWS` rows of
activations (decode, small batches), in bfloat16 (fp32 activations are rounded
to bf16 for the kernel: both kernels are scalar code for fp32, 15-25x slower;
the weight's own quantization error is larger than that rounding). Longer
inputs (prefill) and other devices (CUDA) dequantize the one weight into the
activation dtype and call the dense ``F.linear``, which is fastest there.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from layerrun.errors import LayerRunError

METHODS = ("int8", "int4")
DEFAULT_GROUP = {"int8": None, "int4": 32}  # None: one scale per output channel
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernel supports; the fallback chain for both
SCALE_DTYPE = torch.bfloat16
# Activation rows (batch x tokens) up to which the fused CPU kernels run; longer inputs (prefill) dequantize
# each weight and use the dense GEMM, which wins where the dense kernels are fast (fp32, or bf16 on AVX-512/AMX).
FUSED_MAX_ROWS = 16
FORMAT = "layerrun-quant-v1"
SUFFIXES = (".q", ".scale", ".zero")
STORED_LAYOUT = (32, True)  # int4 bytes on disk by default (files without int4_layout): the kernel's AVX2 layout
# int4 layouts a file may hold (QuantScheme.layout), by their manifest names
LAYOUT_NAMES = {(32, True): "tinygemm-cpu-n32", (64, True): "tinygemm-cpu-n64"}


@dataclass(frozen=True)
class QuantScheme:
    method: str  # "int8" | "int4"
    group_size: int | None  # None: per output channel
    # int4: the kernel layout of the stored bytes, chosen at conversion time (the converting machine's,
    # see native_int4_layout); a reader whose CPU wants another repacks each weight after the read.
    layout: tuple[int, bool] = field(default=STORED_LAYOUT, compare=False)

    @property
    def bits(self) -> int:
        return 8 if self.method == "int8" else 4

    @property
    def name(self) -> str:
        return self.method if self.group_size == DEFAULT_GROUP[self.method] else f"{self.method}-g{self.group_size or 'channel'}"

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.method == "int8",
            "scale_dtype": str(SCALE_DTYPE).replace("torch.", ""),
            **({"int4_layout": LAYOUT_NAMES[self.layout]} if self.method == "int4" else {}),
            "applies_to": "2-D *.weight tensors of decoder layers; embeddings, head, norms and biases keep the storage dtype",
        }

    @classmethod
    def from_json(cls, d: Mapping) -> QuantScheme:
        method = d.get("method")
        if method not in METHODS:
            raise LayerRunError(f"quantization method {method!r} is not supported; supported: {', '.join(METHODS)}")
        g = d.get("group_size")
        layout = STORED_LAYOUT
        if method == "int4":
            name = d.get("int4_layout", LAYOUT_NAMES[STORED_LAYOUT])
            found = [k for k, v in LAYOUT_NAMES.items() if v == name]
            if not found:
                raise LayerRunError(f"int4_layout {name!r} is not supported; supported: {', '.join(LAYOUT_NAMES.values())} "
                                    "(re-run `layerrun convert --quantize int4` with this version)")
            layout = found[0]
        return cls(method, int(g) if g else None, layout)


def parse_scheme(text: str) -> QuantScheme:
    """``int8``, ``int4``, ``int4-g32``, ``int8-g128``, ``int8-gchannel`` -> a scheme (``--quantize``)."""
    m = re.fullmatch(r"\s*(int8|int4)(?:[-_:]g(\d+|channel))?\s*", str(text).lower())
    if not m:
        raise LayerRunError(f"--quantize {text!r} is not one of: int8, int4 (optionally with a group size, e.g. int4-g32)")
    method, g = m.group(1), m.group(2)
    if method == "int4":
        return _int4_scheme(text, g)
    if g is None:
        return QuantScheme(method, DEFAULT_GROUP[method])
    if g == "channel":
        if method == "int4":
            raise LayerRunError("--quantize int4 needs a group size (int4-g32 … int4-g256); per-channel int4 is too lossy")
        return QuantScheme(method, None)
    if int(g) not in GROUP_SIZES:
        raise LayerRunError(f"--quantize {text}: group size must be one of {', '.join(map(str, GROUP_SIZES))}")
    return QuantScheme(method, int(g))


def _int4_scheme(text: str, g: str | None) -> QuantScheme:
    if g == "channel":
        raise LayerRunError("--quantize int4 needs a group size (int4-g32 … int4-g256); per-channel int4 is too lossy")
    if g is not None and int(g) not in GROUP_SIZES:
        raise LayerRunError(f"--quantize {text}: group size must be one of {', '.join(map(str, GROUP_SIZES))}")
    return QuantScheme("int4", int(g) if g else DEFAULT_GROUP["int4"], native_int4_layout())


def native_int4_layout() -> tuple[int, bool]:
    """The int4 layout new files are written in: this CPU's kernel layout where it is one a file may
    hold (so streaming reads need no repack here: it cost 1.5-4 ms of CPU per SmolLM2 layer on
    AVX-512), else the AVX2 one."""
    layout = cpu_int4_layout()
    return layout if layout in LAYOUT_NAMES else STORED_LAYOUT


def _as_scheme(scheme) -> QuantScheme:
    if isinstance(scheme, QuantScheme):
        return scheme
    if isinstance(scheme, str):
        return parse_scheme(scheme)
    return QuantScheme.from_json(scheme)


# ---- quantizing (convert time) ------------------------------------------------
def group_size_for(k: int, scheme: QuantScheme) -> int | None:
    """The group size a tensor with ``k`` input channels gets: 0 for per-channel, None if it cannot be quantized."""
    if scheme.group_size is None:
        return 0
    for g in sorted((g for g in GROUP_SIZES if g <= scheme.group_size), reverse=True):
        if k % g == 0:
            return g
    return None


def quantizable(name: str, t: torch.Tensor) -> bool:
    return name.endswith(".weight") and t.dim() == 2 and t.is_floating_point() and t.shape[1] % 2 == 0


def quantize_tensor(w: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor] | None:
    """``{".q": ..., ".scale": ..., [".zero": ...]}`` for a (N, K) weight, or None if it must stay as is."""
    N, K = w.shape
    g = group_size_for(K, scheme)
    if g is None or scheme.method == "int4" and N % 16:  # the int4 layout packs rows in blocks of 16
        return None
    g = g or K
    x = w.detach().float().reshape(N, K // g, g)  # (N, G, g)
    if scheme.method == "int8":
        scale = (x.abs().amax(-1) / 127).to(SCALE_DTYPE)  # (N, G)
        s = scale.float().masked_fill(scale == 0, 1.0)[..., None]
        q = torch.round(x / s).clamp_(-127, 127).to(torch.int8).reshape(N, K)
        return {".q": q, ".scale": scale}
    step, lo = _fit_int4(x)
    scale = step.to(SCALE_DTYPE)
    s = scale.float()
    zero = (lo + 8 * s).to(SCALE_DTYPE)  # tinygemm's zero: the value of q == 8 (all values where the step is 0)
    base = zero.float() - 8 * s  # the value of q == 0, as the kernel will compute it
    q = torch.round((x - base[..., None]) / s.masked_fill(s == 0, 1.0)[..., None]).clamp_(0, 15)
    return {".q": _cpu_pack(q.to(torch.uint8).reshape(N, K), *scheme.layout), ".scale": scale, ".zero": zero}


INT4_CLIPS = (1.0, 0.9)  # shares of each group's [min, max] range tried as the starting grid
INT4_REFITS = 2  # least-squares refits of (step, offset) per starting grid


def _fit_int4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of ``x`` (N, G, g): the grid ``offset + step * q``, q in [0, 15], with the least squared error found.

    Starts from the group's [min, max] range (and ranges shrunk around its centre,
    which clip outliers), then alternates rounding with a least-squares fit of
    step and offset to the rounded values (as llama.cpp's k-quants do); keeps
    the best grid seen per group: 10-15 % less error than plain min/max on real weights.
    """
    g = x.shape[-1]
    lo, hi = x.amin(-1), x.amax(-1)
    best_err = best_step = best_lo = None
    for clip in INT4_CLIPS:
        step = ((hi - lo) * clip / 15).clamp_(min=1e-30)
        off = lo + (hi - lo) * (1 - clip) / 2
        for it in range(INT4_REFITS + 1):
            q = torch.round((x - off[..., None]) / step[..., None]).clamp_(0, 15)
            err = (q * step[..., None] + off[..., None] - x).square_().sum(-1)
            if best_err is None:
                best_err, best_step, best_lo = err, step, off
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_step, best_lo = torch.where(better, step, best_step), torch.where(better, off, best_lo)
            if it == INT4_REFITS:
                break
            sq, sw, sqq, sqw = q.sum(-1), x.sum(-1), q.square().sum(-1), (q * x).sum(-1)
            den = g * sqq - sq * sq
            fit = (g * sqw - sq * sw) / den.clamp(min=1e-30)
            ok = (den > 0) & (fit > 0)
            step = torch.where(ok, fit, step)
            off = torch.where(ok, (sw - fit * sq) / g, off)
    flat = hi == lo  # constant groups: step 0, the value itself at q == 0
    return best_step.masked_fill(flat, 0.0), torch.where(flat, lo, best_lo)


def quantize_file(tensors: dict[str, torch.Tensor], scheme) -> dict[str, torch.Tensor]:
    """One layer file's tensors with every quantizable weight replaced by its ``.q``/``.scale``/``.zero``."""
    scheme = _as_scheme(scheme)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        parts = quantize_tensor(t, scheme) if quantizable(name, t) else None
        if parts is None:
            out[name] = t
        else:
            out.update({name + sfx: p for sfx, p in parts.items()})
    return out


def logical_tensors(tensors: Mapping, scheme=None) -> dict[str, tuple[int, ...]]:
    """Stored names -> the logical names and shapes the model expects.

    ``tensors`` maps stored names to anything with a ``.shape`` (TensorInfo, Tensor)
    or to a shape. ``x.weight.q`` (N, K) int8 or (N, K/2) packed int4 becomes
    ``x.weight`` (N, K); ``.scale`` and ``.zero`` disappear. Unquantized names pass through.
    """
    shapes = {n: tuple(getattr(v, "shape", v)) for n, v in tensors.items()}
    out: dict[str, tuple[int, ...]] = {}
    for n, shp in shapes.items():
        base, sfx = _split(n)
        if sfx is None or base + ".q" not in shapes:
            out[n] = shp
        elif sfx == ".q":
            method = _method_of(tensors[n], scheme)
            out[base] = (shp[0], shp[1] * 2) if method == "int4" else shp
    return out


def check_quantized(tensors: Mapping, scheme) -> list[str]:
    """Problems with one file's quantized tensors (for ``layerrun validate``): dtypes, shapes, missing parts.

    ``tensors`` maps stored names to TensorInfo (safetensors dtype names) or tensors.
    """
    sc = _as_scheme(scheme)
    problems = []
    want_q = ("I8", "torch.int8") if sc.method == "int8" else ("U8", "torch.uint8")
    for n, t in tensors.items():
        base, sfx = _split(n)
        if sfx is None:
            continue
        if base + ".q" not in tensors:
            problems.append(f"{n}: no {base}.q beside it")
            continue
        if sfx != ".q":
            continue
        q = t
        if str(q.dtype) not in want_q:
            problems.append(f"{n}: dtype {q.dtype}, {sc.method} stores {want_q[0]}")
        if len(q.shape) != 2:
            problems.append(f"{n}: shape {list(q.shape)} is not 2-D")
            continue
        N, K = q.shape[0], q.shape[1] * (2 if sc.method == "int4" else 1)
        parts = [".scale"] + ([".zero"] if sc.method == "int4" else [])
        for p in parts:
            s = tensors.get(base + p)
            if s is None:
                problems.append(f"{base}: {p[1:]} is missing")
            elif len(s.shape) != 2 or s.shape[0] != N or not s.shape[1] or K % s.shape[1]:
                problems.append(f"{base}{p}: shape {list(s.shape)} does not fit a ({N}, {K}) weight")
            elif sc.method == "int4" and K // s.shape[1] not in GROUP_SIZES:
                problems.append(f"{base}{p}: group size {K // s.shape[1]} is not one of {GROUP_SIZES}")
    return problems


def _split(name: str) -> tuple[str, str | None]:
    for sfx in SUFFIXES:
        if name.endswith(sfx):
            return name[: -len(sfx)], sfx
    return name, None


def _method_of(t, scheme) -> str:
    if scheme:
        return _as_scheme(scheme).method
    dt = str(getattr(t, "dtype", ""))
    return "int4" if dt in ("U8", "torch.uint8") else "int8"


# ---- the int4 CPU kernel's packed layout --------------------------------------
def _cpu_pack(v: torch.Tensor, block_n: int, lanes: bool) -> torch.Tensor:
    """Values (N, K) in [0, 15] -> uint8 (N, K/2) in the layout of ``_convert_weight_to_int4pack_for_cpu``.

    Rows go in blocks of ``block_n`` (64 with AVX-512, 32 with AVX2). Inside a
    full block, with ``lanes``, byte (k, h, d) holds row ``16h + d`` in its low
    nibble and row ``block_n/2 + 16h + d`` in its high nibble; otherwise
    (partial blocks, scalar builds) byte (k, j) holds rows 2j and 2j+1.
    """
    N, K = v.shape
    K2 = K // 2
    out = torch.empty(N * K2, dtype=torch.uint8, device=v.device)
    full = N // block_n * block_n
    if full:
        nb = full // block_n
        if lanes:
            b = v[:full].view(nb, block_n // 16, 16, K)  # (NB, lanes, 16, K)
            half = block_n // 32
            p = b[:, :half] | (b[:, half:] << 4)  # (NB, lanes/2, 16, K)
            out[: full * K2].view(nb, K, half, 16).copy_(p.permute(0, 3, 1, 2))
        else:
            b = v[:full].view(nb, block_n // 2, 2, K)  # (NB, n/2, 2, K)
            p = b[:, :, 0] | (b[:, :, 1] << 4)  # (NB, n/2, K)
            out[: full * K2].view(nb, K, block_n // 2).copy_(p.transpose(1, 2))
    rest = N - full
    if rest:
        b = v[full:].view(rest // 2, 2, K)
        p = b[:, 0] | (b[:, 1] << 4)  # (rest/2, K)
        out[full * K2 :].view(K, rest // 2).copy_(p.t())
    return out.view(N, K2)


def _avx2_to_avx512(q: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """int4 bytes (N, K/2) in the AVX2 layout -> the AVX-512 one (see :func:`_cpu_pack`), N % 64 == 0.

    A 64-row AVX-512 block is two 32-row AVX2 blocks A (rows 0-31) and B (rows 32-63). Per (k, d):
    A's byte holds rows d | 16+d (low | high nibble), B's rows 32+d | 48+d; the AVX-512 bytes hold
    rows d | 32+d (h=0) and 16+d | 48+d (h=1)."""
    blocks = q.reshape(N // 64, 2, K * 16)
    a, b = blocks[:, 0], blocks[:, 1]  # (NB, K*16) each, contiguous rows
    lo = (a & 0x0F).bitwise_or_((b & 0x0F).bitwise_left_shift_(4))
    hi = (a >> 4).bitwise_or_(b & 0xF0)
    return torch.stack((lo.view(-1, K, 16), hi.view(-1, K, 16)), dim=2).view(N, K // 2)


def _cpu_unpack(p: torch.Tensor, block_n: int, lanes: bool) -> torch.Tensor:
    """The inverse of :func:`_cpu_pack`, to unpacked values: (N, K/2) -> uint8 (N, K) in [0, 15]."""
    N, K2 = p.shape
    K = 2 * K2
    flat = p.reshape(-1)
    parts = []
    full = N // block_n * block_n
    if full:
        nb = full // block_n
        if lanes:
            t = flat[: full * K2].view(nb, K, block_n // 32, 16)
            b = torch.cat((t & 0x0F, t >> 4), 2)  # (NB, K, lanes, 16)
            parts.append(b.permute(0, 2, 3, 1).reshape(full, K))
        else:
            t = flat[: full * K2].view(nb, K, block_n // 2)
            b = torch.stack((t & 0x0F, t >> 4), -1)  # (NB, K, n/2, 2)
            parts.append(b.permute(0, 2, 3, 1).reshape(full, K))
    rest = N - full
    if rest:
        t = flat[full * K2 :].view(K, rest // 2)
        parts.append(torch.stack((t & 0x0F, t >> 4), -1).permute(1, 2, 0).reshape(rest, K))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


_layout_lock = threading.Lock()
_layout: tuple | None = None


def cpu_int4_layout() -> tuple[int, bool] | str | None:
    """How this PyTorch build packs int4 for its CPU kernel: (block_n, lanes), "op" (only the op knows), or None (no kernel)."""
    global _layout
    with _layout_lock:
        if _layout is None:
            _layout = (_probe_layout(),)
        return _layout[0]


def _probe_layout():
    aten = torch.ops.aten
    if not (hasattr(aten, "_convert_weight_to_int4pack_for_cpu") and hasattr(aten, "_weight_int4pack_mm_for_cpu")):
        return None
    g = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (112, 64), generator=g, dtype=torch.int32)  # full and partial blocks of 64/32/16
    try:
        ref = aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    except RuntimeError:
        return None
    q = probe.to(torch.uint8)
    for cand in (STORED_LAYOUT, (64, True), (64, False), (32, False), (16, False)):
        if torch.equal(_cpu_pack(q, *cand), ref):
            return cand
    return "op"


# ---- compute ------------------------------------------------------------------
KERNEL_ALIGN = 64


@functools.cache
def _needs_aligned_operands() -> bool:
    """torch's AVX-512 ``_weight_int8pack_mm`` uses aligned vector loads: an operand that is not
    16-byte aligned (an int8 weight at an odd offset of a layer file, a view of an activation)
    kills the process with SIGSEGV (torch 2.13, seen on an AVX-512 EPYC). The AVX2 kernel does not
    care, so only AVX-512 builds pay for the copy."""
    return "AVX512" in str(torch.backends.cpu.get_cpu_capability()).upper()


def _kernel_aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or an aligned copy of it where the CPU kernel would fault on its address."""
    if t.data_ptr() % KERNEL_ALIGN and _needs_aligned_operands():
        return t.clone(memory_format=torch.contiguous_format)  # the CPU allocator aligns to 64 bytes
    return t


class QuantizedWeight:
    """A linear weight kept quantized; ``F.linear(x, w, b)`` on it runs a quantized kernel.

    Not a ``torch.Tensor`` subclass: a tensor-like object (``__torch_function__``)
    that models use through ``F.linear`` only. Any other torch function applied to
    it gets the dequantized tensor (correct, not fast). ``is_floating_point()`` is
    False so generic float casts leave it alone.
    """

    def __init__(self, method: str, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 dtype: torch.dtype, layout: tuple[int, bool] = STORED_LAYOUT):
        self.method = method
        self._stored = layout  # int4: the layout of ``q`` as read
        N = q.shape[0]
        K = q.shape[1] * (2 if method == "int4" else 1)
        self.shape = torch.Size((N, K))
        self.dtype = dtype  # the compute (activation) dtype
        self.group_size = K // scale.shape[1]
        self.q: torch.Tensor | None = q  # as stored; None once only the kernel's packed form is kept
        self.scale, self.zero = scale, zero
        self.packed: torch.Tensor | None = None  # int4: the CPU kernel's layout
        self.kernel: str | None = None  # "int8" | "int4" when a fused CPU kernel applies
        self._layout = None
        if q.device.type == "cpu":
            self._prepare_cpu()

    def _prepare_cpu(self) -> None:
        kd = self.dtype if self.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        N, K = self.shape
        if self.method == "int8" and self.group_size == K and hasattr(torch, "_weight_int8pack_mm"):
            self.kernel, self._kdtype = "int8", kd
            self.q = _kernel_aligned(self.q)
            self._kscale = self.scale.reshape(N).to(kd)
        elif self.method == "int4" and N % 16 == 0 and self.group_size in GROUP_SIZES:
            layout = cpu_int4_layout()
            if layout is None:
                return
            if layout == self._stored:
                self.packed = self.q  # as read: no copy at all
            elif layout == "op":
                self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.unpacked().int(), 1)
            elif layout == (64, True) and self._stored == (32, True) and N % 64 == 0:
                # AVX-512 from the stored AVX2 layout: nibbles moved between byte pairs, 4 byte ops (~10x
                # faster than unpacking and packing again; it runs for every streamed layer).
                self.packed, self.q = _avx2_to_avx512(self.q, N, K), None
                self.scale, self.zero = self.scale.clone(), self.zero.clone()
            else:
                # Repacked for this CPU's vector width; the stored bytes (a view of the read buffer) can go.
                self.packed, self.q = _cpu_pack(self.unpacked(), *layout), None
                self.scale, self.zero = self.scale.clone(), self.zero.clone()
            self.kernel, self._kdtype, self._layout = "int4", kd, layout
            self._kscale = torch.stack((self.scale.t(), self.zero.t()), -1).to(kd).contiguous()  # (G, N, 2)

    # ---- tensor-like surface ----
    @property
    def device(self) -> torch.device:
        return self.scale.device

    @property
    def ndim(self) -> int:
        return 2

    def dim(self) -> int:
        return 2

    def size(self, d: int | None = None):
        return self.shape if d is None else self.shape[d]

    def is_floating_point(self) -> bool:
        return False

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.q, self.packed, self.scale, self.zero) if t is not None)

    def __repr__(self) -> str:
        return (f"QuantizedWeight({self.method}, shape={tuple(self.shape)}, group_size={self.group_size}, "
                f"kernel={self.kernel}, device={self.device})")

    # ---- compute ----
    def unpacked(self) -> torch.Tensor:
        """The integer values: int8 (N, K), or uint8 (N, K) in [0, 15] for int4."""
        if self.method == "int8":
            return self.q
        if self.q is not None:
            return _cpu_unpack(self.q, *self._stored)
        return _cpu_unpack(self.packed, *self._layout)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (N, K) weight in ``dtype`` (default: the compute dtype)."""
        dtype = dtype or self.dtype
        N, K = self.shape
        G = K // self.group_size
        q = self.unpacked().view(N, G, self.group_size).to(dtype)
        if self.method == "int8":
            return q.mul_(self.scale.to(dtype)[..., None]).view(N, K)
        return q.sub_(8).mul_(self.scale.to(dtype)[..., None]).add_(self.zero.to(dtype)[..., None]).view(N, K)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        N, K = self.shape
        rows = x.numel() // K if K else 0
        if self.kernel is None or rows > FUSED_MAX_ROWS:
            return F.linear(x, self.dequantize(x.dtype), bias)
        x2 = x.reshape(rows, K).to(self._kdtype).contiguous()
        if self.kernel == "int8":
            x2 = _kernel_aligned(x2)
            y = torch._weight_int8pack_mm(x2, self.q, self._kscale)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self._kscale)
        y = y.to(x.dtype).view(*x.shape[:-1], N)
        return y if bias is None else y + bias

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(w, QuantizedWeight) and not isinstance(x, QuantizedWeight):
                return w.linear(x, b)
        from torch.utils._pytree import tree_map

        def deq(a):
            return a.dequantize() if isinstance(a, QuantizedWeight) else a

        return func(*tree_map(deq, args), **tree_map(deq, kwargs))


def dequantize_weights(weights: dict[str, torch.Tensor], scheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One file's stored tensors -> what the model computes with, under the logical (HF) names.

    Quantized weights become :class:`QuantizedWeight` objects (the fused kernels run
    at ``F.linear`` time); everything else passes through unchanged. The tensors
    are used in place (views of the read buffer): int8 and, on AVX2, int4 need no
    copy; only a CPU with another int4 layout repacks here, which is why this is
    best called where it overlaps compute (the engine calls it in the I/O thread
    for streamed layers). No GPU work is issued here: on CUDA, weights are
    dequantized inside ``F.linear``, on the compute stream.
    """
    sch = _as_scheme(scheme)
    method = sch.method
    out: dict[str, torch.Tensor] = {}
    owns_all = True
    for name, t in weights.items():
        base, sfx = _split(name)
        if sfx is None or base + ".q" not in weights:
            out[name] = t
            continue
        if sfx != ".q":
            continue
        zero = weights.get(base + ".zero")
        if method == "int4" and zero is None:
            raise LayerRunError(f"quantized tensor {base} has no .zero; the file does not match its int4 scheme")
        qw = QuantizedWeight(method, t, weights[base + ".scale"], zero, dtype, sch.layout)
        owns_all = owns_all and qw.q is None
        out[base] = qw
    if owns_all and len(out) != len(weights):
        # Nothing left points into the read buffer but small tensors: copy them so a resident
        # layer does not keep its whole file buffer alive next to the repacked weights.
        out = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
    return out


def prepared_extra_bytes(entry, scheme, device: str = "cpu") -> int:
    """Bytes that preparing one file adds beyond its read buffer (the governor's concern).

    int4 on a CPU whose kernel layout differs from the stored one (AVX-512) repacks
    every weight (about the size of the file's ``.q`` tensors); everything else
    computes from the read buffer in place.
    """
    if not scheme or device != "cpu" or _as_scheme(scheme).method != "int4" or cpu_int4_layout() == _as_scheme(scheme).layout:
        return 0
    return sum(t.nbytes for n, t in entry.tensors.items() if n.endswith(".q"))


def dequant_workspace_bytes(entry, scheme, elem_bytes: int) -> int:
    """Peak bytes of dequantizing one weight (prefill, non-CPU devices): the largest weight of ``entry``
    in the compute dtype, plus its unpacked int4 values."""
    if not scheme:
        return 0
    extra = 1 if _as_scheme(scheme).method == "int4" else 0
    shapes = logical_tensors(entry.tensors, scheme)
    qs = [shapes[n[: -len(".q")]] for n in entry.tensors if n.endswith(".q")]
    return max((s[0] * s[1] * (elem_bytes + extra) for s in qs), default=0)
