"""Qwen 3 MoE (e.g. Qwen3-30B-A3B): Qwen 3 attention with a sparse mixture-of-experts block.

``mlp.gate`` routes each token to ``num_experts_per_tok`` of ``num_experts`` small SwiGLU experts
(``mlp.experts.J.gate_proj / up_proj / down_proj``, width ``moe_intermediate_size``); the routing
weights are renormalised over the chosen experts only with ``norm_topk_prob``, and cast to the
activations' dtype before scaling (:mod:`layerrun.models.moe`). With many small experts and a
decode step using a few, stream mode reads a small share of each layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from layerrun.models import qwen3
from layerrun.models.moe import sparse_moe, with_experts


@dataclass
class ModelArgs(qwen3.ModelArgs):
    num_experts: int = 128
    num_local_experts: int | None = None  # transformers 5's name for num_experts
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    def __post_init__(self):
        super().__post_init__()
        if self.num_local_experts is not None:
            self.num_experts = self.num_local_experts
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts={self.num_experts}")
        if self.mlp_only_layers or self.decoder_sparse_step != 1:
            raise NotImplementedError(
                "dense layers among the sparse ones (mlp_only_layers / decoder_sparse_step > 1) are not "
                "supported; the released checkpoints are sparse in every layer"
            )


def _expert(j: int) -> tuple[str, str, str]:
    e = f"mlp.experts.{j}."
    return e + "gate_proj.weight", e + "up_proj.weight", e + "down_proj.weight"


class Model(qwen3.Model):
    moe = True

    @property
    def n_experts(self) -> int:
        return self.args.num_experts

    @property
    def top_k(self) -> int:
        return self.args.num_experts_per_tok

    def expected_tensors(self):
        a = self.args
        return with_experts(super().expected_tensors(), "mlp.gate.weight", _expert, a.num_experts, a.hidden_size,
                            a.moe_intermediate_size)

    def mlp(self, w, h: torch.Tensor) -> torch.Tensor:
        return sparse_moe(w, h, "mlp.gate.weight", _expert, self.top_k, self.act,
                          normalize=self.args.norm_topk_prob, weights_in_dtype=True)
