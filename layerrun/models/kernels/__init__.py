"""The compiled matrix-vector kernel (``matvec.c``): built on first use, cached, checked, or absent.

Decode multiplies every weight by one row (or a few: a speculative tree), and what counts is how fast
the weight streams from memory. torch's kernels reach ~20 GB/s (oneDNN, float32) and ~17 GB/s
(oneDNN on a packed bfloat16 weight, ~11 on a plain one) on one core here; ``matvec.c`` reads the
plain row-major weight faster (bench/RESULTS.md, "A compiled matrix-vector kernel"), so streamed
weights, which cannot be packed, gain as much as resident ones.

It is plain C with AVX2 / AVX-512 intrinsics (no torch headers; ~1 s to compile), built with the
system C compiler (``$CC``, else ``cc`` / ``gcc`` / ``clang``) and ``-march=native`` into
``$LAYERRUN_HOME/kernels`` (default ``~/.cache/layerrun/kernels``). The file name holds a hash of the
source, the compiler and its version, the flags and the CPU's feature flags (so a cache shared by
two machines never hands one the other's build) and a hash of the built library itself, checked
before every load: a truncated or damaged file is rebuilt, never loaded. A build goes to a private
temporary folder in the cache and is renamed into place, so two processes building at once both end
with a whole file. The library is loaded with ctypes (calls release the GIL) and checked against
``F.linear`` once. Any failure (no compiler, a CPU without AVX2 and FMA, a compile error, an
unwritable cache, a failed check) is one log line, and the callers use torch's kernels.
``LAYERRUN_KERNEL=off`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("layerrun.kernel")

SOURCE = Path(__file__).with_name("matvec.c")
NATIVE = ("-O3", "-march=native")
AVX2 = ("-O3", "-mavx2", "-mfma", "-mno-avx512f")  # what the target users' CPUs have; tests build it too
COMMON = ("-shared", "-fPIC", "-std=c11", "-fno-strict-aliasing")
COMPILE_TIMEOUT_S = 120
OFF = ("off", "0", "no", "false")


class KernelUnavailable(Exception):
    """Why the compiled kernel cannot be used here (one line)."""


class Kernel:
    """The loaded library: ``linear(x, w, bias)`` for float32 and bfloat16, any number of rows."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        self._fn = {}
        for dtype, name in ((torch.float32, "lr_linear_f32"), (torch.bfloat16, "lr_linear_bf16")):
            fn = getattr(lib, name)
            fn.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64]
            fn.restype = ctypes.c_int
            self._fn[dtype] = fn
        lib.lr_isa.restype = ctypes.c_char_p
        self.isa: str = lib.lr_isa().decode()
        self.path = path
        self._lib = lib

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear(x, w, bias)`` for CPU tensors of one dtype (float32 or bfloat16); ``w`` (N, K) with
        unit stride along K, ``bias`` contiguous (N,) or None; ``x`` (..., K), any strides."""
        K, N = x.shape[-1], w.shape[0]
        if w.shape[1] != K or w.stride(1) != 1 or w.dtype != x.dtype or x.device.type != "cpu":
            raise ValueError(f"matvec: x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype} stride {w.stride()}")
        if bias is not None and (bias.shape != (N,) or bias.dtype != x.dtype or not bias.is_contiguous()):
            raise ValueError(f"matvec: bias {tuple(bias.shape)} {bias.dtype} for {N} outputs")
        if K == 0:  # nothing to sum: the bias, or zeros
            y = torch.zeros(*x.shape[:-1], N, dtype=x.dtype)
            return y if bias is None else y + bias
        x2 = x.reshape(-1, K)  # a view where the leading dims allow it
        if K > 1 and x2.stride(1) != 1:
            x2 = x2.contiguous()
        y = torch.empty(*x.shape[:-1], N, dtype=x.dtype)
        rows = x2.shape[0]
        if rows and N:
            rc = self._fn[x.dtype](x2.data_ptr(), x2.stride(0), w.data_ptr(), w.stride(0),
                                   None if bias is None else bias.data_ptr(), y.data_ptr(), rows, N, K)
            if rc:
                raise MemoryError("matvec: scratch memory for the input rows was refused")
        return y


def cache_dir() -> Path:
    """``$LAYERRUN_HOME/kernels`` (default ``~/.cache/layerrun/kernels``)."""
    home = os.environ.get("LAYERRUN_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "layerrun") / "kernels"


def compiler() -> list[str]:
    """The C compiler's command (``$CC`` split like a shell would, else the first of cc / gcc / clang)."""
    cc = os.environ.get("CC")
    if cc:
        return shlex.split(cc)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    raise KernelUnavailable("no C compiler found (set CC)")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor()


