"""A Chrome/Perfetto trace of the pipeline: reads, stalls and compute per layer.

Open the JSON written by ``--trace FILE`` at ui.perfetto.dev or chrome://tracing.
Reads appear on the "io" track, compute and stalls on the "compute" track, and with a draft
(speculative decoding) each step's drafting and each row's verification on the "speculation" track.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

MAX_EVENTS = 2_000_000  # a cap so a long session cannot grow without bound


class TraceRecorder:
    """Records pipeline events when enabled (``--trace``); off by default so a server's memory stays flat."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self.origin = time.perf_counter()
        self.events: list[dict] = []
        self._lock = threading.Lock()

    def _add(self, name: str, cat: str, tid: int, t0: float, t1: float, args: dict | None = None) -> None:
        if not self.enabled or len(self.events) >= MAX_EVENTS:
            return
        ev = {"name": name, "cat": cat, "ph": "X", "pid": 1, "tid": tid,
              "ts": round((t0 - self.origin) * 1e6, 1), "dur": round(max(t1 - t0, 0) * 1e6, 1)}
        if args:
            ev["args"] = args
        with self._lock:
            self.events.append(ev)

    # The engine calls these per layer; when tracing is off they return before building any event.
    def read(self, layer: int, name: str, t0: float, t1: float, nbytes: int, resident: bool = False) -> None:
        if not self.enabled:
            return
        self._add(f"read {name}", "io", 2, t0, t1, {"layer": layer, "bytes": nbytes, "resident": resident,
                                                    "GB/s": round(nbytes / max(t1 - t0, 1e-9) / 1e9, 3)})

    def compute(self, layer: int, t0: float, t1: float) -> None:
        if not self.enabled:
            return
        self._add(f"layer {layer}", "compute", 1, t0, t1, {"layer": layer})

    def stall(self, layer: int, t0: float, t1: float) -> None:
        if not self.enabled:
            return
        self._add(f"stall before layer {layer}", "stall", 1, t0, t1, {"layer": layer})

    def draft(self, t0: float, t1: float, args: dict) -> None:
        """A step's drafting (every round of every drafting row)."""
        if not self.enabled:
            return
        self._add("draft", "draft", 3, t0, t1, args)

    def verify(self, t0: float, t1: float, args: dict) -> None:
        """A row's tree verified by the target pass (the pass itself is on the compute track)."""
        if not self.enabled:
            return
        self._add(f"verify row {args.get('row', 0)}", "verify", 3, t0, t1, args)

    def write(self, path: str | Path) -> None:
        meta = [
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": "compute"}},
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": 2, "args": {"name": "io"}},
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": 3, "args": {"name": "speculation"}},
            {"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "layerrun"}},
        ]
        with self._lock:
            events = list(self.events)
        Path(path).write_text(json.dumps({"traceEvents": meta + events, "displayTimeUnit": "ms"}))
