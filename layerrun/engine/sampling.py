"""Samplers: small pure functions from logits (B, V) to token ids (B,).

Temperature 0 is argmax. Top-k, top-p and min-p filter the distribution before
sampling; a seeded ``torch.Generator`` makes sampling reproducible.

Penalties (vLLM's semantics) depend on a sequence's history, so they are a
logits processor (:class:`Penalties`): the generation loop calls each
request's processors with (token history, logits) before its sampler, and
``accept(token)`` after the token is chosen. Constrained decoding
(``layerrun.engine.constrained``) uses the same hook.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from layerrun.errors import LayerRunError

Sampler = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

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
        if not 0.0 <= self.min_p <= 1.0:
            raise LayerRunError(f"min_p must be in [0, 1] (0 disables it), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise LayerRunError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                raise LayerRunError(f"{name} must be in [-2, 2] (0 disables it), got {v}")

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


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


def apply_min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop tokens whose probability is below ``p`` times the most likely token's (0 disables it)."""
    if p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    keep = probs >= p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(~keep, float("-inf"))


def apply_penalties(
    logits: torch.Tensor, prompt_ids: Sequence[int], output_ids: Sequence[int],
    repetition: float = 1.0, frequency: float = 0.0, presence: float = 0.0,
) -> torch.Tensor:
    """vLLM's penalties on one row of logits (V,).

    ``repetition`` (CTRL / transformers): every token seen in the prompt or the output has its
    logit divided by it when positive, multiplied when negative. ``frequency`` subtracts
    ``frequency * count`` and ``presence`` subtracts ``presence`` once, for tokens of the output only.
    """
    vocab = logits.shape[-1]
    out = logits.float().clone()
    if repetition != 1.0:
        seen = torch.zeros(vocab, dtype=torch.bool)
        ids = [i for i in list(prompt_ids) + list(output_ids) if 0 <= i < vocab]
        if ids:
            seen[torch.tensor(ids)] = True
        seen = seen.to(out.device)
        out = torch.where(seen, torch.where(out > 0, out / repetition, out * repetition), out)
        # A tiny penalty (the API allows any > 0, e.g. 5e-324) overflows a logit to inf and the softmax to NaN;
        # the largest finite float32 samples the same (the seen token wins either way).
        out = torch.nan_to_num(out, nan=0.0, posinf=torch.finfo(torch.float32).max / 2,
                               neginf=torch.finfo(torch.float32).min / 2)
    if (frequency or presence) and output_ids:
        counts = torch.bincount(torch.tensor([i for i in output_ids if 0 <= i < vocab], dtype=torch.long),
                                minlength=vocab)[:vocab].to(out.device, out.dtype)
        out = out - frequency * counts - presence * (counts > 0).to(out.dtype)
    return out


class LogitsProcessor(Protocol):
    """A per-request hook at sampling time: ``(token history, logits (V,)) -> logits (V,)``, called
    before the sampler; ``accept(token)`` is called with the token that was chosen."""

    def __call__(self, history: Sequence[int], logits: torch.Tensor) -> torch.Tensor: ...

    def accept(self, token: int) -> None: ...


class Penalties:
    """Repetition / frequency / presence penalties as a logits processor (the history is prompt + output)."""

    def __init__(self, params: SamplingParams, prompt_len: int):
        self.params, self.prompt_len = params, prompt_len

    def __call__(self, history: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        return apply_penalties(logits, history[: self.prompt_len], history[self.prompt_len :],
                               p.repetition_penalty, p.frequency_penalty, p.presence_penalty)

    def accept(self, token: int) -> None:
        pass


GREEDY_BELOW = 1e-5  # temperatures this small are argmax (and would overflow the logits)


def make_sampler(params: SamplingParams) -> Sampler:
    params.check()
    if params.temperature < GREEDY_BELOW:
        return greedy
    gen = torch.Generator()
    gen.manual_seed(params.seed if params.seed is not None else torch.seed())

    def sample(logits: torch.Tensor) -> torch.Tensor:
        x = logits.float() / params.temperature
        big = torch.finfo(torch.float32).max
        x = torch.nan_to_num(x, nan=-big, posinf=big, neginf=-big)  # huge logits (a tiny penalty or temperature)
        x = apply_top_k(x, params.top_k)
        x = apply_top_p(x, params.top_p)
        x = apply_min_p(x, params.min_p)
        probs = torch.softmax(x, dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)

    return sample
