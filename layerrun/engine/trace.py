"""A Chrome/Perfetto trace of the pipeline: reads, copies, stalls and compute per layer.

Open the JSON written by ``--trace FILE`` at ui.perfetto.dev or chrome://tracing.
Tracks: "compute" (each layer's compute, and the stall before it when compute
waited for a read), "load" (resident layers read once at start), and one
"io slot N" track per staging-ring slot. Reads run ``depth`` at a time, so on a
single io track they would overlap without nesting, which Perfetto cannot draw
(it drops or mis-stacks such slices); a slot holds one layer at a time, so the
reads (and CUDA copies) into one slot never overlap and each slot's track is a
clean sequence.

Recording is off by default. ``--trace`` keeps every event (up to
:data:`MAX_EVENTS`); :meth:`TraceRecorder.keep_recent` keeps only the last N
in a ring, which is what the server's live page reads, so a server's memory
stays flat however long it runs.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from pathlib import Path

MAX_EVENTS = 2_000_000  # a cap so a long session cannot grow without bound
TID_COMPUTE, TID_LOAD, TID_SLOT0 = 1, 2, 10


class TraceRecorder:
    """Records pipeline events when enabled (``--trace``) and/or into a bounded ring of recent events."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self.origin = time.perf_counter()
        self.events: list[dict] = []
        self.recent: deque | None = None  # (seq, kind, layer, slot, t0, t1, bytes) for live views
        self._seq = itertools.count(1)
        self._slots: set[int] = set()
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.enabled or self.recent is not None

    def keep_recent(self, n: int) -> None:
        """Keep the last ``n`` events in :attr:`recent` (the server's live view), even without ``--trace``."""
        with self._lock:
            self.recent = deque(self.recent or (), maxlen=n)

    def since(self, seq: int) -> list[tuple]:
        """Recent events with a sequence number above ``seq`` (oldest first)."""
        with self._lock:
            return [e for e in self.recent or () if e[0] > seq]

    def _add(self, kind: str, name: str, tid: int, layer: int, t0: float, t1: float, args: dict | None = None,
             slot: int | None = None, nbytes: int = 0) -> None:
        with self._lock:
            if self.recent is not None:
                self.recent.append((next(self._seq), kind, layer, slot, t0 - self.origin, t1 - self.origin, nbytes))
            if not self.enabled or len(self.events) >= MAX_EVENTS:
                return
            if slot is not None:
                self._slots.add(slot)
            # Both ends rounded the same way, so slices that touch or follow each other still do after rounding.
            ts, end = round((t0 - self.origin) * 1e6, 1), round((t1 - self.origin) * 1e6, 1)
            ev = {"name": name, "cat": kind, "ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": round(max(end - ts, 0), 1)}
            if args:
                ev["args"] = args
            self.events.append(ev)

    # The engine calls these per layer; when recording is off they return before building any event.
    def read(self, layer: int, name: str, t0: float, t1: float, nbytes: int, resident: bool = False,
             slot: int | None = None) -> None:
        """A read: into ring slot ``slot`` (streamed layers), or of a resident file at load time."""
        if not self.active:
            return
        tid = TID_LOAD if resident or slot is None else TID_SLOT0 + slot
        self._add("read", f"read {name}", tid, layer, t0, t1,
                  {"layer": layer, "bytes": nbytes, "resident": resident, "slot": slot,
                   "GB/s": round(nbytes / max(t1 - t0, 1e-9) / 1e9, 3)}, slot, nbytes)

    def copy(self, layer: int, t0: float, t1: float, nbytes: int, slot: int) -> None:
        """A host -> device copy of a staged layer (CUDA), on its slot's track after the read."""
        if not self.active:
            return
        self._add("copy", f"copy layer {layer}", TID_SLOT0 + slot, layer, t0, t1, {"layer": layer, "bytes": nbytes},
                  slot, nbytes)

    def compute(self, layer: int, t0: float, t1: float) -> None:
        if not self.active:
            return
        self._add("compute", f"layer {layer}", TID_COMPUTE, layer, t0, t1, {"layer": layer})

    def stall(self, layer: int, t0: float, t1: float) -> None:
        if not self.active:
            return
        self._add("stall", f"stall before layer {layer}", TID_COMPUTE, layer, t0, t1, {"layer": layer})

    def write(self, path: str | Path) -> None:
        with self._lock:
            events = list(self.events)
            slots = sorted(self._slots)
        meta = [
            {"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "layerrun"}},
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": TID_COMPUTE, "args": {"name": "compute"}},
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": TID_LOAD, "args": {"name": "load (resident)"}},
        ]
        for s in slots:
            meta.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": TID_SLOT0 + s, "args": {"name": f"io slot {s}"}})
        order = [TID_COMPUTE, TID_LOAD] + [TID_SLOT0 + s for s in slots]
        meta += [{"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": t, "args": {"sort_index": i}}
                 for i, t in enumerate(order)]
        Path(path).write_text(json.dumps({"traceEvents": meta + events, "displayTimeUnit": "ms"}))
