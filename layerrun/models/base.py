"""Pieces shared by the model families: config dataclasses, RoPE, RMSNorm, attention context.

Model code is pure compute: the engine hands a layer its weights (a dict of
tensors named as in the Hugging Face checkpoint, relative to the layer) and its
KV cache. Nothing here reads files or knows about streaming.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_EXPERT = re.compile(r"(?:^|\.)experts\.(\d+)\.")


def expert_index(name: str) -> int | None:
    """The expert a mixture-of-experts tensor belongs to (``...experts.3.w1.weight`` -> 3), else None."""
    m = _EXPERT.search(name)
    return int(m.group(1)) if m else None


@dataclass
class BaseArgs:
    """Common Hugging Face config fields; families subclass and add their own."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None  # transformers 5 spelling
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_dict(cls, d: dict):
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in d and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"it lacks {', '.join(missing)}")
        names = {f.name for f in fields}
        return cls(**{k: v for k, v in d.items() if k in names})

    def __post_init__(self):
        check_sizes(self)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
            if self.head_dim < 1:
                raise ValueError(f"hidden_size={self.hidden_size} is smaller than num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        # transformers 5 moves rope_theta / rope_scaling into rope_parameters.
        rp = self.rope_parameters
        if isinstance(rp, dict) and "rope_type" in rp or isinstance(rp, dict) and "rope_theta" in rp:
            self.rope_theta = float(rp.get("rope_theta", self.rope_theta))
            if rp.get("rope_type", "default") != "default" and self.rope_scaling is None:
                self.rope_scaling = rp


# Sizes a config may state (when present), with a ceiling far above any real model: a config is
# untrusted, and one claiming 10^9 layers or a 10^9 hidden size must be refused before anything is
# sized by it (the engine then checks every size against the tensors actually stored).
SIZE_LIMITS = {
    "hidden_size": 2**20,
    "num_hidden_layers": 10_000,
    "intermediate_size": 2**22,
    "moe_intermediate_size": 2**22,
    "num_attention_heads": 2**16,
    "num_key_value_heads": 2**16,
    "head_dim": 2**16,
    "vocab_size": 2**24,
    "max_position_embeddings": 2**32,
    "original_max_position_embeddings": 2**32,
    "sliding_window_pattern": 10_000,
    "num_local_experts": 2**16,
    "num_experts": 2**16,
    "num_experts_per_tok": 2**16,
}


def check_sizes(args) -> None:
    """Every size field present is an integer within 1..its limit; the float fields are positive numbers."""
    for f in dataclasses.fields(args):
        if getattr(args, f.name) is None and str(f.type) in ("int", "float", "bool", "str", "dict"):
            raise ValueError(f"{f.name} is null; it must be set")
    for name, hi in SIZE_LIMITS.items():
        v = getattr(args, name, None)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name}={v!r} is not an integer")
        if not 1 <= v <= hi:
            raise ValueError(f"{name}={v} is out of range (1..{hi})")
    for f in dataclasses.fields(args):  # the other plain numbers and flags, by their declared type
        v, kind = getattr(args, f.name), str(f.type).replace(" | None", "")
        if v is None or f.name in SIZE_LIMITS or kind not in ("int", "float", "bool"):
            continue
        if kind == "bool" and not isinstance(v, bool):
            raise ValueError(f"{f.name}={v!r} is not true or false")
        if kind == "int" and (isinstance(v, bool) or not isinstance(v, int) or abs(v) > 2**40):
            raise ValueError(f"{f.name}={v!r} is not an integer in range")
        if kind == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not abs(v) < 1e30:
                raise ValueError(f"{f.name}={v!r} is not a finite number")
            setattr(args, f.name, float(v))
    if not 0 < args.rms_norm_eps <= 1:
        raise ValueError(f"rms_norm_eps={args.rms_norm_eps!r} is not in (0, 1]")
    if not 0 < args.rope_theta:
        raise ValueError(f"rope_theta={args.rope_theta!r} is not a positive number")
    for name in ("rope_scaling", "rope_parameters"):
        v = getattr(args, name, None)
        if v is not None and not isinstance(v, dict):
            raise ValueError(f"{name} must be an object, found {type(v).__name__}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(args, name, None)
        ids = v if isinstance(v, list) else [v]
        if v is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"{name}={v!r} is not a token id (or a list of them)")


