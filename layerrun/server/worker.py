"""The one thread that runs the engine for the server.

The engine is not thread-safe, so a single worker thread owns a
:class:`~layerrun.engine.batch.BatchGenerator` and runs its step loop
(continuous batching: requests join and leave at step boundaries): the engine's
:class:`~layerrun.engine.scheduler.Scheduler`, which the async Python API uses
too. The event loop talks to it through a thread-safe inbox (submit, cancel,
stop), and the worker hands each step's results back with one
``loop.call_soon_threadsafe`` per step, into one ``asyncio.Queue`` per HTTP request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

from layerrun.engine.scheduler import Job, Scheduler
from layerrun.server.metrics import ServerMetrics

DEFAULT_MAX_WAITING = 64  # sequences queued beyond the batch before requests get 429
log = logging.getLogger("layerrun.server")


@dataclass
class Output:
    """What one step produced for one choice, as the HTTP side sees it."""

    text: str = ""
    token_id: int | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # the sequence failed (engine error, shutdown)
    error_code: str | None = None  # OpenAI-style ``code`` of that error (e.g. model_file_changed)
    error_status: int = 500  # the HTTP status it is answered with (400: the request itself)
    logprob: float | None = None  # when the request asked for logprobs
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass(eq=False)
class Ticket(Job):
    """One sequence asked for by an HTTP request (a request with n prompts x choices has several).
    ``prompt`` holds its token ids; ``options`` the ``BatchGenerator.request`` keywords."""

    queue: asyncio.Queue | None = None  # (index, Output), shared by the HTTP request's tickets
    index: int = 0
    # worker side
    t_last: float | None = None
    # event-loop side
    released: bool = False


class Worker(Scheduler):
    """The engine's :class:`~layerrun.engine.scheduler.Scheduler`, for the HTTP side: it counts
    sequences for 429s, records metrics at each step, and hands a step's outputs to the event loop
    in one ``call_soon_threadsafe``."""

    auto_start = False  # the app's lifespan starts it; after stop, requests get 503
    stop_message = "the server is shutting down"

    def __init__(self, engine, batch_size: int, max_waiting: int, metrics: ServerMetrics):
        super().__init__(engine, batch_size)
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.active = 0  # tickets submitted and not yet finished or cancelled (event-loop side only)
        self._pending = 0  # submissions not yet handed to the batch generator (both threads: under _pending_lock)
        self._pending_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- event-loop side ----------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if loop is not None:
            self._loop = loop
        super().start()

    def room(self) -> int:
        """How many more sequences may be queued before requests are refused (429)."""
        return self.batch_size + self.max_waiting - self.active

    def submit(self, tickets: list[Ticket]) -> None:
        self.active += len(tickets)
        with self._pending_lock:
            self._pending += len(tickets)
        super().submit(tickets)

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: free the sequence's place (it leaves the batch at the next step)."""
        if ticket.released:
            return
        self._release(ticket)
        super().cancel(ticket)

    def _release(self, ticket: Ticket) -> None:
        ticket.released = True
        self.active -= 1

    def _deliver(self, items: list[tuple[Ticket, Output]]) -> None:
        for t, out in items:
            if t.released:  # cancelled meanwhile: nobody is listening
                continue
            if out.finish_reason or out.error:
                self._release(t)
            t.queue.put_nowait((t.index, out))

    # ---- worker thread (the scheduler's hooks) --------------------------------------------------
    def _emit(self, items: list) -> None:
        outs = []
        for t, item in items:
            if isinstance(item, str):
                outs.append((t, Output(error=item, error_code=getattr(item, "code", None),
                                       error_status=getattr(item, "status", 500))))
                continue
            ev = item
            out = Output(ev.text, ev.token_id, ev.finish_reason, logprob=ev.logprob, top_logprobs=ev.top_logprobs)
            if ev.finish_reason:
                out.prompt_tokens = len(ev.request.prompt_ids)
                out.completion_tokens = ev.request.stats.generated_tokens
            outs.append((t, out))
        if not outs:
            return
        try:
            self._loop.call_soon_threadsafe(self._deliver, outs)
        except RuntimeError:  # the loop has closed: the server is gone
            pass

    def _on_submit(self, t: Ticket) -> None:
        with self._pending_lock:
            self._pending -= 1
        self._admit(t)

    def _on_cancel(self, t: Ticket) -> None:
        self.metrics.finished.inc(finish_reason="cancelled")

    def _on_fail(self, n: int) -> None:
        for _ in range(n):
            self.metrics.finished.inc(finish_reason="error")

    def _on_step(self, events: list, dt: float, items: list) -> None:
        m = self.metrics
        now = time.perf_counter()
        st = self.bg.last_stats
        m.steps.inc()
        m.step.observe(dt)
        m.batch.observe(len(events))
        if st is not None:
            m.bytes_read.inc(st.bytes_read)
            m.stall.inc(st.stall_s)
            m.expert_bytes_skipped.inc(st.expert_bytes_skipped)
        m.generation_tokens.inc(len(events))
        for t, ev in items:
            if t.t_last is None:
                m.ttft.observe(now - t.t_submit)
                m.queue_time.observe(max(0.0, ev.request._joined_at - t.t_submit))
                m.prompt_tokens.inc(len(ev.request.prompt_ids))
            else:
                m.itl.observe(now - t.t_last)
            t.t_last = now
            if ev.finish_reason:
                m.finished.inc(finish_reason=ev.finish_reason)
                m.e2e.observe(now - t.t_submit)

    def _idle(self) -> None:
        self.metrics.running.set(sum(1 for r in self.bg.rows if not r.done and not r.cancelled))
        self.metrics.waiting.set(sum(1 for r in self.bg.waiting if not r.cancelled) + self._pending)
        self.metrics.observe_kv(self.bg)
