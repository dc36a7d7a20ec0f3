"""A conversation's generator: consecutive requests on one engine that reuse the KV cache.

Each turn of a chat re-renders the whole conversation, but everything up to the new message was
already computed in the turn before; :class:`ChatSession` keeps one batch-of-one generator with
``reuse_prefix`` on, so a turn prefills only the tokens past the longest prefix it shares with
what the cache holds (the new message, and whatever the template writes differently from what
was generated). The tokens are those of a fresh start (tested).
"""

from __future__ import annotations

from collections.abc import Iterator

from layerrun.engine.batch import BatchGenerator


class ChatSession:
    def __init__(self, engine):
        self.engine = engine
        self.bg = BatchGenerator(engine, 1, reuse_prefix=True)
        self.last = None  # the latest request (its reused_prompt_tokens, stats)

    def stream(self, messages, max_new_tokens: int | None = None, **options) -> Iterator:
        """Like :meth:`Engine.stream` (same options); ``max_new_tokens`` None runs to the end of the context."""
        from layerrun.engine.engine import Chunk

        eng = self.engine
        if max_new_tokens is None:
            max_new_tokens = eng.context  # capped at what the context leaves
        with eng._lock:
            req = self.bg.request(messages, max_new_tokens, **options)
            self.last = req
            n = 0
            try:
                while not req.done:
                    for ev in self.bg.step():
                        if ev.token_id is not None:
                            yield Chunk(ev.text, ev.token_id, n, logprob=ev.logprob, top_logprobs=ev.top_logprobs)
                            n += 1
                        if ev.finish_reason is not None:
                            yield Chunk("" if ev.token_id is not None else ev.text, None, n, ev.finish_reason, req.stats)
            finally:
                if not req.done:
                    self.bg.cancel(req)

    def reset(self) -> None:
        """Forget the kept cache."""
        self.bg = BatchGenerator(self.engine, 1, reuse_prefix=True)
