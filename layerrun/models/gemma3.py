"""Gemma 3 (text, ``gemma3_text``): Gemma 2 with q/k norms and a separate RoPE for local layers.

Differences from Gemma 2, all in this file: per-head (1 + weight) RMSNorm on queries and keys
before RoPE; sliding layers use their own RoPE base (``rope_local_base_freq``, default 10000)
while full layers use ``rope_theta`` plus any ``rope_scaling``; every ``sliding_window_pattern``-th
layer is global (default 6) unless ``layer_types`` says otherwise; no soft-capping by default.

Config spellings: transformers 5 nests RoPE per layer type in ``rope_parameters``
(``{"full_attention": {...}, "sliding_attention": {...}}``); transformers 4 used ``rope_theta``,
``rope_local_base_freq`` and ``rope_scaling`` (global layers only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from layerrun.models import gemma2
from layerrun.models.base import K_NORM, Q_NORM, QK_NORM_ROWS, qk_norm_rows, rope_cos_sin, rope_inv_freq
from layerrun.models.gemma2 import FULL, SLIDING


@dataclass
class ModelArgs(gemma2.ModelArgs):
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    max_position_embeddings: int = 131_072
    sliding_window_pattern: int = 6
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None

    def __post_init__(self):
        rp = self.rope_parameters
        if isinstance(rp, dict) and (FULL in rp or SLIDING in rp):
            full, local = rp.get(FULL) or {}, rp.get(SLIDING) or {}
            self.rope_theta = float(full.get("rope_theta", self.rope_theta))
            self.rope_scaling = full if full.get("rope_type", "default") != "default" else None
            self.rope_local_base_freq = float(local.get("rope_theta", self.rope_local_base_freq))
            if local.get("rope_type", "default") != "default":
                raise NotImplementedError(f"RoPE scaling on sliding layers ({local['rope_type']}) is not supported")
            self.rope_parameters = None  # consumed here; BaseArgs reads only the flat spelling
        super().__post_init__()

    def default_layer_type(self, i: int) -> str:
        return SLIDING if (i + 1) % self.sliding_window_pattern else FULL


class Model(gemma2.Model):
    # transformers' Gemma 3 keeps attn_logit_softcapping in the config but never passes it to attention.
    attn_softcap_applies = False

    def __init__(self, args: ModelArgs):
        super().__init__(args)  # self.inv_freq: global RoPE (rope_theta, rope_scaling)
        self.local_inv_freq, _ = rope_inv_freq(
            args.head_dim, args.rope_local_base_freq, None, args.max_position_embeddings
        )

    def expected_tensors(self) -> dict[str, dict[str, tuple[int, ...]]]:
        exp = super().expected_tensors()
        D = self.args.head_dim
        exp["layer"].update({"self_attn.q_norm.weight": (D,), "self_attn.k_norm.weight": (D,)})
        return exp

    def rope_tables(self, positions: torch.Tensor, dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        dev = positions.device
        return {
            FULL: rope_cos_sin(self.step_inv_freq(positions), positions, dtype, self.rope_scale),
            SLIDING: rope_cos_sin(self.local_inv_freq.to(dev), positions, dtype),
        }

    def fuse(self, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Gemma's, and the q/k norms' fp32 (1 + weight) as one row per head (QK_NORM_ROWS), made once."""
        w = super().fuse(w)
        q, k = w.get(Q_NORM), w.get(K_NORM)
        if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor):
            w[QK_NORM_ROWS] = 1.0 + qk_norm_rows(self.args, q, k).float()
        return w

    def qk_norm(self, w: dict[str, torch.Tensor], qk: torch.Tensor) -> torch.Tensor:
        """Gemma's RMSNorm over each head (D) of ``qk`` (B, T, H + Hkv, D), q's weight on queries, k's on keys."""
        rows = w.get(QK_NORM_ROWS)
        if rows is None:
            rows = 1.0 + qk_norm_rows(self.args, w[Q_NORM], w[K_NORM]).float()
        return (F.rms_norm(qk.float(), (qk.shape[-1],), eps=self.args.rms_norm_eps) * rows).to(qk.dtype)
