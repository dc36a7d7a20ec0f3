"""What every API flavour of the server shares: OpenAI-style errors, and :class:`Backend`, which
checks prompts against the context and the queue, hands sequences to the engine worker, and
collects what comes back.

An API module (``openai_api.py``; others alongside) gets the backend as ``app.state.backend``:
``tickets, q = backend.start(prompts, n, options_for, max_tokens, param)`` queues ``len(prompts)
x n`` sequences (``options_for(j)`` gives the ``BatchGenerator.request`` keywords of choice ``j``);
``await backend.collect(request, tickets, q)`` waits for them all (None if the client left), or
``await backend.next(q)`` takes the outputs one step at a time for a stream.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from layerrun.errors import LayerRunError
from layerrun.server.metrics import ServerMetrics
from layerrun.server.worker import Output, Ticket, Worker

GREEDY_BELOW = 1e-5


class APIError(Exception):
    """A refusal, sent as an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return AsciiJSON(self.body(), status_code=self.status, headers=self.headers)


class AsciiJSON(JSONResponse):
    """Error bodies may quote the request (a model name, a template's message), which may hold lone surrogates."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


@dataclass
class Choice:
    """One sequence's output, gathered: text, token ids, per-token logprobs, finish reason, token count."""

    text: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list]] = field(default_factory=list)  # (token, logprob, top)
    finish_reason: str | None = None
    completion_tokens: int = 0

    @property
    def content(self) -> str:
        return "".join(self.text)


