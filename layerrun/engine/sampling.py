"""Samplers: small pure functions from logits (B, V) to token ids (B,).

Temperature 0 is argmax. Top-k and top-p filter the distribution before
sampling; a seeded ``torch.Generator`` makes sampling reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from layerrun.errors import LayerRunError

Sampler = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        for name, v in (("temperature", self.temperature), ("top_p", self.top_p)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
                raise LayerRunError(f"{name} must be a finite number, got {v!r}")
        for name, v in (("top_k", self.top_k), ("seed", self.seed)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise LayerRunError(f"{name} must be an integer, got {v!r}")
        if self.temperature < 0:
            raise LayerRunError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise LayerRunError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise LayerRunError(f"top_p must be in (0, 1], got {self.top_p}")


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches ``p`` (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    # A token is dropped when the mass before it already reaches p; the most likely token never is.
    drop = (probs.cumsum(-1) - probs) >= p
    drop[..., 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)


GREEDY_BELOW = 1e-5  # temperatures this small are argmax (and would overflow the logits)


def make_sampler(params: SamplingParams) -> Sampler:
    params.check()
    if params.temperature < GREEDY_BELOW:
        return greedy
    gen = torch.Generator()
    gen.manual_seed(params.seed if params.seed is not None else torch.seed())

    def sample(logits: torch.Tensor) -> torch.Tensor:
        x = logits.float() / params.temperature
        x = apply_top_k(x, params.top_k)
        x = apply_top_p(x, params.top_p)
        probs = torch.softmax(x, dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)

    return sample
