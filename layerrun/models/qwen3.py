"""Qwen 3 (dense): Llama plus a per-head RMSNorm on queries and keys before RoPE.

No q/k/v bias (unlike Qwen 2) and an explicit ``head_dim``. With ``use_sliding_window`` the
layers from ``max_window_layers`` on use a sliding window (or as ``layer_types`` says); the
released checkpoints have it off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerrun.models import llama
from layerrun.models.base import (
    K_NORM,
    Q_NORM,
    QK_NORM_ROWS,
    AttnContext,
    qk_norm_rows,
    rms_norm,
    rope_cos_sin,
    step_context,
)

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass
class ModelArgs(llama.ModelArgs):
    head_dim: int | None = 128
    max_window_layers: int = 28
    layer_types: list[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        if not self.use_sliding_window:
            self.sliding_window = None
        if self.layer_types is None:
            self.layer_types = [
                SLIDING if self.sliding_window is not None and i >= self.max_window_layers else FULL
                for i in range(self.num_hidden_layers)
            ]
        if set(self.layer_types) - {FULL, SLIDING} or len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types must list {FULL!r} or {SLIDING!r} for each of the {self.num_hidden_layers} layers"
            )


class Model(llama.Model):
    def expected_tensors(self) -> dict[str, dict[str, tuple[int, ...]]]:
        exp = super().expected_tensors()
        D = self.args.head_dim
        exp["layer"].update({"self_attn.q_norm.weight": (D,), "self_attn.k_norm.weight": (D,)})
        return exp

    def prepare(self, positions: torch.Tensor, key_valid: torch.Tensor | None, k_len: int, dtype, tree=None) -> dict:
        """One AttnContext per layer type (they differ only by the window)."""
        cos, sin = rope_cos_sin(self.step_inv_freq(positions), positions, dtype, self.rope_scale)
        window = {FULL: None, SLIDING: self.args.sliding_window}
        return {t: step_context(positions, key_valid, k_len, cos, sin, window[t], tree) for t in set(self.args.layer_types)}

    def layer_context(self, i: int, ctx: dict) -> AttnContext:
        return ctx[self.args.layer_types[i]]

    def fuse(self, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Llama's fused products, and the q/k norm weights as one row per head (QK_NORM_ROWS), made once."""
        w = super().fuse(w)
        q, k = w.get(Q_NORM), w.get(K_NORM)
        if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor):
            w[QK_NORM_ROWS] = qk_norm_rows(self.args, q, k)
        return w

    def qk_norm(self, w: dict[str, torch.Tensor], qk: torch.Tensor) -> torch.Tensor:
        """Llama's RMSNorm over each head (D) of ``qk`` (B, T, H + Hkv, D), q's weight on queries, k's on keys."""
        rows = w.get(QK_NORM_ROWS)
        if rows is None:
            rows = qk_norm_rows(self.args, w[Q_NORM], w[K_NORM])
        return rms_norm(qk, rows, self.args.rms_norm_eps)

