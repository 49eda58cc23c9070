"""Writing a file whole or not at all: the one atomic writer and mover of every output (training,
checkpoints, evaluation, data, studies).

A leaf module: it imports nothing of harmodt, so any module may use it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


class OutputError(ValueError):
    """An output that cannot be written, or that would replace a file it must not; one line (exit code 2)."""


def temp_name(path: str | os.PathLike) -> Path:
    """The temporary name ``path`` is written under before it is renamed into place: ``PATH.tmp-PID-RANDOM``,
    one of its own for every writer (two writers of one file never share it)."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_of(name: str, target: str) -> bool:
    """Whether ``name`` is a :func:`temp_name` of the file named ``target`` (a killed writer's leftover when it
    stays)."""
    return re.fullmatch(re.escape(target) + r"\.tmp-\d+-[0-9a-f]+", name) is not None


def write_atomic(path: str | os.PathLike, data: bytes | bytearray | memoryview | str | Callable[[BinaryIO], None],
                 tmp: str | os.PathLike | None = None) -> None:
    """Write ``data`` to ``path`` whole or not at all: into ``tmp`` beside it (default
    :func:`temp_name`, this writer's own), flushed to disk, then renamed over ``path``, and the rename
    flushed too (a crash leaves the previous file or the new one, never a torn one; at worst a torn ``tmp``).
    ``data``: bytes, a str (UTF-8), or a function that writes into the open binary file. A write
    that fails removes ``tmp`` and raises; a full disk raises :class:`OutputError` naming the folder
    and the bytes needed (the previous file stays)."""
    path = Path(path)
    tmp = temp_name(path) if tmp is None else Path(tmp)
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as fh:
            if callable(payload):
                payload(fh)
            else:
                fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        move_atomic(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            size = "" if callable(payload) else f"{len(payload)} bytes needed, "
            raise OutputError(f"{path.parent}: no space left on the device to write {path.name} "
                              f"({size}{free_bytes(path.parent)} bytes free); the previous "
                              f"{path.name}, if any, is kept") from None
        raise
    except BaseException:  # a failed write (or Ctrl-C) leaves no stray tmp; the previous file stays
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def appends_to(path: str | os.PathLike, nbytes: int | None = None):
    """A full disk while appending to ``path`` (a log written line by line) becomes one
    :class:`OutputError` naming the folder, the file and the bytes needed and free."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        path = Path(path)
        needed = "" if nbytes is None else f"{nbytes} bytes needed, "
        raise OutputError(f"{path.parent}: no space left on the device to append to {path.name} ({needed}"
                          f"{free_bytes(path.parent)} bytes free); a resumed run continues from its last "
                          "checkpoint") from None


def free_bytes(folder: str | os.PathLike) -> int:
    """Bytes a file may still take in ``folder`` (0 when that cannot be read)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def finite_json(obj, indent: int | None = None) -> str:
    """``obj`` as JSON text that every reader accepts: a float that is NaN or infinite (which
    ``json.dumps`` writes as a bare ``NaN``/``Infinity``, not JSON) becomes ``null``."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=indent, allow_nan=False)


def writable_folder(folder: str | os.PathLike) -> bool:
    """Whether a file can be made in ``folder`` (tried: a probe file made and removed; permission
    bits alone do not tell, e.g. for root or on a read-only mount)."""
    probe = Path(folder) / f".write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def unwritable_file(path: str | os.PathLike) -> str | None:
    """Why the file ``path`` cannot be written (its folder is missing or takes no new file, or it is
    a folder), or None when it can; checked before the work whose result goes there."""
    folder = Path(os.path.abspath(path)).parent
    if not folder.is_dir():
        return f"the folder {folder} does not exist"
    if Path(path).is_dir():
        return "is a folder; name a file to write the results into"
    return None if writable_folder(folder) else f"the folder {folder} is not writable"


def move_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename the finished file or folder ``src`` over ``dst`` (on one file system: ``dst`` is then
    the old one or the new one, never a part), and flush the rename to disk."""
    os.replace(src, dst)
    _sync_folder(Path(dst).parent)


def _sync_folder(folder: Path) -> None:
    """Flush a rename in ``folder`` to disk (where the platform lets a folder be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tail_lines(path: str | os.PathLike, n: int) -> str:
    """The last ``n`` lines of a text file (a log), or "" when it cannot be read."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def cache_dir() -> Path:
    """Where generated data sets are cached: ``$HARMODT_CACHE``, else ``~/.cache/harmodt``."""
    return Path(os.environ.get("HARMODT_CACHE", Path.home() / ".cache" / "harmodt"))


class DuplicateKeyError(ValueError):
    """A JSON object that names one key twice (which the last one would silently win)."""


def _unique_keys(pairs: list) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKeyError(f"duplicated key {key!r}")
        seen[key] = value
    return seen


def loads_json(text: str | bytes) -> object:
    """``json.loads`` that refuses an object naming a key twice (:class:`DuplicateKeyError`, a
    ValueError); every JSON harmodt reads goes through it."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def read_json(path: str | os.PathLike, limit: int = 64 << 20) -> object:
    """The JSON file ``path`` (:func:`loads_json`); at most ``limit`` bytes are read (a stream such as
    /dev/zero or a huge file raises ValueError instead of filling the memory)."""
    with open(path, "rb") as fh:
        raw = fh.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"larger than {limit >> 20} MB: not a JSON file harmodt wrote")
    return loads_json(raw)


class FolderLock:
    """The one writer of a folder: an exclusive lock (``fcntl.flock``) on ``FOLDER/.harmodt.lock``, which
    holds the writer's pid, taken on enter and removed on exit. The operating system drops the lock
    of a process that died (even by SIGKILL), so a lock file left behind is stale and taken over.
    A folder already locked raises :class:`OutputError` naming the holder's pid."""

    NAME = ".harmodt.lock"

    def __init__(self, folder: str | os.PathLike, what: str):
        self.folder, self.what, self.fd = Path(folder), what, None

    def __enter__(self) -> "FolderLock":
        path = self.folder / self.NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputError(f"{self.what} {self.folder}: in use by another harmodt process (pid {holder}, lock "
                                  f"file {path}); wait for it to finish, or choose another folder") from None
            try:  # the file may have been removed by the holder that just let go: lock the one at the path
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            (self.folder / self.NAME).unlink(missing_ok=True)
            os.close(self.fd)  # (closing drops the lock)
            self.fd = None