def rope_inv_freq(dim: int, base: float, scaling: dict | None, max_pos: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (fp32) and the attention scaling factor, as transformers computes them."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if not scaling:
        return inv, 1.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / float(scaling["factor"]), 1.0
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen = old_ctx / low
        high_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, inv_l), 1.0
    raise NotImplementedError(f"rope_scaling type {kind!r} is not supported yet (supported: default, linear, llama3)")


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """cos/sin of shape (B, 1, T, head_dim), computed in fp32 and cast like transformers does."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim)
    return (emb.cos() * scale).to(dtype)[:, None], (emb.sin() * scale).to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def signed_sin(rope: dict) -> torch.Tensor:
    """``sin`` with its first half negated, made once per step and kept in the step's ``rope`` dict:
    with it RoPE's rotation is one ``roll`` (see :func:`apply_rope_signed`)."""
    s = rope.get("sin_signed")
    if s is None:
        sin = rope["sin"]
        half = sin.shape[-1] // 2
        s = rope["sin_signed"] = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return s


def token_major_rope(rope: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and :func:`signed_sin` as (B, T, 1, D) views, for heads laid out (B, T, heads, D) as a
    projection makes them; made once per step and kept in the step's ``rope`` dict."""
    t = rope.get("token_major")
    if t is None:
        t = rope["token_major"] = (rope["cos"].transpose(1, 2), signed_sin(rope).transpose(1, 2))
    return t


def rope_heads(x: torch.Tensor, rope: dict) -> torch.Tensor:
    """RoPE on heads laid out (B, T, n, D) (any n: queries and keys together), as a new tensor; the same
    sums as :func:`apply_rope` on each head, bit for bit."""
    cos, sin = token_major_rope(rope)
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def apply_rope_signed(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` in 4 ops instead of 7, bit for bit: ``cat(-x2, x1) * sin`` is
    ``roll(x) * cat(-sin1, sin2)`` (negation is exact)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def fuse_linears(w: dict, parts: tuple[str, ...], fused: tuple[str, str]) -> dict:
    """``w`` with the weights ``{p}.weight`` for ``p`` in ``parts`` concatenated (rows) into ``fused[0]``,
    and their biases, if all have one, into ``fused[1]``. Unchanged unless every part is a plain tensor
    of one dtype with the same input width."""
    ws = [w.get(f"{p}.weight") for p in parts]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in ws):
        return w
    if len({(t.dtype, t.shape[1], t.device) for t in ws}) != 1:
        return w
    bs = [w.get(f"{p}.bias") for p in parts]
    if any(b is not None for b in bs) and not all(isinstance(b, torch.Tensor) for b in bs):
        return w
    drop = {f"{p}.{k}" for p in parts for k in ("weight", "bias")}
    out = {k: v for k, v in w.items() if k not in drop}
    out[fused[0]] = torch.cat(ws)
    if bs[0] is not None:
        out[fused[1]] = torch.cat(bs)
    return out


# Linear weights the families fuse, each group in the order of its fused product (see
# :func:`fuse_linears`); layer files store each group's tensors back to back in this order.
FUSED_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("mlp.gate_proj", "mlp.up_proj"),
)


def storage_order(name: str) -> str:
    """A sort key for a layer file's tensor ``name`` that keeps every group of :data:`FUSED_GROUPS`
    together, its biases then its weights, each in product order (every other name sorts as itself),
    so a streamed layer's fused products are views of the file."""
    for group in FUSED_GROUPS:
        for i, part in enumerate(group):
            for kind in ("bias", "weight"):
                suffix = f"{part}.{kind}"
                if name == suffix or name.endswith("." + suffix):
                    return f"{name[: len(name) - len(suffix)]}{group[0]}\0{kind}\0{i}"
    return name


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama-style RMSNorm: normalise in fp32, cast back, then scale (``weight`` (D,), or one row per head).

    ``F.rms_norm`` runs ``x.float() * rsqrt(mean(x.float()^2) + eps)`` and the cast back in C++ with the
    same ops, bit for bit (fp32, bf16, fp16: tests/test_dispatch.py), 40% faster at decode than the
    same ops called from Python; in fp32 the weight goes in too (in the other dtypes it would be applied
    before the cast)."""
    if x.dtype == weight.dtype == torch.float32 and weight.dim() == 1:
        return F.rms_norm(x, weight.shape, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), eps=eps) * weight


Q_NORM, K_NORM = "self_attn.q_norm.weight", "self_attn.k_norm.weight"  # Qwen 3, Gemma 3: per-head norms
QK_NORM_ROWS = "self_attn.qk_norm_rows"  # (H + Hkv, D): q's norm weight per query head, then k's per key head


def qk_norm_rows(args, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The per-head q and k norm weights (D,) as one row per head of the (B, T, H + Hkv, D) layout in which a
    layer normalises queries and keys together (a resident layer makes it once: the family's ``fuse``)."""
    return torch.cat((q.expand(args.num_attention_heads, -1), k.expand(args.num_key_value_heads, -1)))


@dataclass
class AttnContext:
    """Per-step attention inputs shared by every layer.

    ``mask`` is a boolean (B, 1, T, S) "may attend" mask, or None when plain
    causal attention over the whole cache is right (no padding, window or token tree).
    """

    positions: torch.Tensor  # (B, T) absolute positions of the new tokens
    mask: torch.Tensor | None
    is_causal: bool
    rope: dict  # family-specific precomputed tables, e.g. {"global": (cos, sin)}


def build_mask(
    key_valid: torch.Tensor | None,
    q_len: int,
    k_len: int,
    window: int | None = None,
    device=None,
    q_positions: torch.Tensor | None = None,
    tree: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean (B or 1, 1, T, S) mask: causal, optional sliding window, padding keys masked.

    ``key_valid`` is either a bool (B, S) mask or, from the batch generator, an
    integer (B, S) tensor of each key's token position with -1 for padding. A
    batch can hold padding gaps mid-sequence (a sequence that joined later), so
    the sliding window is then measured in token positions, not columns.

    ``tree`` (bool (B, T, R), R >= T): the new tokens are a token tree rather than a chain; entry
    [b, t, j] says whether new token t may see the j-th of the last R key columns (the T new ones
    and any recent ones before them: its ancestors and itself). Keys before those R columns follow
    the causal and padding rules as usual. A tree needs ``key_valid`` as key positions and
    ``q_positions`` (a node's position is its root's plus its depth): windows are measured in
    positions, never columns.
    """
    q_col = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (T, 1)
    k_col = torch.arange(k_len, device=device)[None, :]  # (1, S)
    m = (k_col <= q_col)[None, None]  # (1, 1, T, S)
    if tree is not None:
        if key_valid is None or key_valid.dtype == torch.bool or q_positions is None:
            raise ValueError("a token tree needs each key's position (integer key_valid) and q_positions")
        B, T, R = tree.shape
        older = torch.ones((B, T, k_len - R), dtype=torch.bool, device=device)
        m = m & torch.cat([older, tree.to(device)], dim=-1)[:, None]  # (B, 1, T, S)
    if key_valid is not None and not key_valid.dtype == torch.bool and q_positions is not None:
        kp = key_valid[:, None, None, :]  # (B, 1, 1, S)
        m = m & (kp >= 0)
        if window is not None:
            m = m & (q_positions[:, None, :, None] - kp < window)
        return m
    if window is not None:
        m = m & (q_col - k_col < window)[None, None]
    if key_valid is not None:
        kv = key_valid if key_valid.dtype == torch.bool else key_valid >= 0
        m = m & kv[:, None, None, :]
    return m


def attention(q, k, v, ctx_mask, is_causal: bool, scale: float, softcap: float | None = None):
    """Scaled dot-product attention with grouped KV heads; q: (B, H, T, D), k/v: (B, Hkv, S, D)."""
    if softcap is None:
        if ctx_mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx_mask, scale=scale, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=True)
    # Soft-capped scores (Gemma 2) need the explicit path.
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, S)
    scores = torch.tanh(scores / softcap) * softcap
    if ctx_mask is not None:
        scores = scores.masked_fill(~ctx_mask, float("-inf"))
    elif is_causal:
        T, S = scores.shape[-2:]
        scores = scores.masked_fill(~build_mask(None, T, S, device=q.device), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v


def accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


# ---- helpers for families whose layers differ by attention type (Gemma 2/3, Qwen 3, Phi-3) ----


def step_context(
    positions: torch.Tensor,
    key_valid: torch.Tensor | None,
    k_len: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    window: int | None = None,
    tree: torch.Tensor | None = None,
) -> AttnContext:
    """An AttnContext with RoPE tables ``{"cos", "sin"}`` and the mask for one attention type.

    The mask is None (plain causal SDPA) when no padding, window, tree or partial prefill needs
    one. A window no shorter than the keys changes nothing and is dropped. A query row that sees
    no key at all (a left-padding position) is let see every key: its output is never used, and
    this keeps the explicit soft-capped softmax finite (an all -inf row would be NaN and poison
    later layers). ``tree``: see :func:`build_mask`.
    """
    T = positions.shape[1]
    if window is not None and k_len <= window:
        window = None
    rope = {"cos": cos, "sin": sin}
    if tree is None and key_valid is None and window is None and (T == 1 or T == k_len):
        return AttnContext(positions, None, T > 1, rope)
    mask = build_mask(key_valid, T, k_len, window, device=positions.device, q_positions=positions, tree=tree)
    if key_valid is not None or tree is not None:
        mask = mask | ~mask.any(-1, keepdim=True)  # (B|1, 1, T, S)
    return AttnContext(positions, mask, False, rope)


def dynamic_ntk_inv_freq(dim: int, base: float, factor: float, seq_len: int, max_pos: int) -> torch.Tensor:
    """Dynamic NTK RoPE: the base grows once the sequence passes ``max_pos`` (as transformers' "dynamic")."""
    seq_len = max(seq_len, max_pos)
    base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
