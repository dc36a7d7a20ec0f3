"""The prefetch pipeline: the next N layers load while the current one computes.

Layers are consumed in a fixed cyclic order (layer 0..L-1 of one forward pass,
then layer 0 of the next), so the pipeline treats them as one endless sequence
and keeps ``depth`` of them in flight ahead of compute. It owns a ring of
``depth + 1`` aligned host buffers (slots) allocated once: one for the layer
being computed, ``depth`` being filled. A slot is handed back by
:meth:`LayerStream.release` and immediately refilled with the next layer.

Each free slot is submitted straight to a pool of stage threads (at start, then
from ``release``), so a layer's hand-off wakes one thread and nothing runs on an
application's event loop; a layer larger than one chunk is read by several
``preadv`` calls in a second pool, so deep device queues stay busy. The compute
thread waits on plain ``concurrent.futures`` futures. With the mmap reader on
CPU there are no threads at all: staging (views and a read-ahead hint) runs
inline in the compute thread.

On CUDA, slots are pinned and each staged layer is copied to device buffers
with ``non_blocking`` copies on a dedicated stream; compute waits on the copy's
event, and the host slot returns to the ring once that event has completed.
On CPU there is no copy: tensors are views of the slot.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import mmap
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from layerrun.errors import FileChangedError, FormatError
from layerrun.formats.aligned import ALIGN
from layerrun.formats.integrity import Verifier
from layerrun.formats.manifest import FileEntry
from layerrun.io.guard import MappedFile, ModelFiles, Stamp
from layerrun.io.reader import aligned_empty, verify_buffer, views
from layerrun.io.throttle import Throttle

IO_CHUNK = 16 * 1024 * 1024  # bytes per preadv; a layer is split into several concurrent reads


@dataclass
class ReadRecord:
    layer: int
    bytes: int
    start: float
    end: float
    copy_s: float = 0.0


@dataclass
class StagedLayer:
    """A layer ready to compute: its weights (views of a ring slot, or of the device slot on CUDA)."""

    layer: int
    weights: dict[str, torch.Tensor]
    slot: int
    record: ReadRecord
    seq: int
    event: object | None = None  # CUDA event recorded after the host -> device copy (and the prepare step)
    entry: FileEntry | None = None
    partial: bool = False  # only the staging subset was read; the rest comes through LayerStream.fetch
    copy_start: object | None = None  # CUDA timing event recorded before the copy
    guard: MappedFile | None = None  # weights view this lease-guarded mapping: touched only while acquired


READS_KEPT = 4096  # the latest read records a pipeline keeps (a server's pipeline reads forever)


@dataclass
class PipelineStats:
    reads: deque[ReadRecord] | list[ReadRecord] = field(default_factory=lambda: deque(maxlen=READS_KEPT))
    stall_s: float = 0.0
    direct: bool = False
    notes: list[str] = field(default_factory=list)


class ChunkedReader:
    """Reads one layer file's data region into a slot with several concurrent preadv calls.

    Descriptors stay open between reads; before each read the file at the path is checked to be
    the one open and unchanged (``files``: see :mod:`layerrun.io.guard`), and after it, that it did
    not change while it was read."""

    def __init__(self, folder, backend: str, throttle: Throttle | None, pool: cf.ThreadPoolExecutor,
                 files: ModelFiles | None = None):
        self.folder = Path(folder)
        self.backend = backend
        self.throttle = throttle
        self.pool = pool
        self.files = files or ModelFiles(folder)
        self.note: str | None = None
        self._fds: dict[str, int] = {}
        self._stats: dict[str, os.stat_result] = {}
        self._lock = threading.Lock()

    def _fd(self, entry: FileEntry) -> tuple[int, Stamp]:
        with self._lock:
            fd = self._fds.get(entry.name)
            if fd is not None:
                st = self.files.same_file(entry, fd)
                if st is not None:
                    return fd, st
                os.close(self._fds.pop(entry.name))  # another file is at the path now: open and check it
            fd = None
            if self.backend == "direct" and hasattr(os, "O_DIRECT"):
                try:
                    fd = self.files.open(entry, direct=True)
                except FileChangedError:
                    raise
                except OSError as e:
                    self.note = f"O_DIRECT unavailable on this filesystem ({e.strerror}); fell back to pread"
                    self.backend = "pread"
            if fd is None:
                fd = self.files.open(entry)
            try:
                st = self.files.accept(entry, fd)
                self._stats[entry.name] = os.fstat(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fds[entry.name] = fd
            return fd, st

    def stat(self, entry: FileEntry) -> os.stat_result:
        """The fstat of the open file (taken when it was last checked): its identity for verification."""
        self._fd(entry)
        return self._stats[entry.name]

    def _read_range(self, fd: int, arr: memoryview, file_off: int, length: int, limit: int, entry: FileEntry) -> int:
        t0 = time.perf_counter()
        pos = 0
        while pos < limit:
            got = os.preadv(fd, [arr[pos:length]], file_off + pos)
            if got <= 0:
                raise self.files.changed_during_read(entry, f"it ends at byte {file_off + pos} (the manifest says "
                                                            f"{entry.bytes})")
            pos += got
        if self.throttle:
            self.throttle.wait(limit, t0)
        return pos

    def read(self, entry: FileEntry, buf: torch.Tensor, ranges=None, pool: cf.ThreadPoolExecutor | None = None) -> int:
        """Read the data region of ``entry`` into ``buf`` (blocking; chunks run in parallel in the pool).

        ``buf`` mirrors the file from its data start on; ``ranges`` (absolute ``(start, end)`` file
        offsets) reads only those parts, each to its own place in ``buf``. Returns bytes read.
        """
        fd, before = self._fd(entry)
        base = entry.data_start
        direct = self.backend == "direct"
        arr = memoryview(buf.numpy())
        pool = pool or self.pool
        jobs = []
        total = 0
        for start, end in ranges if ranges is not None else [(base, entry.bytes)]:
            if direct:
                start -= (start - base) % ALIGN  # O_DIRECT: block-aligned offsets (the buffer mirrors the file)
            total += end - start
            for off in range(start, end, IO_CHUNK):
                want = min(IO_CHUNK, end - off)
                length = ((want + ALIGN - 1) // ALIGN) * ALIGN if direct else want  # O_DIRECT: whole blocks
                rel = off - base
                length = min(length, buf.numel() - rel)
                jobs.append((fd, arr[rel : rel + length], off, length, want, entry))
        if len(jobs) == 1:  # one chunk: read it here rather than wake a pool thread and wait for it
            self._read_range(*jobs[0])
        else:
            for f in [pool.submit(self._read_range, *job) for job in jobs]:
                f.result()
        self.files.still(entry, fd, before)  # not changed while it was read (else the bytes may be torn)
        return total

    def drop_cache(self, entry: FileEntry) -> None:
        """Evict the file from the page cache (for cold-read benchmarks)."""
        fd, _ = self._fd(entry)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class LayerStream:
    """Streams ``entries`` (in order, cyclically) through a ring of ``depth + 1`` slots."""

    def __init__(
        self,
        folder,
        entries: list[FileEntry],
        depth: int = 2,
        backend: str = "pread",
        throttle: Throttle | None = None,
        device: torch.device | None = None,
        prepare=None,
        io_threads: int | None = None,
        clock_origin: float | None = None,
        subsets: dict[str, list[str]] | None = None,
        verifier: Verifier | None = None,
        files: ModelFiles | None = None,
        view_entry=None,
    ):
        """``subsets`` maps a file name to the tensors staged ahead of compute; the rest of that file
        is read on demand by :meth:`fetch` (a mixture-of-experts layer's routed experts).
        ``verifier``: files not yet verified are hashed and checked in the staging thread, before the
        layer is handed to compute (and staged whole the first time, so the hash covers every byte).
        ``files``: the folder's files as the process uses them (identity checks, lease-guarded
        mappings), shared with the pipelines opened before and after this one.
        ``view_entry(entry) -> entry``: on CPU, the tensors to make views of for a staged file or subset
        (the engine's names several adjacent tensors as one, a fused product); made once per entry."""
        self.verifier = verifier
        self.entries = entries
        self.subsets = {k: set(v) for k, v in (subsets or {}).items()}
        self.whole = False  # set by the engine: stage whole files even where a subset is configured
        self._subset_ranges = {e.name: tensor_ranges(e, self.subsets[e.name]) for e in entries if e.name in self.subsets}
        self._subset_entries = {e.name: _subset_entry(e, self.subsets[e.name]) for e in entries if e.name in self.subsets}
        # id(staged entry) -> the entry its views are made of (the entries live as long as this stream)
        self._view_entries = {id(e): view_entry(e) for e in [*entries, *self._subset_entries.values()]} if view_entry else {}
        self.depth = max(0, int(depth))
        self.device = device or torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self.prepare = prepare or (lambda w: w)
        self._prepared: dict[int, tuple] = {}  # mmap: id(staged entry) -> (mapping, prepared views of it)
        self.stats = PipelineStats()
        self.origin = clock_origin if clock_origin is not None else time.perf_counter()
        slot_bytes = max(e.bytes - e.data_start for e in entries) if entries else 0
        n_slots = self.depth + 1
        self.slot_bytes = slot_bytes
        if backend == "mmap" and not self.cuda:
            self.slots = [torch.empty(0, dtype=torch.uint8) for _ in range(n_slots)]  # views of the mapping instead
        else:
            self.slots = [aligned_empty(slot_bytes, pin=self.cuda) for _ in range(n_slots)]
        # Two pools: stagers (one per slot) wait on chunk reads, so chunk reads need their own
        # threads, or a small pool deadlocks with every thread waiting on reads queued behind it.
        self.pool = cf.ThreadPoolExecutor(max_workers=n_slots, thread_name_prefix="layerrun-stage")
        self.io_pool = cf.ThreadPoolExecutor(max_workers=io_threads or max(4, 2 * n_slots), thread_name_prefix="layerrun-io")
        self.files = files or ModelFiles(folder, verifier=verifier)
        self.reader = ChunkedReader(folder, backend, throttle, self.io_pool, self.files)
        # On-demand reads sit on the critical path: their own threads, never queued behind prefetch chunks.
        self.fetch_pool = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="layerrun-fetch")
        self.stats.direct = backend == "direct"
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device=self.device)
            self.dev_slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(n_slots)]
        self._results: dict[int, cf.Future] = {}
        self._flock = threading.Lock()
        self.backend = backend
        self._mapped = backend == "mmap" and not self.cuda  # views of lease-guarded mappings, no slots
        self._held: dict[int, MappedFile] = {}  # seq -> mapping acquired for compute, released by release()
        self._next_consume = 0
        self._closed = False
        # mmap on CPU: staging is making views and a read-ahead hint, microseconds of work, so it runs
        # inline in the compute thread; the kernel reads ahead on the hints (MADV_WILLNEED) given
        # ``depth`` layers early. No thread wakes up per layer to compete with compute for the cores
        # (bench/RESULTS.md, "Compute speed").
        self.inline = self._mapped
        self._hinted = -1  # the last sequence number whose layer was given a read-ahead hint
        self._probe = bytearray(mmap.PAGESIZE)
        # Reads ahead (pread / O_DIRECT, or CUDA): each free slot is submitted straight to the stage
        # pool, at start and from release(), so a layer's hand-off wakes one stage thread and nothing
        # else (an event loop thread in between was one more wake-up per layer, several ms each on a
        # busy machine).
        self.threaded = self.depth > 0 and bool(entries) and not self.inline
        self._seq = 0
        self._sched_lock = threading.Lock()
        if self.threaded:
            for slot in range(n_slots):
                self._submit(slot)
        _LIVE.add(self)

    # ---- scheduling ----------------------------------------------------------
    def _future(self, seq: int) -> cf.Future:
        with self._flock:
            f = self._results.get(seq)
            if f is None:
                f = self._results[seq] = cf.Future()
            return f

    def _submit(self, slot: int) -> None:
        """Stage the next layer in sequence into ``slot`` (in the stage pool)."""
        with self._sched_lock:
            if self._closed:
                return
            seq = self._seq
            fut = self._future(seq)
            entry = self.entries[seq % len(self.entries)]
            try:
                task = self.pool.submit(self._stage, seq, entry, slot)
            except RuntimeError:  # the pool was shut down (close() or interpreter exit)
                return
            self._seq += 1
        task.add_done_callback(lambda t, f=fut: _settle(f, t))

    # ---- staging (runs in an I/O thread) ----------------------------------
    def _stage(self, seq: int, entry: FileEntry, slot: int) -> StagedLayer:
        t0 = time.perf_counter()
        verify = self._needs_verify(entry)
        subset = None if self.whole or verify else self.subsets.get(entry.name)
        ranges = None if subset is None else self._subset_ranges[entry.name]
        layer = entry.layer if entry.layer is not None else -1
        # Views only of what is staged: a MoE layer holds hundreds of expert tensors, and making
        # views of them all per step is Python work that competes with compute for the GIL.
        staged_entry = entry if subset is None else self._subset_entries[entry.name]
        if self._mapped:
            # mmap: no slot, tensors view the mapping (verified when it was made); the read-ahead hint
            # faults them in ahead of compute.
            m = self.files.mapped(entry)
            if m is not None and m.acquire():
                try:
                    if not (self.inline and seq <= self._hinted):  # inline: hinted already, depth layers ago
                        m.advise(ranges)
                    n = entry.bytes - entry.data_start if subset is None else sum(b - a for a, b in ranges)
                    rec = ReadRecord(layer, n, t0, time.perf_counter())
                    w = self._mapped_weights(m, staged_entry)
                finally:
                    m.release()
                return StagedLayer(rec.layer, w, slot, rec, seq, None, entry, subset is not None, guard=m)
            # No lease on this file: a private copy read with pread, which a shrinking file cannot fault.
            if self.slots[slot].numel() < self.slot_bytes:
                self.slots[slot] = aligned_empty(self.slot_bytes)
            verify = self.verifier is not None and self.verifier.needed(entry, self.reader.stat(entry))
            if verify:
                subset, ranges, staged_entry = None, None, entry
        n = self.reader.read(entry, self.slots[slot], ranges)
        if verify:  # here, in the staging thread: compute never sees bytes that were not checked
            data = self.slots[slot][: entry.bytes - entry.data_start]
            st = self.reader.stat(entry)
            try:
                verify_buffer(self.verifier, self.reader.folder, entry, st, memoryview(data.numpy()), entry.data_start,
                              views(entry, self.slots[slot], entry.data_start))
            except FormatError as e:  # recorded: /health names the file, requests get 503 until it is replaced
                raise self.files.damaged(entry, st, e) from None
        rec = ReadRecord(layer, n, t0, time.perf_counter())
        if not self.cuda:
            w = views(self._view_entries.get(id(staged_entry), staged_entry), self.slots[slot], entry.data_start)
            return StagedLayer(rec.layer, self.prepare(w), slot, rec, seq, None, entry, subset is not None)
        w, start, event = self._to_device(entry, slot, ranges, staged_entry)
        return StagedLayer(rec.layer, w, slot, rec, seq, event, entry, subset is not None, start)

    def _mapped_weights(self, m, staged_entry: FileEntry) -> dict:
        """The prepared tensors of ``staged_entry`` on mapping ``m``. Where preparing made nothing but views
        of the mapping (no cast, no dequantized copy), they are kept and handed out again while the file
        keeps that mapping (a changed file is mapped anew, and this rebuilds): a warm decode step then
        does no per-layer Python work for them. Copies are never kept (a streamed layer would stay)."""
        key = id(staged_entry)
        hit = self._prepared.get(key)
        if hit is not None and hit[0] is m:
            return hit[1]
        # may touch pages (casts, sanitize)
        w = self.prepare(views(self._view_entries.get(id(staged_entry), staged_entry), m.tensor, 0))
        if _views_of(w, m.tensor):
            self._prepared[key] = (m, w)
        else:
            self._prepared.pop(key, None)
        return w

    def _needs_verify(self, entry: FileEntry) -> bool:
        if self.verifier is None:
            return False
        if self._mapped:
            return False  # the mapping verifies itself when it is made (a pread fallback checks in _stage)
        return self.verifier.needed(entry, self.reader.stat(entry))

    def _to_device(self, entry: FileEntry, slot: int, ranges, view_entry: FileEntry):
        """CUDA: copy the read ``ranges`` (default: all) of a slot to its device slot on the copy stream
        and prepare the tensors of ``view_entry`` (``entry`` or a subset of it) there too, so a cast or
        repack runs after the copy and before the event that compute waits on. Returns (weights, start
        event, end event)."""
        base = entry.data_start
        start = torch.cuda.Event(enable_timing=True)
        event = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.copy_stream):
            start.record(self.copy_stream)
            for a, b in ranges if ranges is not None else [(base, entry.bytes)]:
                self.dev_slots[slot][a - base : b - base].copy_(self.slots[slot][a - base : b - base], non_blocking=True)
            w = self.prepare(views(view_entry, self.dev_slots[slot], base))
            slot_ptr = range(self.dev_slots[slot].data_ptr(), self.dev_slots[slot].data_ptr() + self.slot_bytes + 1)
            for t in w.values():
                if isinstance(t, torch.Tensor) and t.is_cuda and t.data_ptr() not in slot_ptr:
                    t.record_stream(torch.cuda.default_stream(self.device))  # made here, used by compute
            event.record(self.copy_stream)
        return w, start, event

    def fetch(self, staged: StagedLayer, names) -> tuple[dict[str, torch.Tensor], ReadRecord]:
        """Read tensors ``names`` of a partially staged layer now (compute thread; blocking).

        They land in the layer's own slot at their file offsets, next to what staging read, so
        no slot is taken from the prefetch ring. Returns their prepared weights and the read's record.
        """
        entry = staged.entry
        sub = _subset_entry(entry, set(names))
        ranges = tensor_ranges(sub, sub.tensors)
        t0 = time.perf_counter()
        mapped = staged.guard is not None  # acquired by next() until release(): its pages may be touched
        if mapped:
            # No copy: compute touches the mapped pages. The read-ahead hint runs beside compute, which
            # faults in whatever the kernel has not yet read; on a warm cache the hint costs nothing.
            self.fetch_pool.submit(staged.guard.advise, ranges)
        else:
            self.reader.read(entry, self.slots[staged.slot], ranges, pool=self.fetch_pool)
        rec = ReadRecord(staged.layer, sum(b - a for a, b in ranges), t0, time.perf_counter())
        if self.cuda:
            w, _, event = self._to_device(entry, staged.slot, ranges, sub)
            torch.cuda.current_stream(self.device).wait_event(event)
            staged.event = event  # release() waits for this copy before the host slot is reused
            return w, rec
        buf, base = (staged.guard.tensor, 0) if mapped else (self.slots[staged.slot], entry.data_start)
        return self.prepare(views(sub, buf, base)), rec

    # ---- the compute side ---------------------------------------------------
    def next(self) -> StagedLayer:
        """The next layer in sequence, waiting for its read if needed (the wait is counted as stall)."""
        seq = self._next_consume
        self._next_consume += 1
        t0 = time.perf_counter()
        if not self.threaded:  # depth 0 or inline mmap: stage here (depth 0: read into the single slot)
            if self.inline:
                self._hint_ahead(seq)
            # (inline, a file read with pread for want of a lease uses the slots in turn)
            staged = self._stage(seq, self.entries[seq % len(self.entries)], seq % len(self.slots))
        else:
            staged = self._future(seq).result()
            with self._flock:
                self._results.pop(seq, None)
        if staged.guard is not None and not staged.guard.acquire():
            staged = self._restage(staged)  # the file changed after it was staged: check it and map it again
        if staged.guard is not None:
            self._held[staged.seq] = staged.guard
        if staged.event is not None:
            torch.cuda.current_stream(self.device).wait_event(staged.event)  # compute runs after the copy
        self.stats.stall_s += time.perf_counter() - t0  # at depth 0 (no overlap) every read is a stall
        self.stats.reads.append(staged.record)
        return staged

    def _hint_ahead(self, seq: int) -> None:
        """mmap: ask the kernel to read the next ``depth`` layers (each hinted once per pass), unless
        they are in the page cache already: MADV_WILLNEED walks every page even then (~0.1-0.5 ms for
        a 7-14 MB layer here, as much as the layer's compute)."""
        n = len(self.entries)
        for k in range(max(seq + 1, self._hinted + 1), seq + self.depth + 1):
            e = self.entries[k % n]
            self._hinted = k
            try:
                m = self.files.mapped(e)
            except FormatError:
                continue  # a hint only: staging the layer raises it, naming the file
            if m is None or self._cached(m):
                continue
            subset = None if self.whole else self.subsets.get(e.name)
            m.advise(None if subset is None else self._subset_ranges[e.name])

    def _cached(self, m: MappedFile) -> bool:
        """Whether a mapped file's data looks resident in the page cache: a non-blocking read
        (``RWF_NOWAIT``) of one page at its start, middle and end succeeds. False where unsupported."""
        if not hasattr(os, "RWF_NOWAIT") or not m.acquire():  # acquired: its descriptor stays open
            return False
        try:
            entry, page = m.entry, mmap.PAGESIZE
            for off in (entry.data_start, (entry.data_start + entry.bytes) // 2, entry.bytes - 1):
                try:
                    if os.preadv(m.fd, [self._probe], off - off % page, os.RWF_NOWAIT) <= 0:
                        return False
                except OSError:  # BlockingIOError (EAGAIN): not cached; EOPNOTSUPP: cannot tell
                    return False
            return True
        finally:
            m.release()

    def _restage(self, staged: StagedLayer) -> StagedLayer:
        """Stage ``staged``'s layer again, now (its mapping was revoked: the file was opened for writing or
        truncated since). The file is checked against the manifest again; a file that no longer matches
        raises FileChangedError naming it. Returns the new staged layer, its mapping acquired."""
        for _ in range(3):
            new = self._stage(staged.seq, staged.entry, staged.slot)
            if new.guard is None or new.guard.acquire():
                return new
        raise FileChangedError(f"{self.files.folder / staged.entry.name}: the model file keeps changing on disk; "
                               "requests that need it fail until it is left alone")

    def release(self, staged: StagedLayer) -> None:
        """Hand the slot back; the pipeline refills it with the next layer at once.

        CUDA: the host slot is reused only after its copy completed (the event), and the device slot
        only after the compute that reads it: the copy stream waits for the compute stream's work
        queued so far. The copy's duration (CUDA events) goes into ``staged.record.copy_s``.
        """
        guard = self._held.pop(staged.seq, None)
        if guard is not None:
            guard.release()  # compute is done with its pages
        if staged.event is not None:
            staged.event.synchronize()
            if staged.copy_start is not None:
                staged.record.copy_s = staged.copy_start.elapsed_time(staged.event) / 1e3
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        if self.threaded:
            self._submit(staged.slot)

    def close(self, wait: bool = True) -> None:
        """Stop the pipeline. ``wait``: join its threads (False from ``__del__``: see there)."""
        if self._closed:
            return
        with self._sched_lock:
            self._closed = True
        self.pool.shutdown(wait=wait, cancel_futures=True)
        self.io_pool.shutdown(wait=wait, cancel_futures=True)
        self.fetch_pool.shutdown(wait=wait, cancel_futures=True)
        for guard in self._held.values():  # a pass that stopped midway (an error): its layer's mapping is let go
            guard.release()
        self._held.clear()
        self.reader.close()

    def __del__(self):
        # Never join threads here: the garbage collector may run this inside another thread's start-up,
        # which holds threading's shutdown-locks lock that a join takes too (a deadlock seen in the suite:
        # a thread starting for an expert fetch collected an old stream). A stream found unreachable has
        # no task running (a running task holds it); its idle workers exit on the shutdown by themselves.
        try:
            self.close(wait=False)
        except Exception:  # interpreter shutdown
            pass


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # Stop prefetching before the interpreter tears down thread pools.
    for s in list(_LIVE):
        s.close()


def _subset_entry(entry: FileEntry, names) -> FileEntry:
    return FileEntry(entry.name, entry.kind, entry.bytes, entry.sha256,
                     {n: t for n, t in entry.tensors.items() if n in names}, entry.layer)


def tensor_ranges(entry: FileEntry, names) -> list[tuple[int, int]]:
    """The byte ranges (absolute file offsets) holding tensors ``names``, adjacent ones merged."""
    spans = sorted((t.start, t.end) for n, t in entry.tensors.items() if n in names and t.nbytes)
    out: list[list[int]] = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _settle(fut: cf.Future, task: cf.Future) -> None:
    if fut.done():
        return
    if task.cancelled():
        fut.cancel()
    elif task.exception() is not None:
        fut.set_exception(task.exception())
    else:
        fut.set_result(task.result())


def _views_of(w: dict, base: torch.Tensor) -> bool:
    """Whether every value of ``w`` is a tensor viewing ``base``'s memory, or an object whose only tensor
    (``.weight``: the kernel's wrapper of a linear weight) is one."""
    ptr = base.untyped_storage().data_ptr()
    for v in w.values():
        t = v if isinstance(v, torch.Tensor) else getattr(v, "weight", None)
        if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() != ptr:
            return False
        if not isinstance(v, torch.Tensor) and getattr(v, "packed", False):
            return False
    return True
