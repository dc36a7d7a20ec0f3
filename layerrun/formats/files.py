"""Opening files named by untrusted data, inside one folder.

A model folder comes from the internet: its manifest, its
``model.safetensors.index.json`` and a GGUF file's metadata all name files, and
any of those names can be hostile. Every file LayerRun reads from a model folder
is opened here, under one rule:

- the name is a plain file name (no ``/``, ``\\``, ``..``, NUL, nothing absolute);
- a symlink is followed only when its target resolves inside the same folder
  (and, for a Hugging Face hub cache snapshot ``.../snapshots/<rev>/``, inside
  that repository's ``blobs/`` folder, where the hub keeps the real files);
- only a regular file is read: it is opened ``O_NONBLOCK | O_NOFOLLOW`` and
  ``fstat``-ed before a byte is read, so a FIFO, a device or a directory under a
  model file's name is refused instead of blocking or streaming forever;
- reads of small files (JSON, templates) are bounded, so a 10 GB "config.json"
  is refused before it is read.

Every refusal is a :class:`~layerrun.errors.FormatError` naming the file.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from layerrun.errors import FormatError

MAX_NAME = 255
MAX_JSON_BYTES = 64 * 2**20  # config.json, tokenizer_config.json, an index: far above any real one
MAX_MANIFEST_BYTES = 256 * 2**20
MAX_TOKENIZER_BYTES = 1024 * 2**20  # tokenizer.json (Gemma 3's is 33 MB)


class MissingFileError(FormatError):
    """A file named by a model folder does not exist (callers may say more about what to do)."""


def check_name(name, what: str = "file", where: str | os.PathLike | None = None) -> str:
    """``name`` if it is a plain file name that stays inside its folder; else a FormatError."""
    prefix = f"{where}: " if where is not None else ""
    if not isinstance(name, str) or not name:
        raise FormatError(f"{prefix}{what} name {name!r} is not a file name")
    bad = None
    if "/" in name or "\\" in name:
        bad = "contains a path separator"
    elif name in (".", ".."):
        bad = "is not a file"
    elif "\x00" in name:
        bad = "contains a NUL byte"
    elif len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        bad = f"is longer than {MAX_NAME} bytes"
    if bad:
        raise FormatError(
            f"{prefix}{what} name {name!r} {bad}; a model folder may only name plain files inside itself"
        )
    return name


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _allowed_roots(root: str) -> list[str]:
    roots = [root]
    parent = os.path.dirname(root)
    if os.path.basename(parent) == "snapshots":  # a Hugging Face hub cache: snapshots/<rev>/x -> ../../blobs/<sha>
        roots.append(os.path.join(os.path.dirname(parent), "blobs"))
    return roots


def resolve_inside(folder: str | os.PathLike, name: str, what: str = "file") -> Path:
    """The path to open for ``folder/name``: itself, or a symlink's target when that stays inside.

    Raises :class:`MissingFileError` when there is no such file, FormatError when the name or a
    symlink leaves the folder.
    """
    folder = Path(folder)
    check_name(name, what, folder)
    path = folder / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: {what} is missing") from None
    except NotADirectoryError:
        raise FormatError(f"{folder}: not a folder") from None
    except PermissionError:
        raise FormatError(f"{path}: {what} cannot be read (permission denied); check its permissions") from None
    if not stat.S_ISLNK(st.st_mode):
        return path
    root = os.path.realpath(folder)
    target = os.path.realpath(path)
    if any(_within(target, r) for r in _allowed_roots(root)):
        return Path(target)
    raise FormatError(
        f"{path}: {what} is a symlink to {target}, outside the model folder; LayerRun reads only files "
        "inside it (copy the file into the folder instead of linking it)"
    )


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_file(folder: str | os.PathLike, name: str, what: str = "file", direct: bool = False) -> tuple[int, os.stat_result]:
    """Open ``folder/name`` for reading under the folder's rule; return (fd, fstat of the fd).

    With ``direct``, ``O_DIRECT`` is requested; a filesystem that refuses it raises the plain
    ``OSError`` (EINVAL), so the caller can fall back to buffered reads.
    """
    path = Path(folder) / name
    real = resolve_inside(folder, name, what)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    if direct:
        flags |= getattr(os, "O_DIRECT", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: {what} is missing") from None
    except PermissionError:
        raise FormatError(f"{path}: {what} cannot be read (permission denied); check its permissions") from None
    except OSError as e:
        if e.errno == errno.ELOOP:  # swapped for a symlink between the check and the open
            raise FormatError(f"{path}: {what} turned into a symlink while it was opened; refusing it") from None
        if e.errno == errno.EISDIR:
            raise FormatError(f"{path}: {what} is a folder, not a regular file") from None
        if direct and e.errno == errno.EINVAL:
            raise
        raise FormatError(f"{path}: {what} cannot be opened ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{path}: {what} is {_kind(st.st_mode)}, not a regular file; refusing to read it")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # a regular file: back to ordinary reads
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def open_user_file(path: str | os.PathLike, what: str = "file") -> tuple[int, os.stat_result]:
    """Open a file the user named (a command-line argument): symlinks are followed, since the user chose
    the path, but it must still be a regular file (a FIFO or a device would block or never end)."""
    path = Path(path)
    real = Path(os.path.realpath(path))
    try:
        return open_file(real.parent, real.name, what)
    except MissingFileError:
        raise MissingFileError(f"{path}: no such file") from None
    except FormatError as e:
        msg = str(e)
        raise FormatError(f"{path}: {msg[len(str(real)) + 2:]}" if msg.startswith(f"{real}: ") else msg) from None


def read_user_text(path: str | os.PathLike, what: str = "file", limit: int = MAX_TOKENIZER_BYTES) -> str:
    """The text of a file the user named (e.g. ``--prompts-file``): a regular file, bounded, UTF-8."""
    real = Path(os.path.realpath(path))
    try:
        return read_text(real.parent, real.name, what, limit)
    except FormatError as e:
        msg = str(e)
        raise type(e)(f"{path}: {msg[len(str(real)) + 2:]}" if msg.startswith(f"{real}: ") else msg) from None


def is_file(folder: str | os.PathLike, name: str) -> bool:
    """Whether ``folder/name`` exists as something :func:`open_file` would open (a plain name; a regular
    file, or a symlink to one inside the folder). A quiet check for optional files."""
    try:
        real = resolve_inside(folder, name)
        return stat.S_ISREG(os.stat(real).st_mode)
    except (FormatError, OSError):
        return False


def read_bytes(folder: str | os.PathLike, name: str, what: str = "file", limit: int = MAX_JSON_BYTES) -> bytes:
    """The whole of a small file, refused when it is larger than ``limit``."""
    path = Path(folder) / name
    fd, st = open_file(folder, name, what)
    try:
        if st.st_size > limit:
            raise FormatError(
                f"{path}: {what} is {st.st_size:,} bytes, more than any valid one ({limit:,}); it is damaged "
                "or not what its name says"
            )
        chunks, total = [], 0
        while True:
            try:
                b = os.read(fd, min(limit + 1 - total, 16 * 2**20))
            except OSError as e:
                raise FormatError(f"{path}: {what} cannot be read ({e.strerror})") from None
            if not b:
                break
            chunks.append(b)
            total += len(b)
            if total > limit:
                raise FormatError(f"{path}: {what} grew past {limit:,} bytes while it was read; refusing it")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(folder: str | os.PathLike, name: str, what: str = "file", limit: int = MAX_JSON_BYTES) -> str:
    raw = read_bytes(folder, name, what, limit)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{Path(folder) / name}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(folder: str | os.PathLike, name: str, what: str = "file", limit: int = MAX_JSON_BYTES,
              expect: type = dict):
    """A JSON file's value, which must be of type ``expect`` (a JSON object by default)."""
    path = Path(folder) / name
    text = read_text(folder, name, what, limit)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise FormatError(f"{path}: {what} nests JSON too deeply to be a valid one") from None
    if expect is not None and not isinstance(value, expect):
        want = {dict: "a JSON object", list: "a JSON array"}.get(expect, expect.__name__)
        raise FormatError(f"{path}: {what} must be {want}, found {_json_kind(value)}")
    return value


def optional_json(folder: str | os.PathLike, name: str, what: str = "file", limit: int = MAX_JSON_BYTES,
                  expect: type = dict):
    """Like :func:`read_json`, but None when there is no file of that name at all (anything else under
    the name, a FIFO or a link out of the folder, is still refused)."""
    if not os.path.lexists(Path(folder) / name):
        return None
    try:
        return read_json(folder, name, what, limit, expect)
    except MissingFileError:  # a dangling symlink
        return None


def _json_kind(v) -> str:
    return {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
            bool: "true/false", type(None): "null"}.get(type(v), type(v).__name__)


def write_new(folder: str | os.PathLike, name: str, data: bytes) -> None:
    """Write ``folder/name`` through a temp file renamed over it; never follows a symlink that was
    planted under either name (the temp is created exclusively, the rename replaces the link itself)."""
    folder = Path(folder)
    check_name(name, "file", folder)
    tmp = folder / f".{name}.tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, folder / name)