def _key(cc: list[str], flags: tuple[str, ...], source: bytes) -> str:
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"C compiler {shlex.join(cc)} does not run: {e}") from None
    h = hashlib.sha256()
    for part in (source, shlex.join(cc).encode(), version, " ".join(flags).encode(), platform.machine().encode(),
                 _cpu_flags().encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def _digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _digest(path: Path) -> str:
    return _digest_bytes(path.read_bytes())


def _cached(folder: Path, key: str) -> Path | None:
    """The cached build for ``key`` whose bytes match the hash in its name; damaged ones are removed."""
    for p in sorted(folder.glob(f"matvec-{key}-*.so")):
        try:
            if _digest(p) == p.stem.rsplit("-", 1)[1]:
                return p
        except OSError:
            pass
        log.info("compiled kernel %s is damaged: building it again", p)
        try:
            p.unlink()
        except OSError:
            pass
    return None


def _build(folder: Path, key: str, cc: list[str], flags: tuple[str, ...], source: bytes) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=folder))
    except OSError as e:
        raise KernelUnavailable(f"kernel cache {folder} is not writable ({e.strerror})") from None
    try:
        src, out = tmp / "matvec.c", tmp / "matvec.so"
        src.write_bytes(source)
        cmd = [*cc, *flags, *COMMON, "-o", str(out), str(src)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as e:
            raise KernelUnavailable(f"C compiler {shlex.join(cc)} does not run: {e}") from None
        if r.returncode != 0:
            first = next((ln for ln in r.stderr.splitlines() if "error" in ln), r.stderr.strip()[:200])
            raise KernelUnavailable(f"compiling {SOURCE.name} failed: {first.strip()}")
        final = folder / f"matvec-{key}-{_digest(out)}.so"
        os.replace(out, final)
        return final
    except OSError as e:
        raise KernelUnavailable(f"building in {folder} failed ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build(flags: tuple[str, ...] = NATIVE, folder: Path | None = None) -> Kernel:
    """The kernel built with ``flags`` (from the cache when it holds a whole build), loaded and checked;
    raises :class:`KernelUnavailable` with the reason."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise KernelUnavailable(f"the kernel needs an x86-64 CPU with AVX2 (this is {platform.machine()})")
    folder = folder or cache_dir()
    cc = compiler()
    try:
        source = SOURCE.read_bytes()
    except OSError as e:
        raise KernelUnavailable(f"{SOURCE} is missing ({e.strerror}): reinstall layerrun") from None
    key = _key(cc, flags, source)
    for attempt in range(2):
        path = _cached(folder, key) or _build(folder, key, cc, flags, source)
        try:
            k = Kernel(path)
            break
        except (OSError, AttributeError) as e:
            if attempt:
                raise KernelUnavailable(f"{path} does not load: {e}") from None
            try:
                path.unlink()
            except OSError:
                pass
    bad = self_check(k)
    if bad:
        raise KernelUnavailable(f"{path} disagrees with F.linear ({bad})")
    return k


def self_check(k: Kernel) -> str | None:
    """None when ``k`` equals ``F.linear`` (up to summation order; bfloat16 within one rounding) on odd
    shapes, row counts, strided input and bias; else what differed."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for n, kk, rows, bias in ((37, 75, 1, True), (5, 64, 3, False), (64, 130, 9, True), (1, 1, 2, True)):
            w = torch.randn(n, kk, generator=g).to(dtype)
            x = torch.randn(rows, 2 * kk, generator=g).to(dtype)
            x = x[:, ::2] if bias else x[:, :kk]  # strided elements; rows further apart than K
            b = torch.randn(n, generator=g).to(dtype) if bias else None
            ref = F.linear(x.double(), w.double(), None if b is None else b.double())
            got = k.linear(x, w, b).double()
            scale = F.linear(x.double().abs(), w.double().abs()) + (0 if b is None else b.double().abs())
            tol = 1e-5 * scale + 1e-6 if dtype == torch.float32 else 2 ** -7 * ref.abs() + 1e-5 * scale + 1e-6
            if not bool(((got - ref).abs() <= tol).all()):
                return f"{dtype}, {rows} rows of ({n}, {kk}): max error {(got - ref).abs().max().item():.3g}"
    return None


_LOCK = threading.Lock()  # the first use may come from several I/O threads at once: one build, one log line
_LOADED: dict[str, Kernel | None] = {}


def kernel() -> Kernel | None:
    """The native build for this process, or None (``LAYERRUN_KERNEL=off``, or it cannot be had: logged
    once). Decided once: call ``kernel.cache_clear()`` after changing the environment."""
    with _LOCK:
        if "native" not in _LOADED:
            _LOADED["native"] = _kernel()
        return _LOADED["native"]


kernel.cache_clear = _LOADED.clear  # type: ignore[attr-defined]


def _kernel() -> Kernel | None:
    if os.environ.get("LAYERRUN_KERNEL", "").strip().lower() in OFF:
        log.info("compiled matrix-vector kernel: off (LAYERRUN_KERNEL); using torch's kernels")
        return None
    try:
        k = build()
    except KernelUnavailable as e:
        log.info("compiled matrix-vector kernel unavailable, using torch's kernels: %s", e)
        return None
    log.debug("compiled matrix-vector kernel: %s (%s)", k.path, k.isa)
    return k
