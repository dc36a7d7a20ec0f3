"""Text-side pieces of generation: stop strings and end-of-sequence ids.

Pure functions used by the generation loop (:mod:`layerrun.engine.batch`); they know nothing
of models or caches.
"""

from __future__ import annotations


def config_eos(config: dict) -> set[int]:
    """End-of-sequence ids from a config.json (an int or a list), for models without a tokenizer."""
    v = config.get("eos_token_id")
    if isinstance(v, int):
        return {v}
    if isinstance(v, list):
        return {int(x) for x in v}
    return set()


def split_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """(text safe to emit, whether a stop string was hit). On a hit, the text before it.

    Without a hit, holds back the longest suffix that could begin a stop string.
    """
    if not stops:
        return text, False
    first = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (first is None or i < first):
            first = i
    if first is not None:
        return text[:first], True
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return text[: len(text) - keep], False
