"""Mixtral: Llama attention with a sparse mixture-of-experts feed-forward block.

Each layer's ``block_sparse_moe.gate`` (the router) scores ``num_local_experts``
experts per token; the top ``num_experts_per_tok`` run (SwiGLU with ``w1`` gate,
``w3`` up, ``w2`` down) and their outputs are summed, weighted by the router's
softmax renormalised over the chosen experts (see :mod:`layerrun.models.moe`,
which also explains how only the routed experts are read in stream mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerrun.models import llama
from layerrun.models.moe import sparse_moe, with_experts

ROUTER = "block_sparse_moe.gate.weight"


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
        a = self.args
        return with_experts(super().expected_tensors(), ROUTER, _expert_names, a.num_local_experts, a.hidden_size,
                            a.intermediate_size)

    @property
    def n_experts(self) -> int:
        return self.args.num_local_experts

    @property
    def top_k(self) -> int:
        return self.args.num_experts_per_tok

    def mlp(self, w, h: torch.Tensor) -> torch.Tensor:
        return sparse_moe(
            w, h, ROUTER, _expert_names, self.top_k, self.act, normalize=True,
            weights_in_dtype=False,
        )


def _expert_names(j: int) -> tuple[str, str, str]:
    return expert_tensor(j, "w1"), expert_tensor(j, "w3"), expert_tensor(j, "w2")  # gate, up, down
