"""Gemma 2: Gemma with sandwich norms, soft-capping and alternating sliding-window layers.

Differences from Gemma 1, all in this file: a norm after attention and around the MLP
(``post_attention_layernorm`` is applied to the attention output, ``pre_/post_feedforward_layernorm``
wrap the MLP), attention scores and final logits soft-capped with tanh, scores scaled by
``query_pre_attn_scalar ** -0.5``, and layers that alternate between full and sliding-window
attention (``layer_types``, else even layers slide). Gemma 3 builds on this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerrun.models import gemma
from layerrun.models.base import AttnContext, rope_cos_sin, step_context

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass
class ModelArgs(gemma.ModelArgs):
    hidden_activation: str | None = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: list[str] | None = None
    final_logit_softcapping: float | None = 30.0
    attn_logit_softcapping: float | None = 50.0

    def __post_init__(self):
        super().__post_init__()
        if self.layer_types is None:
            self.layer_types = [self.default_layer_type(i) for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        unknown = set(self.layer_types) - {FULL, SLIDING}
        if unknown:
            raise NotImplementedError(f"layer_types {sorted(unknown)} are not supported (supported: {FULL}, {SLIDING})")

    def default_layer_type(self, i: int) -> str:
        return SLIDING if (i + 1) % 2 else FULL  # even layers slide


class Model(gemma.Model):
    attn_softcap_applies = True  # Gemma 3 turns it off, as transformers does

    def expected_tensors(self) -> dict[str, dict[str, tuple[int, ...]]]:
        exp = super().expected_tensors()
        H = self.args.hidden_size
        exp["layer"].update({"pre_feedforward_layernorm.weight": (H,), "post_feedforward_layernorm.weight": (H,)})
        return exp

    def rope_tables(self, positions: torch.Tensor, dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin per layer type; Gemma 2 uses one RoPE for both."""
        cs = rope_cos_sin(self.step_inv_freq(positions), positions, dtype, self.rope_scale)
        return {FULL: cs, SLIDING: cs}

    def prepare(self, positions: torch.Tensor, key_valid: torch.Tensor | None, k_len: int, dtype, tree=None) -> dict:
        """One AttnContext per layer type: the global and the sliding-window mask, each with its RoPE."""
        ropes = self.rope_tables(positions, dtype)
        window = {FULL: None, SLIDING: self.args.sliding_window}
        return {
            t: step_context(positions, key_valid, k_len, *ropes[t], window[t], tree) for t in set(self.args.layer_types)
        }

    def layer_context(self, i: int, ctx: dict) -> AttnContext:
        return ctx[self.args.layer_types[i]]

    def layer(self, i: int, w: dict[str, torch.Tensor], x: torch.Tensor, cache, ctx: dict) -> torch.Tensor:
        a, norm = self.args, self.norm_at
        softcap = a.attn_logit_softcapping if self.attn_softcap_applies else None
        h = norm(w, "input_layernorm.weight", x)
        o = self.self_attn(w, h, cache, self.layer_context(i, ctx), a.query_pre_attn_scalar**-0.5, softcap)
        x = x + norm(w, "post_attention_layernorm.weight", o)
        h = self.mlp(w, norm(w, "pre_feedforward_layernorm.weight", x))
        return x + norm(w, "post_feedforward_layernorm.weight", h)

    def head(self, w: dict[str, torch.Tensor], x: torch.Tensor, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = super().head(w, x, embeddings)  # (B, T, vocab)
        cap = self.args.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
