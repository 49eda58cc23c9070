"""Whose a file or folder is (a training run's, a data set's, a study's; a checkpoint), and the checks
every tool makes before it writes: an output never replaces an input of the same command, a
checkpoint, a data set's file, or a file of a run or study that another command wrote, unless the
user passes the tool's overwrite flag (an input of the same command is refused even then).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from .files import OutputError

# what training writes
RUN_FILES = ("checkpoint.pt", "best.pt", "config.json", "metrics.jsonl", "results.json", "curves.png", "tb")
STUDY_FILES = ("study.json", "summary.md", "command.txt", "jobs.json")  # what a study writes at its top level
DATA_SUFFIXES = (".npz", ".hdf5")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format (and npz's)


def run_files(folder: str | os.PathLike) -> list[str]:
    """The names of :data:`RUN_FILES` in ``folder``: a training run's files."""
    folder = Path(folder)
    return [name for name in RUN_FILES if (folder / name).exists()]


def holds_data_set(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a data set: our manifest.json, or data files (npz, hdf5) of any layout."""
    folder = Path(folder)
    if (folder / "manifest.json").exists():
        return True
    try:
        return any(p.suffix in DATA_SUFFIXES for p in folder.iterdir())
    except OSError:
        return False


def holds_study(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a study's folder (``python -m harmodt.study --out``)."""
    return any((Path(folder) / name).exists() for name in STUDY_FILES[:3])


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the file ``path`` is a torch checkpoint (a zip archive that is not an npz)."""
    path = Path(path)
    if path.suffix == ".npz" or not path.is_file():
        return False
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == ZIP_MAGIC
    except OSError:
        return False


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file or folder (links and relative paths followed)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def owner_of(path: str | os.PathLike) -> str | None:
    """What the existing file ``path`` belongs to, in words ("a checkpoint", "a file of the run in R"),
    or None for a file of no run, data set or study."""
    path = Path(path)
    folder = path.parent
    if is_checkpoint(path):
        return "a checkpoint"
    if path.suffix in DATA_SUFFIXES or holds_data_set(folder):
        return f"a file of the data set in {folder}"
    if run_files(folder):
        return f"a file of the run in {folder}"
    if holds_study(folder):
        return f"a file of the study in {folder}"
    return None


def check_output_file(path: str | os.PathLike, flag: str, inputs: Iterable[str | os.PathLike] = (),
                      overwrite: bool = False, own: Callable[[Path], bool] | None = None) -> None:
    """OutputError (one line) unless the file ``path`` (the value of ``flag``) may be written: it is
    none of ``inputs`` (the files the same command reads), and an existing file there belongs to no
    run, data set or study (:func:`owner_of`) unless ``own(path)`` says this tool wrote it or ``overwrite``."""
    path = Path(path)
    for src in inputs:
        if same_path(path, src):
            raise OutputError(f"{flag} {path}: is {src}, which this command reads; name another file")
    if not path.exists() or (own is not None and own(path)) or overwrite:
        return
    if (owner := owner_of(path)) is not None:
        raise OutputError(f"{flag} {path}: is {owner}, which this command did not write; name a new file, or "
                          "pass --overwrite to replace it")


def check_run_folder(out: str | os.PathLike) -> None:
    """OutputError unless ``out`` may hold a training run: it holds no data set and is no study's folder."""
    out = Path(out)
    if holds_data_set(out):
        raise OutputError(f"--out {out}: holds a data set; a run goes into a folder of its own")
    if holds_study(out):
        raise OutputError(f"--out {out}: is a study's folder; a run goes into a folder of its own")


def check_data_folder(out: str | os.PathLike, flag: str = "--out") -> None:
    """OutputError unless ``out`` may hold a data set: it holds no run and is no study's folder."""
    out = Path(out)
    if found := run_files(out):
        raise OutputError(f"{flag} {out}: holds the files of a training run ({', '.join(found)}); data "
                          "go into a folder of their own")
    if holds_study(out):
        raise OutputError(f"{flag} {out}: is a study's folder; data go into a folder of their own")
