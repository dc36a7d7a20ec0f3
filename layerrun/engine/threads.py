"""How many threads torch computes with (``--threads`` / ``threads=``).

torch's intra-op pool is OpenMP: every parallel op ends at a barrier where each thread waits for
the others. Decode is thousands of small ops per token, so when another process holds one of the
cores, the op's other half waits for that thread to be scheduled again, once per op. With two
threads on two busy cores this made decode 2-10x slower than one thread (bench/RESULTS.md,
"Threads"). The setting is process-wide (torch has one pool).
"""

from __future__ import annotations

import os

import torch

from layerrun.errors import LayerRunError


def usable_cores() -> int:
    """Physical cores this process may run on (its affinity mask, at most the physical cores: SMT
    siblings share one core's vector units; a cgroup CPU quota rounds down)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        import psutil

        n = min(n, psutil.cpu_count(logical=False) or n)
    except ImportError:
        pass
    quota = _cgroup_cpu_quota()
    if quota is not None:
        n = max(1, min(n, int(quota)))
    return max(1, n)


def _cgroup_cpu_quota() -> float | None:
    try:
        text = open("/sys/fs/cgroup/cpu.max").read().split()
    except OSError:
        return None
    if len(text) == 2 and text[0] != "max":
        try:
            return int(text[0]) / int(text[1])
        except (ValueError, ZeroDivisionError):
            return None
    return None


def default_threads() -> int:
    """The default: one thread per usable core, less one for the rest of the machine, at least one.

    On 2 cores that is 1 (see the module note and bench/RESULTS.md for the numbers behind it).
    """
    return max(1, usable_cores() - 1)


def parse_threads(threads: int | str | None) -> int | None:
    """``threads`` as a count; None for "auto" / None."""
    if threads is None or threads == "auto":
        return None
    try:
        n = int(threads)
    except (TypeError, ValueError):
        raise LayerRunError(f"--threads must be a positive number or 'auto', got {threads!r}") from None
    if n < 1:
        raise LayerRunError(f"--threads must be >= 1, got {n}")
    return n


def apply_threads(threads: int | str | None, device: torch.device) -> int:
    """Set torch's thread count for this process; returns it. "auto" / None: :func:`default_threads`
    (on CPU; with a GPU computing, the host threads only feed it, and the same default serves)."""
    n = parse_threads(threads)
    if n is None:
        n = default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
