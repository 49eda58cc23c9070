"""Writing a file whole or not at all: the one atomic writer and mover of every output (training,
checkpoints, evaluation, data, studies).

A leaf module: it imports nothing of harmodt, so any module may use it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | os.PathLike, data: bytes | bytearray | memoryview | str | Callable[[BinaryIO], None],
                 tmp: str | os.PathLike | None = None) -> None:
    """Write ``data`` to ``path`` whole or not at all: into ``tmp`` beside it (default
    ``PATH.tmp``), flushed to disk, then renamed over ``path``, and the rename flushed too (a crash
    leaves the previous file or the new one, never a torn one; at worst a torn ``tmp``).
    ``data``: bytes, a str (UTF-8), or a function that writes into the open binary file. A write
    that fails removes ``tmp`` and raises."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp") if tmp is None else Path(tmp)
    try:
        with open(tmp, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        move_atomic(tmp, path)
    except BaseException:  # a failed write (or Ctrl-C) leaves no stray tmp; the previous file stays
        tmp.unlink(missing_ok=True)
        raise


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
