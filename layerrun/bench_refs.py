"""What the benchmarks measure against and record: the machine (:func:`machine_info`), the disk's
own limits (``dd``, ``fio``), page-cache control, and the copy references (memcpy, pinned host ->
device). Used by ``layerrun bench io|generate`` (:mod:`layerrun.bench`) and the scripts in bench/."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

DD_BS = "16M"  # O_DIRECT reads: the pipeline's chunk size
DD_BS_CACHED = "1M"  # page-cache reads: dd is fastest with a cache-sized block


def machine_info() -> dict:
    """What a figure was measured on: CPU count, memory, the disk holding the model, versions."""
    import psutil
    import torch

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    try:  # CPU time stolen by the hypervisor so far (a VM's noisy neighbours), in clock ticks
        info["steal_ticks"] = int(open("/proc/stat").readline().split()[8])
    except (OSError, IndexError, ValueError):
        pass
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), None)
        info["cpu"] = cpu
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info



def _disk_of(path: Path) -> str | None:
    """The device and filesystem type holding ``path`` (from /proc/mounts), e.g. ``/dev/vda ext4``."""
    try:
        mounts = [ln.split() for ln in open("/proc/mounts")]
    except OSError:
        return None
    p = str(Path(path).resolve())
    best = None
    for m in mounts:
        if len(m) >= 3 and (p == m[1] or p.startswith(m[1].rstrip("/") + "/")):
            if best is None or len(m[1]) > len(best[1]):
                best = m
    return f"{best[0]} {best[2]} (mounted at {best[1]})" if best else None



def drop_page_cache(paths: Sequence[Path]) -> None:
    """Evict files from the page cache (posix_fadvise DONTNEED; clean pages only)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)



def warm_page_cache(paths: Sequence[Path]) -> None:
    """Read every file once so it sits in the page cache."""
    buf = bytearray(16 * 2**20)
    mv = memoryview(buf)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(mv):
                pass



_DD_RE = re.compile(r"(\d+) bytes .*copied, ([0-9.]+) s")



def dd_read(paths: Sequence[Path], direct: bool, bs: str | None = None) -> dict | None:
    """Read each file with ``dd`` (``iflag=direct`` when ``direct``): bytes, seconds (dd's own timing), GB/s.

    dd's own elapsed time is used (process start-up is not counted), which makes it
    the stricter reference. None when dd is not installed.
    """
    dd = shutil.which("dd")
    if dd is None:
        return None
    bs = bs or (DD_BS if direct else DD_BS_CACHED)
    total_b, total_s = 0, 0.0
    env = dict(os.environ, LC_ALL="C")
    for p in paths:
        cmd = [dd, f"if={p}", "of=/dev/null", f"bs={bs}"] + (["iflag=direct"] if direct else [])
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"dd exited {r.returncode}"}
        m = _DD_RE.search(r.stderr)
        if m:
            total_b += int(m.group(1))
            total_s += float(m.group(2))
        else:
            total_b += p.stat().st_size
            total_s += wall
    return {"tool": "dd", "command": f"dd if=FILE of=/dev/null bs={bs}" + (" iflag=direct" if direct else ""),
            "files": len(paths), "bytes": total_b, "seconds": round(total_s, 4),
            "gb_s": round(total_b / total_s / 1e9, 3) if total_s > 0 else 0.0}



def fio_read(paths: Sequence[Path], iodepth: int = 16, bs: str = DD_BS) -> dict | None:
    """Sequential O_DIRECT read of the files with fio (libaio, ``iodepth`` requests in flight). None without fio."""
    fio = shutil.which("fio")
    if fio is None:
        return None
    names = ":".join(str(p).replace(":", "\\:") for p in paths)
    cmd = [fio, "--name=layerrun-bench", f"--filename={names}", "--rw=read", "--direct=1", f"--bs={bs}",
           f"--iodepth={iodepth}", "--ioengine=libaio", "--size=100%", "--file_service_type=sequential",
           "--output-format=json"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout).strip().splitlines()[-1] if (r.stderr or r.stdout).strip() else "fio failed"}
    try:
        rd = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]["read"]
    except (ValueError, KeyError, IndexError):
        return {"error": "could not read fio's JSON output"}
    secs = rd["runtime"] / 1000
    shown = f"fio --rw=read --direct=1 --bs={bs} --iodepth={iodepth} --ioengine=libaio --filename=F1:F2:..."
    return {"tool": "fio", "command": shown, "files": len(paths), "bytes": rd["io_bytes"], "seconds": round(secs, 4),
            "gb_s": round(rd["bw_bytes"] / 1e9, 3)}



def _bracket(before: dict | None, after: dict | None) -> dict | None:
    """A reference measured just before and just after: the mean of the two rates (both kept)."""
    if not before or not after or "error" in before or "error" in after:
        return before or after
    return {**before, "bytes": before["bytes"] + after["bytes"], "seconds": round(before["seconds"] + after["seconds"], 4),
            "gb_s": round((before["gb_s"] + after["gb_s"]) / 2, 3), "before_gb_s": before["gb_s"],
            "after_gb_s": after["gb_s"]}


# ---- bench io -----------------------------------------------------------------------



def pinned_copy_gb_s(nbytes: int, tries: int = 5) -> float:
    """A plain pinned host -> device ``copy_`` of ``nbytes`` (best of ``tries``): the H2D reference."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(tries):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        best = max(best, nbytes / (a.elapsed_time(b) / 1e3) / 1e9)
    return round(best, 3)



def memcpy_gb_s(nbytes: int = 128 * 2**20, tries: int = 3) -> float:
    """Memory bandwidth as a copy between two large buffers (torch, all threads): the warm-read limit."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    best = 0.0
    for _ in range(tries):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    return round(best, 3)

