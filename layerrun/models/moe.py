"""The sparse mixture-of-experts feed-forward block shared by the MoE families (Mixtral, Qwen 3 MoE).

A router scores every expert per token; the top-k run and their outputs are summed, weighted by the
router's softmax (renormalised over the chosen experts where the family does so). Only routed
experts' weights are touched: before the expert loop the block calls ``w.load_experts(ids)`` when
the weight dict has it (a streamed layer whose experts have not been read yet; see the engine).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def with_experts(exp: dict, router: str, expert: Callable[[int], tuple[str, str, str]], n: int, hidden: int,
                 width: int) -> dict:
    """``expected_tensors()`` of a dense family with its MLP replaced by a router and ``n`` experts
    of ``width`` (gate and up: (width, hidden); down: (hidden, width))."""
    layer = {k: v for k, v in exp["layer"].items() if not k.startswith("mlp.")}
    layer[router] = (n, hidden)
    for j in range(n):
        gate, up, down = expert(j)
        layer.update({gate: (width, hidden), up: (width, hidden), down: (hidden, width)})
    return {**exp, "layer": layer}


def sparse_moe(
    w,
    h: torch.Tensor,
    router: str,
    expert: Callable[[int], tuple[str, str, str]],
    top_k: int,
    act,
    normalize: bool,
    weights_in_dtype: bool,
) -> torch.Tensor:
    """``h`` (B, T, H) -> (B, T, H). ``expert(j)`` names expert j's (gate, up, down) weights.

    ``weights_in_dtype``: cast the routing weights to the activations' dtype before scaling (Qwen 3 MoE)
    rather than scaling in float32 and casting the product (Mixtral), as transformers does for each.
    """
    B, T, H = h.shape
    x = h.reshape(-1, H)
    logits = F.linear(x, w[router])  # (N, E)
    probs = torch.softmax(logits.float(), dim=-1)
    top_w, top_i = torch.topk(probs, top_k, dim=-1)  # (N, k)
    if normalize:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    if weights_in_dtype:
        top_w = top_w.to(logits.dtype)
    hit = torch.unique(top_i).tolist()  # ascending, as transformers visits them
    load = getattr(w, "load_experts", None)
    if load is not None:
        load(hit)
    out = torch.zeros_like(x)
    for j in hit:
        tok, slot = torch.where(top_i == j)
        xs = x[tok]
        gate, up, down = expert(j)
        y = F.linear(act(F.linear(xs, w[gate])) * F.linear(xs, w[up]), w[down])
        out.index_add_(0, tok, (y * top_w[tok, slot, None]).to(out.dtype))
    return out.view(B, T, H)
