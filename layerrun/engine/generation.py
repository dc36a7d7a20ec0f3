"""The generation API of an :class:`~layerrun.engine.engine.Engine`: prompts, requests, streams.

``stream`` is a step generator yielding :class:`Chunk` objects as tokens arrive; ``generate``
collects them into a :class:`Generation`; ``generate_batch`` runs many prompts sharing each layer
load. All of them drive the one generation loop, :class:`~layerrun.engine.batch.BatchGenerator`
(a single sequence is a batch of one); this module only turns requests into its input and its
events into results.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from layerrun.engine.batch import BatchGenerator
from layerrun.engine.sampling import SamplingParams, make_sampler
from layerrun.engine.telemetry import GenerationStats
from layerrun.engine.text import config_eos
from layerrun.errors import FormatError, LayerRunError

DEFAULT_MAX_NEW_TOKENS = 256
# Concurrent astream/agenerate callers batched together even when load() planned for one sequence:
# an app embedding the engine should not see its second request wait for the first to finish.
ASYNC_BATCH = 8
BATCH_FIELDS = {"max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "chat", "system", "ignore_eos",
                "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "logprobs", "json_schema",
                "response_format", "tools", "chat_template_kwargs", "speculate"}


@dataclass
class Chunk:
    """One streamed piece of output: the new text (may be empty while UTF-8 is incomplete)."""

    text: str
    token_id: int | None
    index: int
    finish_reason: str | None = None
    stats: GenerationStats | None = None
    logprob: float | None = None  # with logprobs=: the token's log-probability under the model
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats
    prompt_token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None  # per token, with logprobs=

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "stats": self.stats.to_dict(),
        }


class GenerationAPI:
    """Mixed into Engine: everything that turns prompts into tokens through the generation loop."""

    # ---- prompts ----------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        try:
            return bool(self.tokenizer.chat_template)
        except FormatError:
            return False

    def render_chat(self, prompt, system: str | None = None, **template) -> str:
        """The chat template's text for a string (as a user message) or a list of messages; ``template``
        holds its other inputs (``tools``, ``enable_thinking``, ...), as transformers passes them."""
        from layerrun.engine.tools import prepare_messages

        if isinstance(prompt, str):
            prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        messages, template = prepare_messages(self.tokenizer, list(prompt), template)
        return self.tokenizer.apply_chat_template(messages, True, **template)

    def encode_prompt(self, prompt, chat: bool | None = None, system: str | None = None) -> list[int]:
        """Token ids for a string (chat template applied when the model has one, unless chat=False),
        a list of chat messages, or a list of ids (used as-is)."""
        if isinstance(prompt, str):
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError:
                raise LayerRunError("the prompt is not valid Unicode text (it contains lone surrogates)") from None
            use_chat = self.has_chat_template if chat is None else chat
            if use_chat:
                msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
                return self._tokenizer_ids(self.tokenizer.encode_chat(msgs))
            return self._tokenizer_ids(self.tokenizer.encode(prompt))
        if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], dict):
            return self._tokenizer_ids(self.tokenizer.encode(self.render_chat(list(prompt)), add_special_tokens=False))
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.reshape(-1).tolist()
        try:
            ids = [int(i) for i in prompt]
            self._check_ids(torch.tensor(ids, dtype=torch.long))
        except (TypeError, ValueError, OverflowError, RuntimeError):
            raise LayerRunError(f"a prompt must be text, chat messages or token ids in [0, {self.args.vocab_size})") from None
        return ids

    def _tokenizer_ids(self, ids: list[int]) -> list[int]:
        """Ids from tokenizer.json, which must fit the model's embeddings (a tokenizer from another model
        would otherwise index past them)."""
        top = max(ids, default=-1)
        if top >= self.args.vocab_size:
            raise FormatError(
                f"{self.path / 'tokenizer.json'}: the tokenizer produced token id {top}, but the model has "
                f"{self.args.vocab_size} token embeddings (config.json vocab_size); the tokenizer belongs to another model"
            )
        return ids

    # ---- generation -------------------------------------------------------
    def stream(
        self,
        prompt,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
        chat: bool | None = None,
        system: str | None = None,
        ignore_eos: bool = False,
        speculate: bool = True,
        **options,
    ) -> Iterator[Chunk]:
        """Yield chunks as tokens are generated; the last chunk carries finish_reason and stats.

        ``options``: ``min_p``, ``repetition_penalty``, ``frequency_penalty``, ``presence_penalty``,
        ``logprobs`` (True or k: each chunk carries ``logprob`` and k ``top_logprobs``),
        ``json_schema`` / ``response_format`` (structured output by constrained decoding),
        ``tools`` and ``chat_template_kwargs`` (passed to the chat template). ``speculate=False``:
        no draft for this call (see ``load(draft=...)``).

        One sequence is a batch of one: the same step, stop-string, end-of-sequence and cache logic
        as the batch generator and the server (which run many).
        """
        with self._lock:  # one sequence at a time owns the layer schedule
            bg = BatchGenerator(self, 1)
            req = bg.request(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, chat, system, ignore_eos,
                             speculate, **options)
            n = 0
            try:
                while not req.done:
                    for ev in bg.step():
                        if ev.token_id is not None:
                            yield Chunk(ev.text, ev.token_id, n, logprob=ev.logprob, top_logprobs=ev.top_logprobs)
                            n += 1
                        if ev.finish_reason is not None:  # the last chunk: no token, the finish reason and stats
                            yield Chunk("" if ev.token_id is not None else ev.text, None, n, ev.finish_reason, req.stats)
            finally:
                if not req.done:  # the caller stopped early: nothing more runs for this sequence
                    bg.cancel(req)

    def check_request(self, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, chat, system):
        """Validate one request; returns (prompt ids, max new tokens within the context, params,
        sampler, stop strings). Raises LayerRunError naming what is wrong."""
        params = SamplingParams(temperature, top_k, top_p, seed)
        sampler = make_sampler(params)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise LayerRunError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
        if stop is not None and not isinstance(stop, str) and (
                not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop)):
            raise LayerRunError(f"stop must be a string or a list of strings, got {stop!r}")
        if max_new_tokens < 1:
            raise LayerRunError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompt_ids = self.encode_prompt(prompt, chat=chat, system=system)
        if not prompt_ids:
            raise LayerRunError("the prompt is empty")
        # The context the KV cache and workspace were planned for (the governor's budget), within the model's.
        model_ctx = self.args.max_position_embeddings
        ctx_len = min(self.context, model_ctx)
        if len(prompt_ids) >= ctx_len:
            if ctx_len < model_ctx:
                raise LayerRunError(
                    f"the prompt has {len(prompt_ids)} tokens; this engine was planned for a context of {ctx_len} "
                    f"(the model allows {model_ctx}: pass a larger --context / context=)"
                )
            raise LayerRunError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {ctx_len}")
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        max_new = min(max_new_tokens, ctx_len - len(prompt_ids))
        self.check_memory(len(prompt_ids), max_new)
        return prompt_ids, max_new, params, sampler, stops

    def generate(self, prompt, **kwargs) -> Generation:
        """Generate to completion; returns text, token ids, finish reason and stats (and per-token
        logprobs when ``logprobs=`` is given). Takes the options of :meth:`stream`."""
        return _collect(self.stream(prompt, **kwargs))

    async def astream(self, prompt, **kwargs):
        """Async generator of chunks (the options of :meth:`stream`). Compute runs in the engine's
        scheduler thread, never on the caller's event loop, and concurrent callers share its
        continuous batching: up to ``batch_size`` (of :func:`load`) sequences per step, and at least
        :data:`ASYNC_BATCH` (beyond what the KV cache was planned for, a caller joins only when the
        governor finds room for its cache; else it waits for a running one to finish)."""
        import asyncio

        from layerrun.engine.scheduler import Job

        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def deliver(item) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the caller's loop has closed
                pass

        job = Job(prompt, kwargs, deliver)
        self.scheduler.submit([job])
        n = 0
        try:
            while True:
                item = await q.get()
                if isinstance(item, str):
                    raise LayerRunError(item)
                if item.token_id is not None:
                    yield Chunk(item.text, item.token_id, n, logprob=item.logprob, top_logprobs=item.top_logprobs)
                    n += 1
                if item.finish_reason is not None:
                    text = "" if item.token_id is not None else item.text
                    yield Chunk(text, None, n, item.finish_reason, item.request.stats)
                    return
        finally:
            if not job.finished:
                self.scheduler.cancel(job)  # the caller stopped early: the sequence leaves the batch

    @property
    def scheduler(self):
        """The :class:`~layerrun.engine.scheduler.Scheduler` behind ``astream``/``agenerate`` (started on first use)."""
        if self._scheduler is None:
            from layerrun.engine.scheduler import Scheduler

            with self._lock:
                if self._scheduler is None:
                    self._scheduler = Scheduler(self, max(self.batch_size, ASYNC_BATCH))
        return self._scheduler

    @property
    def has_tokenizer(self) -> bool:
        from layerrun.formats.files import is_file

        return self._tokenizer is not None or is_file(self.path, "tokenizer.json")

    @property
    def eos_token_ids(self) -> set[int]:
        return self.tokenizer.eos_token_ids if self.has_tokenizer else config_eos(self.config)

    def batch_generator(self, batch_size: int | None = None):
        """A :class:`~layerrun.engine.batch.BatchGenerator` for continuous batching (the server uses it)."""
        return BatchGenerator(self, batch_size or self.batch_size)

    def generate_batch(self, prompts: Sequence, batch_size: int | None = None, on_event=None, **sampling) -> list[Generation]:
        """Generate for many prompts, sharing each layer load across the live batch.

        Each prompt is a string, a list of ids, chat messages, or a dict with
        ``prompt`` and per-prompt sampling fields (``max_new_tokens`` or
        ``max_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``,
        ``stop``). Results come back in the order of ``prompts``. At most
        ``batch_size`` sequences run at once; a finished one makes room for
        the next at the following step.
        """
        bg = self.batch_generator(batch_size)
        reqs = []
        for p in prompts:
            kw = dict(sampling)
            if isinstance(p, dict):
                if "prompt" not in p and "messages" not in p:
                    raise LayerRunError(f"each prompt object needs a 'prompt' field; got keys {sorted(p)}")
                extra = {k: v for k, v in p.items() if k not in ("prompt", "messages")}
                if "max_tokens" in extra:
                    extra["max_new_tokens"] = extra.pop("max_tokens")
                unknown = set(extra) - BATCH_FIELDS
                if unknown:
                    raise LayerRunError(f"unknown prompt field(s) {sorted(unknown)}; known: {sorted(BATCH_FIELDS)}")
                kw.update(extra)
                p = p.get("prompt", p.get("messages"))
            reqs.append(bg.request(p, **kw))
        with self._lock:
            bg.run(on_event)
        return [Generation(r.text, r.token_ids, r.finish_reason, r.stats, r.prompt_ids) for r in reqs]

    async def agenerate_batch(self, prompts: Sequence, **kwargs) -> list[Generation]:
        """``generate_batch`` off the caller's event loop."""
        import asyncio

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: self.generate_batch(prompts, **kwargs))

    async def agenerate(self, prompt, **kwargs) -> Generation:
        chunks = [c async for c in self.astream(prompt, **kwargs)]
        return _collect(chunks)


def _collect(chunks) -> Generation:
    text, ids, lps = [], [], []
    for c in chunks:
        text.append(c.text)
        if c.token_id is not None:
            ids.append(c.token_id)
            if c.logprob is not None:
                lps.append((c.logprob, c.top_logprobs or []))
        if c.finish_reason:
            return Generation("".join(text), ids, c.finish_reason, c.stats, logprobs=lps if lps else None)
    raise RuntimeError("stream ended without a final chunk")  # unreachable
