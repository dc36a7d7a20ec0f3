"""Gemma (1): Llama with a (1 + weight) RMSNorm, GeGLU and embeddings scaled by sqrt(hidden_size).

The norm and the embedding scale are this family's quirks; Gemma 2 and Gemma 3 reuse them from here.
Weight names follow the Hugging Face checkpoint, relative to one decoder layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from layerrun.models import llama


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: normalise and scale by (1 + weight) in fp32, then cast (Llama casts before scaling)."""
    return F.rms_norm(x.float(), (x.shape[-1],), 1.0 + weight.float(), eps).to(x.dtype)  # the same ops, bit for bit


# A resident layer's fp32 (1 + weight) of each norm, made once by Model.fuse: the key is the weight's name plus this.
PLUS_ONE = ".plus_one"


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
    """Llama's weights, mask, RoPE and layer; Gemma's norm, embedding scale and activation."""

    norm = staticmethod(rms_norm)

    def fuse(self, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Llama's fused products, and each norm's scale (1 + weight) in fp32 made once (``name + PLUS_ONE``)."""
        w = super().fuse(w)
        for name, t in list(w.items()):
            if name.endswith("layernorm.weight") and isinstance(t, torch.Tensor) and t.dim() == 1:
                w[name + PLUS_ONE] = 1.0 + t.float()
        return w

    def norm_at(self, w: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
        s = w.get(name + PLUS_ONE)
        if s is None:
            return rms_norm(x, w[name], self.args.rms_norm_eps)
        return F.rms_norm(x.float(), (x.shape[-1],), s, self.args.rms_norm_eps).to(x.dtype)

    def embed(self, w: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
        return scaled_embed(w["embed_tokens.weight"], input_ids)
