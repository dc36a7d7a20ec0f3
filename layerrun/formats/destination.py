"""The converter's destination folder: who may write into it, what it may overwrite, whether it fits.

- **One conversion at a time**: a lock file, ``.layerrun-convert.lock``, held with
  ``flock`` for the whole conversion and holding the writer's pid. A second
  conversion into the same folder is refused, naming that pid; a lock left by a
  process that died (``kill -9``, a crash) is no longer held, and is taken over.
- **Only its own files**: ``--force`` overwrites the files an earlier conversion
  wrote (those its manifest or state file lists, and LayerRun's own bookkeeping),
  never a file it did not write: a folder holding someone's ``config.json`` is
  refused, naming the file.
- **Room first**: the bytes the conversion will write are checked against the
  filesystem's free space before it starts; running out anyway (another writer
  filled the disk) stops with the folder and the amount still needed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
from pathlib import Path

from layerrun.errors import FormatError, LayerRunError
from layerrun.formats.files import optional_json
from layerrun.formats.hf import AUX_FILES
from layerrun.formats.integrity import STAMP_NAME
from layerrun.formats.manifest import MANIFEST_NAME, Manifest

STATE_NAME = ".convert-state.json"
LOCK_NAME = ".layerrun-convert.lock"
BOOKKEEPING = {MANIFEST_NAME, STATE_NAME, LOCK_NAME, STAMP_NAME}
_MODEL_FILE = re.compile(r"^(embeddings|final|layer_\d{3,})\.safetensors$")
SPACE_MARGIN = 2**20  # the manifest, the state file; each file's header and padding are added per file


def human(n: float, digits: int = 1) -> str:
    """Bytes in binary units, ``digits`` decimals past the byte (also the CLI's tables, with 2)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    return f"{n:.{digits}f} TiB"


class ConvertLock:
    """Held while a conversion writes into ``folder``; refuses a second writer, takes over a dead one's."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> ConvertLock:
        for _ in range(10):  # retry if the file we locked was replaced under us (a finishing holder unlinked it)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise LayerRunError(
                    f"{self.folder}: another conversion (pid {holder}) is writing into this folder; wait for it to "
                    "finish, or convert into another folder"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fd = fd
            return self
        raise LayerRunError(f"{self.folder}: could not take the conversion lock {self.path}")

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def owned_names(dst: Path) -> set[str]:
    """Names in ``dst`` that an earlier conversion wrote: what ``--force`` may overwrite or remove."""
    owned = set(BOOKKEEPING)
    ours = False
    if os.path.lexists(dst / MANIFEST_NAME):
        try:
            m = Manifest.read(dst)
            owned |= {f.name for f in m.files}
            aux = m.extra.get("aux_files")
            if isinstance(aux, list) and all(isinstance(a, str) for a in aux):
                owned |= set(aux)
            else:  # written before manifests listed them: a conversion writes these names and no others
                owned |= set(AUX_FILES) | {"config.json"}
            ours = True
        except FormatError:
            ours = True  # our own manifest, damaged: its model files (named as only LayerRun names them) are ours
    try:
        state = optional_json(dst, STATE_NAME, "conversion state")
    except FormatError:
        state = None
    if state is not None:
        ours = True
        done = state.get("done")
        owned |= {n for n in done if isinstance(n, str)} if isinstance(done, dict) else set()
        aux = state.get("aux_files")
        owned |= {a for a in aux if isinstance(a, str)} if isinstance(aux, list) else set()
    names = set(os.listdir(dst))
    if ours:
        owned |= {n for n in names if _MODEL_FILE.match(n)}
    owned |= {f".{n}.tmp" for n in owned} | {MANIFEST_NAME + ".tmp", STATE_NAME + ".tmp"}
    owned |= {n for n in names if n.startswith(".") and n.endswith(".tmp") and _MODEL_FILE.match(n[1:-4])}
    return owned


def check_overwrites(dst: Path, will_write: set[str], owned: set[str]) -> None:
    """Refuse to overwrite any existing file the converter does not own."""
    existing = set(os.listdir(dst))
    foreign = sorted((existing & will_write) - owned)
    if foreign:
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        raise LayerRunError(
            f"{dst}: holds {shown}, which layerrun did not write; --force overwrites only the files of an earlier "
            "conversion. Move them away or convert into an empty folder"
        )


def check_free_space(dst: Path, need: int) -> None:
    """Refuse before writing anything when the filesystem of ``dst`` has less than ``need`` bytes free."""
    need += SPACE_MARGIN
    free = shutil.disk_usage(dst).free
    if need > free:
        raise LayerRunError(
            f"{dst}: not enough free disk space: this conversion writes about {human(need)} and the filesystem has "
            f"{human(free)} free; free {human(need - free)} more or convert into another folder"
        )


def write_error(e: OSError, dst: Path, name: str, still_needed: int) -> LayerRunError:
    """A write failure as one line: a full disk says where and how much more is needed."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return LayerRunError(
            f"{dst}: the disk is full (while writing {name}); the conversion needs about {human(still_needed)} more. "
            "Free some space and run the same `layerrun convert` again: it resumes where it stopped"
        )
    return LayerRunError(f"{dst / name}: cannot write it ({e.strerror})")
