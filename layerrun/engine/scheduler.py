"""One thread that runs an engine's continuous batching for many callers.

The engine is not thread-safe, so a single thread owns a
:class:`~layerrun.engine.batch.BatchGenerator` and steps it while any sequence
is live; callers on other threads (or event loops) hand it :class:`Job` objects
through a thread-safe inbox (submit, cancel, stop) and get each step's events
back through the job's ``deliver`` callable. Sequences join and leave at step
boundaries, so concurrent callers share every layer load.

Used by ``Engine.astream`` / ``agenerate`` (the async API) and, through a
subclass, by the server's worker (``layerrun.server.worker``), which adds
metrics and hands a step's results to its event loop in one call.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from layerrun.errors import FileChangedError, FormatError, LayerRunError

log = logging.getLogger("layerrun.engine")


class Failure(str):
    """Why a sequence failed (what ``deliver`` gets instead of an event), with the OpenAI-style ``code``
    and the HTTP status a server answers it with."""

    code: str | None = None
    status: int = 500

    @classmethod
    def of(cls, message: str, code: str | None = None, status: int = 500) -> Failure:
        f = cls(message)
        f.code, f.status = code, status
        return f


@dataclass(eq=False)
class Job:
    """One sequence to generate: ``BatchGenerator.request`` arguments, and where its events go.

    ``deliver(item)`` runs on the scheduler's thread with an
    :class:`~layerrun.engine.batch.Event` or, if the sequence failed, a string saying why.
    """

    prompt: object
    options: dict
    deliver: Callable | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    req: object | None = None  # the BatchGenerator request, once admitted
    finished: bool = False


class Scheduler:
    auto_start = True  # the first submit starts the thread (the server's worker starts with its app instead)
    stop_message = "the engine's scheduler is shutting down"

    def __init__(self, engine, batch_size: int):
        self.engine = engine
        self.batch_size = batch_size
        self.bg = engine.batch_generator(batch_size)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: dict[int, Job] = {}  # Request.id -> job (scheduler thread only)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.steps = 0

    # ---- any thread ---------------------------------------------------------------------
    def start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="layerrun-scheduler", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._start_lock:
            if self._thread is None:
                return
            self._inbox.put(("stop", None))
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, jobs: list[Job]) -> None:
        if self.auto_start:
            self.start()
        for j in jobs:
            self._inbox.put(("submit", j))

    def cancel(self, job: Job) -> None:
        """Stop a job's sequence: it leaves the batch at the next step."""
        self._inbox.put(("cancel", job))

    # ---- the scheduler thread -------------------------------------------------------------
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
                for kind, j in msgs:
                    if kind == "submit":
                        self._on_submit(j)
                    elif kind == "cancel":
                        self._cancel(j)
                if self.bg.busy:
                    self._step()
                self._idle()
            except FileChangedError as e:  # a model file changed on disk mid-step: these sequences cannot go on
                log.error("layerrun: %s", e)
                self._fail_all(Failure.of(str(e), "model_file_changed"))
            except FormatError as e:  # a damaged model file found mid-step (first use): it names the file
                log.error("layerrun: %s", e)
                self._fail_all(Failure.of(str(e), "model_file_error"))
            except Exception:  # a bug: keep serving, and say what happened
                log.exception("layerrun scheduler: unexpected error")
                self._fail_all("internal error in the engine's scheduler (see the log)")

    def _on_submit(self, j: Job) -> None:
        self._admit(j)

    def _admit(self, j: Job) -> None:
        try:
            j.req = self.bg.request(j.prompt, **j.options)
        except (LayerRunError, ValueError, RuntimeError) as e:  # bad input: only this job fails
            j.finished = True
            self._emit([(j, Failure.of(str(e), status=400))])
            return
        self._jobs[j.req.id] = j

    def _cancel(self, j: Job) -> None:
        if j.finished or j.req is None:
            return
        j.finished = True
        self.bg.cancel(j.req)
        self._jobs.pop(j.req.id, None)
        self._on_cancel(j)

    def _step(self) -> None:
        with self.engine._lock:  # a synchronous generate() on the same engine waits for the step, and vice versa
            t0 = time.perf_counter()
            events = self.bg.step()
            dt = time.perf_counter() - t0
        if not events:
            return
        self.steps += 1
        items = []
        for ev in events:
            j = self._jobs.get(ev.request.id)
            if j is None or j.finished:
                continue
            if ev.finish_reason:
                j.finished = True
                del self._jobs[ev.request.id]
            items.append((j, ev))
        self._on_step(events, dt, items)
        self._emit(items)

    def _shutdown(self, msgs: list) -> None:
        message = self.stop_message
        self._emit([(j, message) for kind, j in msgs if kind == "submit"])
        self._fail_all(message)

    def _fail_all(self, message: str) -> None:
        """Finish every sequence with an error and start over with an empty batch."""
        items = []
        for j in self._jobs.values():
            j.finished = True
            items.append((j, message))
        self._jobs.clear()
        self._on_fail(len(items))
        self._emit(items)
        self.bg = self.engine.batch_generator(self.batch_size)

    # ---- hooks (the server's worker overrides them) -------------------------------------------
    def _emit(self, items: list[tuple[Job, object]]) -> None:
        for j, item in items:
            if j.deliver is not None:
                j.deliver(item)

    def _on_step(self, events: list, dt: float, items: list) -> None:
        pass

    def _on_cancel(self, j: Job) -> None:
        pass

    def _on_fail(self, n: int) -> None:
        pass

    def _idle(self) -> None:
        pass
