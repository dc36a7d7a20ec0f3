"""A bandwidth limiter that makes any disk behave like a slow SSD (``--throttle 200MB/s``).

Reads reserve their transfer time on a shared timeline: a read of ``n`` bytes
may finish no earlier than ``n / rate`` after the previous reservation ends, so
concurrent readers share the bandwidth as they would on one device.
"""

from __future__ import annotations

import re
import threading
import time

from layerrun.errors import LayerRunError

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "tb": 1e12}


def parse_size(text: str | int | float, flag: str = "size") -> int:
    """``1.5GiB``, ``800MB``, ``200MB/s`` (the ``/s`` is ignored), or a number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*(/s)?\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise LayerRunError(f"{flag}: cannot read {text!r} as a size (examples: 1.5GiB, 800MB, 200MB/s)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class Throttle:
    def __init__(self, bytes_per_s: float):
        if bytes_per_s <= 0:
            raise LayerRunError("--throttle must be positive")
        self.rate = float(bytes_per_s)
        self._lock = threading.Lock()
        self._next = 0.0

    def wait(self, nbytes: int, started: float) -> None:
        """Call after reading ``nbytes`` (begun at ``started``): sleeps until the throttled finish time."""
        with self._lock:
            begin = max(self._next, started)
            self._next = begin + nbytes / self.rate
            finish = self._next
        delay = finish - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
