"""Run a command inside a memory cgroup, with the model's files evicted from the page cache first.

A cgroup v1 charges a cached page to whoever read it first: a limit test whose model files are
still cached from the conversion (or from an earlier run) reads them for free, outside its limit,
and proves nothing. So every run here first evicts the files (``posix_fadvise(DONTNEED)``), checks
with ``mincore`` that none of their pages is cached any more, and reports how many bytes the child
really read from disk (``/proc/<pid>/io`` ``read_bytes``, read by the child itself) so the caller
can assert the run read from disk.

Needs root and the cgroup v1 memory controller (or v2 with the memory controller enabled).

    python tools/memlimit.py --limit 1.5GB --evict MODEL -- python -m layerrun generate MODEL "hi"
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import mmap
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def cgroup_kind() -> str | None:
    """'v1' or 'v2' where this process may make memory cgroups (root), else None."""
    if os.geteuid() != 0:
        return None
    if (V1_ROOT / "cgroup.procs").exists() and (V1_ROOT / "memory.limit_in_bytes").exists():
        return "v1"
    ctl = V2_ROOT / "cgroup.subtree_control"
    if ctl.exists() and "memory" in ctl.read_text().split():
        return "v2"
    return None


def files_of(paths) -> list[Path]:
    out = []
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        p = Path(p)
        out.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return out


def cached_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache now: mincore over a read-only mapping (touches no page)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path} failed")
    finally:
        os.close(fd)
    try:
        n = (size + page - 1) // page
        vec = (ctypes.c_ubyte * n)()
        if _libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
            raise OSError(ctypes.get_errno(), f"mincore {path} failed")
        return page * sum(v & 1 for v in vec)
    finally:
        _libc.munmap(ctypes.c_void_p(addr), size)


def evict(paths) -> int:
    """Drop ``paths`` (files, or folders: every file in them) from the page cache; return the bytes
    still cached afterwards (0 unless another process maps them)."""
    left = 0
    for f in files_of(paths):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a file just written) are not dropped: write them out first
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        left += cached_bytes(f)
    return left


@dataclass
class Limited:
    returncode: int
    stdout: str
    stderr: str
    max_usage: int  # the cgroup's peak charge (anonymous memory and page cache)
    oom_killed: bool

    @property
    def refused(self) -> bool:
        return self.returncode == 1 and "error:" in self.stderr


def run_limited(cmd: list[str], limit: int, timeout: float = 1800, env: dict | None = None, cwd=None) -> Limited:
    """Run ``cmd`` in a fresh memory cgroup of ``limit`` bytes (no swap); the cgroup is removed after."""
    kind = cgroup_kind()
    if kind is None:
        raise RuntimeError("needs root and a cgroup memory controller")
    root = V1_ROOT if kind == "v1" else V2_ROOT
    cg = root / f"layerrun-limit-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    try:
        if kind == "v1":
            (cg / "memory.limit_in_bytes").write_text(str(limit))
            try:
                (cg / "memory.memsw.limit_in_bytes").write_text(str(limit))  # no swapping around the limit
            except OSError:
                pass
        else:
            (cg / "memory.max").write_text(str(limit))
            try:
                (cg / "memory.swap.max").write_text("0")
            except OSError:
                pass
        script = f'echo $$ > "{cg}/cgroup.procs" && exec "$@"'
        p = subprocess.run(["sh", "-c", script, "sh", *map(str, cmd)], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=cwd)
        if kind == "v1":
            peak = int((cg / "memory.max_usage_in_bytes").read_text())
            oom = "oom_kill 1" in (cg / "memory.oom_control").read_text() or p.returncode == -9
        else:
            peak_file = cg / "memory.peak"
            peak = int(peak_file.read_text()) if peak_file.exists() else 0
            events = (cg / "memory.events").read_text()
            oom = any(line.startswith("oom_kill ") and line.split()[1] != "0" for line in events.splitlines())
        oom = oom or p.returncode in (-9, 137)
        return Limited(p.returncode, p.stdout, p.stderr, peak, oom)
    finally:
        for _ in range(100):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def read_bytes_line() -> str:
    """For a child to print at its end: its own bytes read from storage (all threads)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return line.split()[1]
    return "0"


def parse_size(s: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = s.strip().upper()
    num = s.rstrip("KMGIB")
    return int(float(num) * units[s[len(num):]])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", required=True, help="memory limit, e.g. 1.5GB or 800MiB")
    ap.add_argument("--evict", action="append", default=[], help="file or folder to drop from the page cache first")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command ...")
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    for p in a.evict:
        left = evict(p)
        print(f"evicted {p}: {left} bytes still cached", file=sys.stderr)
    r = run_limited(cmd, parse_size(a.limit))
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    print(f"rc={r.returncode} peak cgroup charge {r.max_usage / 2**20:.1f} MiB oom_killed={r.oom_killed}",
          file=sys.stderr)
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
