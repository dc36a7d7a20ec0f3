"""The one thread that runs the engine for the server.

The engine is not thread-safe, so a single worker thread owns a
:class:`~layerrun.engine.batch.BatchGenerator` and runs its step loop
(continuous batching: requests join and leave at step boundaries). The event
loop talks to it through a thread-safe inbox (submit, cancel, stop), and the
worker hands each step's results back with one ``loop.call_soon_threadsafe``
per step, into one ``asyncio.Queue`` per HTTP request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from layerrun.errors import FileChangedError, LayerRunError
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


@dataclass(eq=False)
class Ticket:
    """One sequence asked for by an HTTP request (a request with n prompts x choices has several)."""

    prompt_ids: list[int]
    options: dict  # BatchGenerator.request keyword arguments
    queue: asyncio.Queue  # (index, Output), shared by the HTTP request's tickets
    index: int = 0
    t_submit: float = field(default_factory=time.perf_counter)
    # worker side
    req: object | None = None
    t_last: float | None = None
    finished: bool = False
    # event-loop side
    released: bool = False


class Worker:
    def __init__(self, engine, batch_size: int, max_waiting: int, metrics: ServerMetrics):
        self.engine = engine
        self.batch_size = batch_size
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.bg = engine.batch_generator(batch_size)
        self.active = 0  # tickets submitted and not yet finished or cancelled (event-loop side only)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._tickets: dict[int, Ticket] = {}  # Request.id -> ticket (worker side only)
        self._pending = 0  # submissions not yet handed to the batch generator (both threads: under _pending_lock)
        self._pending_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- event-loop side ----------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="layerrun-server-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self._inbox.put(("stop", None))
        self._thread.join(timeout)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def room(self) -> int:
        """How many more sequences may be queued before requests are refused (429)."""
        return self.batch_size + self.max_waiting - self.active

    def submit(self, tickets: list[Ticket]) -> None:
        self.active += len(tickets)
        with self._pending_lock:
            self._pending += len(tickets)
        for t in tickets:
            self._inbox.put(("submit", t))

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: free the sequence's place (it leaves the batch at the next step)."""
        if ticket.released:
            return
        self._release(ticket)
        self._inbox.put(("cancel", ticket))

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

    # ---- worker thread --------------------------------------------------------
    def _send(self, items: list[tuple[Ticket, Output]]) -> None:
        if not items:
            return
        try:
            self._loop.call_soon_threadsafe(self._deliver, items)
        except RuntimeError:  # the loop has closed: the server is gone
            pass

    def _run(self) -> None:
        while True:
            try:
                msgs = [self._inbox.get()] if not self.bg.busy else []
                while True:
                    try:
                        msgs.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                if any(kind == "stop" for kind, _ in msgs):
                    self._shutdown(msgs)
                    return
                for kind, t in msgs:
                    if kind == "submit":
                        with self._pending_lock:
                            self._pending -= 1
                        self._admit(t)
                    elif kind == "cancel":
                        self._cancel(t)
                if self.bg.busy:
                    self._step()
                self._gauges()
            except FileChangedError as e:  # a model file changed on disk mid-step: these sequences cannot go on
                log.error("layerrun server: %s", e)
                self._fail_all(str(e), code="model_file_changed")
            except Exception:  # a bug: keep serving, and say what happened
                log.exception("layerrun server worker: unexpected error")
                self._fail_all("internal error in the engine worker (see the server log)")

    def _admit(self, t: Ticket) -> None:
        try:
            t.req = self.bg.request(t.prompt_ids, **t.options)
        except LayerRunError as e:  # the HTTP side checks first; this is a safety net
            t.finished = True
            self._send([(t, Output(error=str(e), error_status=400))])
            return
        self._tickets[t.req.id] = t

    def _cancel(self, t: Ticket) -> None:
        if t.finished or t.req is None:
            return
        t.finished = True
        self.bg.cancel(t.req)
        self._tickets.pop(t.req.id, None)
        self.metrics.finished.inc(finish_reason="cancelled")

    def _step(self) -> None:
        m = self.metrics
        with self.engine._lock:
            t0 = time.perf_counter()
            events = self.bg.step()
            dt = time.perf_counter() - t0
        if not events:
            return
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
        items = []
        for ev in events:
            r = ev.request
            t = self._tickets.get(r.id)
            if t is None or t.finished:
                continue
            if t.t_last is None:
                m.ttft.observe(now - t.t_submit)
                m.prompt_tokens.inc(len(r.prompt_ids))
            else:
                m.itl.observe(now - t.t_last)
            t.t_last = now
            out = Output(ev.text, ev.token_id, ev.finish_reason)
            if ev.finish_reason:
                t.finished = True
                del self._tickets[r.id]
                m.finished.inc(finish_reason=ev.finish_reason)
                out.prompt_tokens = len(r.prompt_ids)
                out.completion_tokens = r.stats.generated_tokens
            items.append((t, out))
        self._send(items)

    def _gauges(self) -> None:
        self.metrics.running.set(sum(1 for r in self.bg.rows if not r.done and not r.cancelled))
        self.metrics.waiting.set(sum(1 for r in self.bg.waiting if not r.cancelled) + self._pending)

    def _shutdown(self, msgs: list) -> None:
        message = "the server is shutting down"
        self._send([(t, Output(error=message)) for kind, t in msgs if kind == "submit"])
        self._fail_all(message)

    def _fail_all(self, message: str, code: str | None = None) -> None:
        """Finish every sequence with an error and start over with an empty batch."""
        items = []
        for t in self._tickets.values():
            t.finished = True
            items.append((t, Output(error=message, error_code=code)))
            self.metrics.finished.inc(finish_reason="error")
        self._tickets.clear()
        self._send(items)
        self.bg = self.engine.batch_generator(self.batch_size)