@dataclass
class Backend:
    engine: object
    worker: Worker
    metrics: ServerMetrics
    batch_size: int
    max_waiting: int
    context: int
    names: list[str]

    def check_model(self, model: str | None) -> None:
        # As vLLM: a name other than a served one is 404 model_not_found; leaving it out means the served model.
        if model is not None and model not in self.names:
            raise APIError(404, f"the model `{model}` does not exist; this server serves: {', '.join(self.names)}",
                           param="model", code="model_not_found")

    def check_alive(self) -> None:
        stage = getattr(self.engine, "stage", None)
        if stage is not None and stage.failure:  # torchrun: a stage (rank) is gone
            raise APIError(503, stage.failure, type="service_unavailable")
        if not self.worker.alive:
            raise APIError(503, "the engine worker is not running", type="service_unavailable")

    # ---- model files that changed on disk ----------------------------------------------
    async def file_problems(self) -> dict[str, str]:
        """Model files found changed on disk and not restored, checked again now (off the loop: it may
        hash a file): file name -> what is wrong."""
        if not self.engine.file_problems():
            return {}
        return await run_in_threadpool(self.engine.recheck_files)

    async def check_files(self) -> None:
        """503 naming the model files that changed on disk (checked again first)."""
        problems = await self.file_problems()
        if problems:
            raise files_error(problems)

    def _recheck_soon(self) -> None:
        """Check the changed files again in the background (for callers that cannot wait on it)."""
        lock = self.__dict__.setdefault("_recheck_lock", threading.Lock())
        if lock.acquire(blocking=False):
            def run():
                try:
                    self.engine.recheck_files()
                finally:
                    lock.release()
            threading.Thread(target=run, name="layerrun-recheck", daemon=True).start()

    def start(self, prompts: list[list[int]], n: int, options_for: Callable[[int], dict], max_tokens: int | None,
              param: str) -> tuple[list[Ticket], asyncio.Queue]:
        """Queue ``n`` sequences per prompt (429 when the queue is full); choice ``i * n + j`` is
        prompt ``i``'s ``j``-th. Call on the event loop."""
        context, batch_size, max_waiting, worker = self.context, self.batch_size, self.max_waiting, self.worker
        problems = self.engine.file_problems()  # (the OpenAI routes check them again first: check_files)
        if problems:
            self._recheck_soon()
            raise files_error(problems)
        for ids in prompts:
            if not ids:
                raise APIError(400, f"{param}: the prompt is empty", param=param)
            if len(ids) >= context:
                raise APIError(400, f"{param}: the prompt has {len(ids)} tokens; this model's context is {context} "
                                    "(and at least one token must be generated)", param=param,
                               code="context_length_exceeded")
        k = len(prompts) * n
        if k > batch_size + max_waiting:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={n} is {k} sequences; this server takes at most "
                                f"{batch_size + max_waiting} at once (--batch-size + --max-waiting)", param="n")
        if worker.room() < k:
            self.metrics.rejected.inc(reason="queue_full")
            waiting = max(worker.active - batch_size, 0)
            raise APIError(429, f"the server is at capacity: {min(worker.active, batch_size)} sequences running and "
                                f"{waiting} waiting (--batch-size {batch_size}, --max-waiting {max_waiting}); "
                                "retry later", type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        q: asyncio.Queue = asyncio.Queue()
        tickets = []
        for i, ids in enumerate(prompts):
            for j in range(n):
                opts = options_for(j)
                opts["max_new_tokens"] = min(max_tokens or context, context - len(ids))
                try:  # its KV cache could never fit the memory budget, even with every layer streamed
                    self.engine.check_memory(len(ids), opts["max_new_tokens"])
                except LayerRunError as e:
                    raise APIError(400, str(e), param="max_tokens", code="insufficient_memory") from None
                tickets.append(Ticket(ids, opts, queue=q, index=i * n + j))
        worker.submit(tickets)
        return tickets, q

    @staticmethod
    async def next(q: asyncio.Queue) -> tuple[int, Output]:
        i, o = await q.get()
        if o.error:
            kind = "invalid_request_error" if o.error_status < 500 else "server_error" if o.error_code else "internal_error"
            raise APIError(o.error_status, o.error, type=kind, code=o.error_code)
        return i, o

    def cancel(self, tickets: list[Ticket]) -> None:
        for t in tickets:
            self.worker.cancel(t)  # a no-op for finished ones

    async def collect(self, request: Request, tickets: list[Ticket], q: asyncio.Queue) -> dict[int, Choice] | None:
        """Every choice, by index, or None if the client left first (its sequences are then cancelled)."""

        async def gather() -> dict[int, Choice]:
            acc = {t.index: Choice() for t in tickets}
            left = len(tickets)
            while left:
                i, o = await self.next(q)
                c = acc[i]
                c.text.append(o.text)
                if o.token_id is not None:
                    c.ids.append(o.token_id)
                    if o.logprob is not None:
                        c.logprobs.append((o.token_id, o.logprob, o.top_logprobs or []))
                if o.finish_reason:
                    c.finish_reason, c.completion_tokens = o.finish_reason, o.completion_tokens
                    left -= 1
            return dict(sorted(acc.items()))

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, gone = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                return work.result()
            return None
        finally:
            for task in (work, gone):
                task.cancel()
            self.cancel(tickets)


def files_error(problems: dict[str, str]) -> APIError:
    return APIError(503, " ".join(problems.values()) + " (checked again on every request)",
                    type="service_unavailable", code="model_file_changed", headers={"Retry-After": "5"})


def sampling_options(body, j: int) -> dict:
    """``BatchGenerator.request`` keywords from an OpenAI-style body, for choice ``j`` (a seed
    gives distinct, reproducible choices when n > 1)."""
    seed = body.seed
    if seed is not None and j:
        seed = (seed + j) % 2**63
    top_k = body.top_k if body.top_k and body.top_k > 0 else 0
    temperature = 1.0 if body.temperature is None else body.temperature
    opts = dict(
        # as vLLM: below 1e-5 is greedy (logits / 1e-300 overflow to inf, and sampling would fail)
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        # a top_p that rounds to 0 in float32 would drop every token (the sampler keeps none)
        top_p=1.0 if body.top_p is None else max(body.top_p, GREEDY_BELOW),
        top_k=top_k, seed=seed, ignore_eos=body.ignore_eos, speculate=getattr(body, "speculate", True),
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
    )
    for k in ("min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
        v = getattr(body, k, None)
        if v is not None:
            opts[k] = v
    return opts
