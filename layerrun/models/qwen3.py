"""Qwen 3 (dense): Llama plus a per-head RMSNorm on queries and keys before RoPE.

No q/k/v bias (unlike Qwen 2) and an explicit ``head_dim``. With ``use_sliding_window`` the
layers from ``max_window_layers`` on use a sliding window (or as ``layer_types`` says); the
released checkpoints have it off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from layerrun.models import llama
from layerrun.models.base import AttnContext, apply_rope, attention, rms_norm, rope_cos_sin, step_context

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

    def prepare(self, positions: torch.Tensor, key_valid: torch.Tensor | None, k_len: int, dtype) -> dict:
        """One AttnContext per layer type (they differ only by the window)."""
        cos, sin = rope_cos_sin(self.step_inv_freq(positions), positions, dtype, self.rope_scale)
        window = {FULL: None, SLIDING: self.args.sliding_window}
        return {t: step_context(positions, key_valid, k_len, cos, sin, window[t]) for t in set(self.args.layer_types)}

    def layer(self, i: int, w: dict[str, torch.Tensor], x: torch.Tensor, cache, ctx: dict) -> torch.Tensor:
        a = self.args
        c: AttnContext = ctx[a.layer_types[i]]
        B, T, _ = x.shape
        h = rms_norm(x, w["input_layernorm.weight"], a.rms_norm_eps)
        q = F.linear(h, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias"))
        k = F.linear(h, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias"))
        v = F.linear(h, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias"))
        q = q.view(B, T, a.num_attention_heads, a.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, a.num_key_value_heads, a.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, a.num_key_value_heads, a.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q = rms_norm(q, w["self_attn.q_norm.weight"], a.rms_norm_eps)  # per head, over D
        k = rms_norm(k, w["self_attn.k_norm.weight"], a.rms_norm_eps)
        q, k = apply_rope(q, c.rope["cos"], c.rope["sin"]), apply_rope(k, c.rope["cos"], c.rope["sin"])
        if cache is not None:
            k, v = cache.update(k, v)  # (B, Hkv, S, D)
        o = attention(q, k, v, c.mask, c.is_causal, a.head_dim**-0.5)
        o = o.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        x = x + F.linear(o, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))
        h = rms_norm(x, w["post_attention_layernorm.weight"], a.rms_norm_eps)
        gate = F.linear(h, w["mlp.gate_proj.weight"], w.get("mlp.gate_proj.bias"))
        up = F.linear(h, w["mlp.up_proj.weight"], w.get("mlp.up_proj.bias"))
        return x + F.linear(self.act(gate) * up, w["mlp.down_proj.weight"], w.get("mlp.down_proj.bias"))
