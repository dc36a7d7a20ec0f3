"""Phi-3 (and Phi-3.5 / Phi-4-mini, which share ``model_type: phi3``): Llama with fused projections.

Differences from Llama, all in this file: ``self_attn.qkv_proj`` holds q, k and v stacked along
the output dimension and ``mlp.gate_up_proj`` holds gate then up; RoPE may cover only the first
``partial_rotary_factor`` of each head; and LongRoPE scaling (``longrope``, formerly ``su``)
rescales each frequency by ``short_factor`` or, once a step reaches past
``original_max_position_embeddings``, by ``long_factor``; at that switch the engine recomputes the
sequence's cache with the long factors, as transformers does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from layerrun.models import llama
from layerrun.models.base import AttnContext, apply_rope, attention, rms_norm, rope_inv_freq


@dataclass
class ModelArgs(llama.ModelArgs):
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    partial_rotary_factor: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        rp = self.rope_parameters if isinstance(self.rope_parameters, dict) else {}
        self.partial_rotary_factor = float(rp.get("partial_rotary_factor", self.partial_rotary_factor))
        s = self.rope_scaling
        if s and s.get("rope_type", s.get("type")) in ("su", "yarn", "longrope"):
            self.rope_scaling = {**s, "rope_type": "longrope"}  # transformers maps su and yarn to longrope for phi3

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        self.args = args
        self.act = llama.ACTIVATIONS[args.hidden_act]
        self.dynamic_factor = None
        dim, s = args.rotary_dim, args.rope_scaling
        self.long_inv_freq = None
        if s and s["rope_type"] == "longrope":
            orig = args.original_max_position_embeddings
            factor = s.get("factor") or args.max_position_embeddings / orig
            attn = s.get("attention_factor")
            if attn is None:
                attn = math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1.0 else 1.0
            base = args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)  # (dim/2,)
            self.inv_freq = 1.0 / (torch.tensor(s["short_factor"], dtype=torch.float32) * base)
            self.long_inv_freq = 1.0 / (torch.tensor(s["long_factor"], dtype=torch.float32) * base)
            self.rope_scale = float(attn)
        else:
            self.inv_freq, self.rope_scale = rope_inv_freq(dim, args.rope_theta, s, args.max_position_embeddings)

    def step_inv_freq(self, positions: torch.Tensor) -> torch.Tensor:
        """Short factors until a sequence reaches past original_max_position_embeddings, then long.

        Chosen per row (B, 1, dim/2): the rows of a batch are independent sequences, and each must
        compute what it would alone. (transformers picks by the batch's furthest position.)
        """
        if self.long_inv_freq is None:
            return self.inv_freq.to(positions.device)
        long = (positions.max(dim=-1).values + 1 > self.args.original_max_position_embeddings)[:, None, None]
        return torch.where(long, self.long_inv_freq.to(positions.device), self.inv_freq.to(positions.device))

    @property
    def rerun_prefix_at(self) -> int | None:
        """The position at which a running sequence switches to the long factors. Its cached keys
        were rotated with the short ones, so the engine recomputes the whole sequence there, as
        transformers does (Phi3ForCausalLM.prepare_inputs_for_generation drops the cache)."""
        return self.args.original_max_position_embeddings if self.long_inv_freq is not None else None

    def max_tree_depth(self, position: int) -> int | None:
        """A token tree rooted before the switch to the long factors must end before it: its pass
        would rotate every node with the long factors, where a token at a time uses the short ones."""
        orig = self.args.original_max_position_embeddings
        if self.long_inv_freq is None or position >= orig:
            return None
        return orig - 1 - position

    def expected_tensors(self) -> dict[str, dict[str, tuple[int, ...]]]:
        a = self.args
        H, D, I = a.hidden_size, a.head_dim, a.intermediate_size
        qkv = (a.num_attention_heads + 2 * a.num_key_value_heads) * D
        layer = {
            "input_layernorm.weight": (H,),
            "post_attention_layernorm.weight": (H,),
            "self_attn.qkv_proj.weight": (qkv, H),
            "self_attn.o_proj.weight": (H, a.num_attention_heads * D),
            "mlp.gate_up_proj.weight": (2 * I, H),
            "mlp.down_proj.weight": (H, I),
        }
        final = {"norm.weight": (H,)}
        if not a.tie_word_embeddings:
            final["lm_head.weight"] = (a.vocab_size, H)
        return {"embeddings": {"embed_tokens.weight": (a.vocab_size, H)}, "layer": layer, "final": final}

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on the first rotary_dim channels of each head; the rest pass through."""
        rd = cos.shape[-1]
        if rd == x.shape[-1]:
            return apply_rope(x, cos, sin)
        return torch.cat((apply_rope(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)  # (B, H, T, D)

    def layer(self, i: int, w: dict[str, torch.Tensor], x: torch.Tensor, cache, ctx: AttnContext) -> torch.Tensor:
        a = self.args
        B, T, _ = x.shape
        H, Hkv, D = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        h = rms_norm(x, w["input_layernorm.weight"], a.rms_norm_eps)
        qkv = F.linear(h, w["self_attn.qkv_proj.weight"])  # (B, T, (H + 2*Hkv)*D)
        q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)
        q = q.reshape(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.reshape(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.reshape(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        cos, sin = ctx.rope["cos"], ctx.rope["sin"]
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, Hkv, S, D)
        o = attention(q, k, v, ctx.mask, ctx.is_causal, D**-0.5)
        o = o.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        x = x + F.linear(o, w["self_attn.o_proj.weight"])
        h = rms_norm(x, w["post_attention_layernorm.weight"], a.rms_norm_eps)
        gate, up = F.linear(h, w["mlp.gate_up_proj.weight"]).chunk(2, dim=-1)  # 2 x (B, T, I)
        return x + F.linear(up * self.act(gate), w["mlp.down_proj.weight"])
