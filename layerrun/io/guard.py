"""Model files that change while a process uses them.

A long-running server reads its layer files for days; meanwhile someone may truncate one, rewrite it
in place, or rename another file over it. Two rules keep that from killing the process (a mapped
page past a file's new end raises SIGBUS) or from changing its output silently:

1. **A mapped page is touched only while the file cannot shrink.** A file is mapped only under a
   read lease (``fcntl(F_SETLEASE, F_RDLCK)``): the kernel then makes any process that opens the
   file for writing, or truncates it, wait until the lease holder lets go (at most
   ``/proc/sys/fs/lease-break-time``, 45 s by default). A watcher thread polls the leases (every
   :data:`POLL_S`); on a break the file is marked changed at once, so no new use of its pages
   starts, and the lease is released as soon as the layer computing from it (if any) finishes. Only
   then can the writer proceed. Every touch of mapped pages (the staging thread's prepare step, the
   layer's compute) happens between :meth:`MappedFile.acquire` and :meth:`MappedFile.release`.
   Where no lease can be had (another user's file without CAP_LEASE, a file someone holds open for
   writing, a filesystem without leases), the file is read with pread into private memory instead,
   which cannot fault.
2. **A file's bytes are used only while its identity is the one that was checked.** Every read
   compares the path's and the open file's (device, inode, size, mtime, ctime) with the identity
   at which the file last matched the manifest; a file whose identity changed is checked again
   (its size, then its sha256 against the manifest) before its bytes are used. A file that fails
   is a :class:`~layerrun.errors.FileChangedError` naming it, recorded in :meth:`ModelFiles.problems`
   until a later check finds it restored.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import stat
import threading
import time
import warnings
import weakref
from pathlib import Path

import torch

from layerrun.errors import FileChangedError, FormatError
from layerrun.formats.files import MissingFileError, open_file
from layerrun.formats.integrity import Verifier
from layerrun.formats.manifest import FileEntry
from layerrun.io.reader import verify_buffer, views

POLL_S = 0.02  # how often the watcher looks at the leases: a writer waits at most this plus one layer's compute
HASH_CHUNK = 8 * 2**20
Stamp = tuple[int, int, int, int, int]  # (device, inode, size, mtime_ns, ctime_ns)


def stamp_of(st: os.stat_result) -> Stamp:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sha256_fd(fd: int, size: int) -> str:
    """sha256 of the first ``size`` bytes of an open file, read with pread (never mapped)."""
    if getattr(os, "O_DIRECT", 0) and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
        # O_DIRECT reads need aligned buffers: hash through a plain descriptor of the same open file
        plain = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        try:
            return sha256_fd(plain, size)
        finally:
            os.close(plain)
    h = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    pos = 0
    while pos < size:
        got = os.preadv(fd, [view[: min(HASH_CHUNK, size - pos)]], pos)
        if got <= 0:
            break
        h.update(view[:got])
        pos += got
    return h.hexdigest()


class MappedFile:
    """One file mapped read-only under a read lease; its pages may be touched only while acquired."""

    def __init__(self, owner: ModelFiles, entry: FileEntry, fd: int, stamp: Stamp):
        self.entry, self.fd, self.stamp = entry, fd, stamp
        self.path = owner.folder / entry.name
        self._owner = owner
        # Exactly the manifest's size (checked just now, under the lease): never a page past it.
        self.mm = mmap.mmap(fd, entry.bytes, access=mmap.ACCESS_READ)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a read-only buffer: nothing writes to it
            self.tensor = torch.frombuffer(self.mm, dtype=torch.uint8) if entry.bytes else torch.empty(0, dtype=torch.uint8)
        self._lock = threading.Lock()
        self._users = 0
        self.revoked = False  # the lease broke (or the file was let go): its pages must not be touched
        self._leased = True

    def acquire(self) -> bool:
        """Start a use of the mapped pages; False if the file changed (nothing may touch them then)."""
        with self._lock:
            if self.revoked:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self.revoked and self._users == 0:
                self._unlease()

    def revoke(self) -> None:
        """No new use starts; the lease goes as soon as the current uses end (now if there are none)."""
        with self._lock:
            self.revoked = True
            if self._users == 0:
                self._unlease()

    def lease_broken(self) -> bool:
        try:
            return fcntl.fcntl(self.fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK
        except OSError:
            return True

    def _unlease(self) -> None:
        # Called with self._lock held and no users: from here on a writer may change the file.
        if not self._leased:
            return
        self._leased = False
        _WATCHER.remove(self)
        try:
            fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        except OSError:
            pass
        os.close(self.fd)  # the mapping keeps its own reference; it is unmapped when the last view goes

    def advise(self, ranges=None) -> None:
        """Ask the kernel to read the file (or only ``ranges`` of it) ahead of use; never faults."""
        if not hasattr(self.mm, "madvise") or self.revoked:
            return
        try:
            if ranges is None:
                self.mm.madvise(mmap.MADV_WILLNEED)
                return
            page = mmap.PAGESIZE
            for a, b in ranges:
                a0 = a - a % page
                self.mm.madvise(mmap.MADV_WILLNEED, a0, min(b, self.entry.bytes) - a0)
        except (ValueError, OSError):  # closed meanwhile: a hint only
            pass


    def drop(self) -> None:
        """Unmap the file's pages from this process (``MADV_DONTNEED``; they stay in the page cache and a
        later touch maps them again), so they stop counting as its resident memory."""
        if not hasattr(self.mm, "madvise") or self.revoked:
            return
        try:
            self.mm.madvise(mmap.MADV_DONTNEED)
        except (ValueError, OSError):
            pass


class _LeaseWatcher:
    """One thread for the process: polls every leased file and revokes those whose lease breaks."""

    def __init__(self):
        self._files: weakref.WeakSet[MappedFile] = weakref.WeakSet()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, m: MappedFile) -> None:
        with self._cond:
            self._files.add(m)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="layerrun-lease-watch", daemon=True)
                self._thread.start()
            self._cond.notify()

    def remove(self, m: MappedFile) -> None:
        with self._cond:
            self._files.discard(m)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._files:
                    self._cond.wait()
                files = list(self._files)
            for m in files:
                if not m.revoked and m.lease_broken():
                    m._owner._changed(m)
            del files
            time.sleep(POLL_S)


_WATCHER = _LeaseWatcher()


class ModelFiles:
    """The files of one model folder as this process uses them: the identity at which each last
    matched the manifest, the problems found, and the lease-guarded mappings. Thread-safe; one per
    engine, shared by the pipelines it opens (a pipeline restarted after an error keeps them)."""

    def __init__(self, folder: str | Path, leases: bool = True, verifier: Verifier | None = None):
        self.folder = Path(folder)
        self.leases = leases
        self.verifier = verifier  # files not verified yet are hashed and checked when first mapped
        self.note: str | None = None  # why mapped reads fell back to pread, once
        self._lock = threading.Lock()
        self._file_locks: dict[str, threading.Lock] = {}
        self._known: dict[str, Stamp] = {}  # name -> identity at which the file matched the manifest
        self._bad: dict[str, tuple[Stamp | None, str]] = {}  # name -> (identity when found bad, message)
        self._maps: dict[str, MappedFile] = {}
        self._ever: set[str] = set()
        self._paths: dict[str, str] = {}  # names accepted at least once (a later difference is a change on disk)

    # ---- problems -----------------------------------------------------------------
    def problems(self) -> dict[str, str]:
        """File name -> what is wrong with it, for every file found changed and not restored since."""
        with self._lock:
            return {n: msg for n, (_, msg) in self._bad.items()}

    def _fail(self, entry: FileEntry, st: Stamp | None, message: str) -> FileChangedError:
        with self._lock:
            self._bad[entry.name] = (st, message)
        return FileChangedError(message)

    def damaged(self, entry: FileEntry, st: os.stat_result, error: FormatError) -> FormatError:
        """A check of the file's contents (integrity: sha256, NaN/Inf) failed on first use: recorded like a
        change, so :meth:`problems` (/health) names it and it stays refused until another file (by
        identity) is at the path and matches the manifest. Returns ``error`` to raise."""
        with self._lock:
            self._known.pop(entry.name, None)
            self._ever.add(entry.name)  # what comes next at the path is hashed against the manifest
            self._bad[entry.name] = (stamp_of(st), str(error))
        return error

    def _path(self, name: str) -> str:
        """The file's path as a string, made once (a per-layer check should not pay pathlib's joins)."""
        p = self._paths.get(name)
        if p is None:
            p = self._paths[name] = os.fspath(self.folder / name)
        return p

    def _file_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._file_locks.setdefault(name, threading.Lock())

    def _changed(self, m: MappedFile) -> None:
        """The watcher saw ``m``'s lease break: someone opened the file for writing or truncates it."""
        with self._lock:
            if self._maps.get(m.entry.name) is m:
                del self._maps[m.entry.name]
            self._known.pop(m.entry.name, None)  # whatever it holds next is checked against the manifest again
        m.revoke()

    # ---- identity -----------------------------------------------------------------
    def accept(self, entry: FileEntry, fd: int) -> Stamp:
        """Check that open file ``fd`` (``entry``'s) is what the manifest describes: unchanged since it
        last matched, or else of the manifest's size and sha256. Returns its identity; raises
        FileChangedError naming the file (and remembers the problem) if it is not."""
        path = self.folder / entry.name
        st = os.fstat(fd)
        s = stamp_of(st)
        with self._lock:
            known, bad = self._known.get(entry.name), self._bad.get(entry.name)
        if known == s:
            return s
        if bad is not None and bad[0] == s:
            raise FileChangedError(bad[1])  # unchanged since it was found bad: no need to hash it again
        with self._lock:
            changed = entry.name in self._ever  # accepted before: whatever differs now changed on disk
        if not stat.S_ISREG(st.st_mode):
            raise self._fail(entry, s, f"{path}: is not a regular file; restore the model file "
                                       "(or re-run `layerrun convert`)")
        if st.st_size != entry.bytes:
            if not changed:  # as found when first opened: a damaged folder, not a change under us
                what = "truncated" if st.st_size < entry.bytes else "longer than expected"
                raise self._fail(entry, s, f"{path}: file is {what} ({st.st_size} bytes, manifest says "
                                           f"{entry.bytes}); re-run `layerrun convert` to rebuild it")
            what = "truncated" if st.st_size < entry.bytes else "extended"
            raise self._fail(entry, s, f"{path}: the model file changed on disk: {what} to {st.st_size} bytes "
                                       f"(the manifest says {entry.bytes}); restore it or re-run `layerrun convert`")
        if changed and entry.sha256:
            digest = sha256_fd(fd, entry.bytes)
            if stamp_of(os.fstat(fd)) != s:
                raise self._fail(entry, None, f"{path}: the model file is being changed on disk; "
                                              "requests that need it fail until it is complete again")
            if digest != entry.sha256:
                raise self._fail(entry, s, f"{path}: the model file changed on disk: its sha256 "
                                           f"({digest[:16]}…) is not the manifest's ({entry.sha256[:16]}…); "
                                           "restore it or re-run `layerrun convert`")
        with self._lock:
            self._known[entry.name] = s
            self._bad.pop(entry.name, None)
            self._ever.add(entry.name)
        return s

    def same_file(self, entry: FileEntry, fd: int) -> Stamp | None:
        """Before reading ``entry`` through the cached descriptor ``fd``: if the file at the path is still
        the one open, check it with :meth:`accept` and return its identity; None: another file is at the
        path now (reopen it and accept that one)."""
        path = self.folder / entry.name
        try:
            now = os.stat(self._path(entry.name))
        except FileNotFoundError:
            raise self._fail(entry, None, f"{path}: the model file was removed from disk; "
                                          "restore it or re-run `layerrun convert`") from None
        st = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return None
        return self.accept(entry, fd)

    def open(self, entry: FileEntry, direct: bool = False) -> int:
        """Open ``entry`` under the model folder's rule (:func:`layerrun.formats.files.open_file`: a
        regular file inside the folder, no links followed). ``direct``: O_DIRECT (a filesystem that
        refuses it raises the plain OSError, for the caller to fall back)."""
        path = self.folder / entry.name
        what = "layer file" if entry.layer is not None else "model file"
        with self._lock:
            changed = entry.name in self._ever
        try:
            fd, _ = open_file(self.folder, entry.name, what, direct)
            return fd
        except MissingFileError:
            msg = (f"{path}: the model file was removed from disk; restore it or re-run `layerrun convert`"
                   if changed else f"{path}: layer file is missing; run `layerrun validate {self.folder}`")
            raise self._fail(entry, None, msg) from None
        except FormatError as e:  # replaced by a link, a folder, a FIFO, made unreadable
            if not changed:
                raise
            raise self._fail(entry, None, f"{e}; the model file changed on disk: restore it or re-run "
                                          "`layerrun convert`") from None

    def still(self, entry: FileEntry, fd: int, before: Stamp) -> None:
        """After a read: the file did not change while it was read (else its bytes may be torn)."""
        if stamp_of(os.fstat(fd)) != before:
            raise self.changed_during_read(entry, "it changed while it was being read")

    def changed_during_read(self, entry: FileEntry, what: str) -> FileChangedError:
        """A read found the file different from the identity checked before it (``what``): the problem is
        recorded, and the file is checked against the manifest again before its next use."""
        with self._lock:
            self._known.pop(entry.name, None)
        return self._fail(entry, None, f"{self.folder / entry.name}: the model file changed on disk: {what}; "
                                       "requests that need it fail until it is restored")

    def recheck(self, entries: list[FileEntry]) -> dict[str, str]:
        """Check again every file of ``entries`` with a recorded problem; returns those that remain."""
        bad = self.problems()
        for e in entries:
            if e.name not in bad:
                continue
            try:
                fd = self.open(e)
            except FileChangedError:
                continue
            try:
                self.accept(e, fd)
            except FileChangedError:
                pass
            finally:
                os.close(fd)
        return self.problems()

    # ---- mappings -----------------------------------------------------------------
    def mapped(self, entry: FileEntry) -> MappedFile | None:
        """``entry`` mapped under a read lease and checked against the manifest, or None where no
        lease can be had (read it with pread instead). Raises FileChangedError if the file is not
        the manifest's any more."""
        with self._file_lock(entry.name):
            with self._lock:
                m = self._maps.get(entry.name)
            if m is not None and not m.revoked:
                try:
                    now = os.stat(self._path(entry.name))
                    same = (now.st_dev, now.st_ino) == m.stamp[:2]
                except OSError:
                    same = False
                if same:
                    return m
                # another file was renamed over the path: ours is intact, but the path is the truth
                with self._lock:
                    self._maps.pop(entry.name, None)
                    self._known.pop(entry.name, None)
                m.revoke()
            if not self.leases:
                return None
            fd = self.open(entry)
            try:
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
            except OSError as e:
                os.close(fd)
                why = {errno.EAGAIN: "another process has it open for writing",
                       errno.EACCES: "this user does not own it (and lacks CAP_LEASE)"}.get(e.errno, e.strerror)
                self.note = (f"{entry.name}: read with pread instead of mapped: no file lease ({why}), and a "
                             "mapped file that shrinks would crash the process")
                return None
            try:
                fcntl.fcntl(fd, fcntl.F_SETOWN, 0)  # no SIGIO on a break (its default action kills): we poll
                s = self.accept(entry, fd)  # under the lease: what is checked cannot change unnoticed
                m = MappedFile(self, entry, fd, s)
                st = os.fstat(fd)
                if self.verifier is not None and self.verifier.needed(entry, st):
                    try:  # under the lease, the pages cannot go away
                        verify_buffer(self.verifier, self.folder, entry, st, memoryview(m.mm)[entry.data_start:],
                                      entry.data_start, views(entry, m.tensor, 0))
                    except FormatError as e:
                        m.revoked = True
                        m._leased = False
                        raise self.damaged(entry, st, e) from None
                    except BaseException:
                        m.revoked = True
                        m._leased = False
                        raise
            except BaseException:
                try:
                    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
                finally:
                    os.close(fd)
                raise
            with self._lock:
                self._maps[entry.name] = m
            _WATCHER.add(m)
            if m.lease_broken():  # broke between taking it and the watcher seeing the file
                self._changed(m)
            return m

    def close(self) -> None:
        with self._lock:
            maps = list(self._maps.values())
            self._maps.clear()
        for m in maps:
            m.revoke()
