"""Mixtral: Llama attention with a sparse mixture-of-experts feed-forward block.

Each layer's ``block_sparse_moe.gate`` (the router) scores ``num_local_experts``
experts per token; the top ``num_experts_per_tok`` run (SwiGLU with ``w1`` gate,
``w3`` up, ``w2`` down) and their outputs are summed, weighted by the router's
softmax renormalised over the chosen experts.

Only the routed experts' weights are touched. When the engine streams a layer,
it hands ``layer`` a weight dict that holds attention, norms and the router but
not yet the experts, with a ``load_experts(ids)`` method; the model calls it once
routing is known, so the engine reads only those experts' bytes from the file.
A plain dict (a resident layer) already holds every expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from layerrun.models import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rms_norm_eps: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_local_experts={self.num_local_experts}"
            )


def expert_tensor(j: int, w: str) -> str:
    return f"block_sparse_moe.experts.{j}.{w}.weight"


class Model(llama.Model):
    moe = True

    def expected_tensors(self):
        exp = super().expected_tensors()
        a = self.args
        H, I = a.hidden_size, a.intermediate_size
        layer = {k: v for k, v in exp["layer"].items() if not k.startswith("mlp.")}
        layer["block_sparse_moe.gate.weight"] = (a.num_local_experts, H)
        for j in range(a.num_local_experts):
            layer[expert_tensor(j, "w1")] = (I, H)
            layer[expert_tensor(j, "w2")] = (H, I)
            layer[expert_tensor(j, "w3")] = (I, H)
        exp["layer"] = layer
        return exp

    def mlp(self, w, h: torch.Tensor) -> torch.Tensor:
        a = self.args
        B, T, H = h.shape
        x = h.reshape(-1, H)
        logits = F.linear(x, w["block_sparse_moe.gate.weight"])  # (N, E)
        probs = torch.softmax(logits.float(), dim=-1)
        top_w, top_i = torch.topk(probs, a.num_experts_per_tok, dim=-1)  # (N, k)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        hit = torch.unique(top_i).tolist()  # ascending, as transformers visits them
        load = getattr(w, "load_experts", None)
        if load is not None:
            load(hit)
        out = torch.zeros_like(x)
        for j in hit:
            tok, slot = torch.where(top_i == j)
            xs = x[tok]
            y = self.act(F.linear(xs, w[expert_tensor(j, "w1")])) * F.linear(xs, w[expert_tensor(j, "w3")])
            y = F.linear(y, w[expert_tensor(j, "w2")])
            out.index_add_(0, tok, (y * top_w[tok, slot, None]).to(out.dtype))
        return out.view(B, T, H)
