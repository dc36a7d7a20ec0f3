"""Gemma (1): Llama with a (1 + weight) RMSNorm, GeGLU and embeddings scaled by sqrt(hidden_size).

The norm and the embedding scale are this family's quirks; Gemma 2 and Gemma 3 reuse them from here.
Weight names follow the Hugging Face checkpoint, relative to one decoder layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from layerrun.models import llama
from layerrun.models.base import AttnContext, apply_rope, attention


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: normalise and scale by (1 + weight) in fp32, then cast (Llama casts before scaling)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).to(x.dtype)


def scaled_embed(weight: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Embeddings times sqrt(hidden_size), the scale rounded to the weights' dtype as transformers does."""
    scale = torch.tensor(weight.shape[1] ** 0.5, dtype=weight.dtype)
    return F.embedding(input_ids, weight) * scale  # (B, T, H)


def resolve_activation(hidden_activation: str | None, hidden_act: str | None) -> str:
    """Gemma's GeGLU is the tanh approximation; old configs spell it "gelu" (transformers maps it too)."""
    act = hidden_activation or hidden_act or "gelu_pytorch_tanh"
    return "gelu_pytorch_tanh" if act == "gelu" else act


@dataclass
class ModelArgs(llama.ModelArgs):
    head_dim: int | None = 256
    hidden_act: str = "gelu_pytorch_tanh"
    hidden_activation: str | None = None
    tie_word_embeddings: bool = True
    use_bidirectional_attention: bool | None = None

    def __post_init__(self):
        self.hidden_act = resolve_activation(self.hidden_activation, self.hidden_act)
        if self.use_bidirectional_attention:
            raise NotImplementedError(
                f"{self.model_type} with use_bidirectional_attention is an encoder, not supported"
            )
        super().__post_init__()


class Model(llama.Model):
    """Llama's weights, mask and RoPE; Gemma's norm, embedding scale and activation."""

    def embed(self, w: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
        return scaled_embed(w["embed_tokens.weight"], input_ids)

    def layer(self, i: int, w: dict[str, torch.Tensor], x: torch.Tensor, cache, ctx: AttnContext) -> torch.Tensor:
        a = self.args
        B, T, _ = x.shape
        h = rms_norm(x, w["input_layernorm.weight"], a.rms_norm_eps)
        q = F.linear(h, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias"))
        k = F.linear(h, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias"))
        v = F.linear(h, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias"))
        q = q.view(B, T, a.num_attention_heads, a.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, a.num_key_value_heads, a.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, a.num_key_value_heads, a.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        cos, sin = ctx.rope["cos"], ctx.rope["sin"]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, Hkv, S, D)
        o = attention(q, k, v, ctx.mask, ctx.is_causal, a.head_dim**-0.5)
        o = o.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        x = x + F.linear(o, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))
        h = rms_norm(x, w["post_attention_layernorm.weight"], a.rms_norm_eps)
        gate = F.linear(h, w["mlp.gate_proj.weight"])
        up = F.linear(h, w["mlp.up_proj.weight"])
        return x + F.linear(self.act(gate) * up, w["mlp.down_proj.weight"])

    def head(self, w: dict[str, torch.Tensor], x: torch.Tensor, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        h = rms_norm(x, w["norm.weight"], self.args.rms_norm_eps)
        lm = w.get("lm_head.weight")
        if lm is None:
            lm = embeddings["embed_tokens.weight"]
        return F.linear(h, lm)  # (B, T, vocab)
