"""Writing a file whole or not at all: the one atomic writer and mover of every output (training,
checkpoints, evaluation, data, studies).

A leaf module: it imports nothing of harmodt, so any module may use it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | os.PathLike, data: bytes | bytearray | memoryview | str | Callable[[BinaryIO], None],
                 tmp: str | os.PathLike | None = None) -> None:
    """Write ``data`` to ``path`` whole or not at all: into ``tmp`` beside it (default
    ``PATH.tmp``), flushed to disk, then renamed over ``path``, and the rename flushed too (a crash
    leaves the previous file or the new one, never a torn one; at worst a torn ``tmp``).
    ``data``: bytes, a str (UTF-8), or a function that writes into the open binary file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp") if tmp is None else Path(tmp)
    with open(tmp, "wb") as fh:
        if callable(data):
            data(fh)
        else:
            fh.write(data.encode() if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    move_atomic(tmp, path)


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
