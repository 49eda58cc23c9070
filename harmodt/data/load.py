"""Which layout a data path holds, and loading any of them: ours (:mod:`harmodt.data.formats`),
the original HarmoDT folders (:mod:`harmodt.data.original`) or Minari datasets
(:mod:`harmodt.data.minari`)."""

from __future__ import annotations

from pathlib import Path

from ..tasks import canonical_name
from .formats import MANIFEST, DataError, TaskData, load_ours, unfinished_generation
from .minari import load_minari, minari_dataset_dirs
from .original import load_original


def detect_layout(path: str | Path) -> str:
    """'ours' (manifest.json), 'minari' (Minari datasets in or under the folder, or Minari
    dataset ids found under the local Minari root) or 'original' (task folders of numbered npz
    files). A folder of ours whose generation did not finish (task files but no manifest) is a
    DataError."""
    root = Path(path)
    if not root.exists():
        if minari_dataset_dirs(str(path)):
            return "minari"
        raise DataError(f"{root}: data folder does not exist (nor is it a Minari dataset id under the Minari root)")
    if not root.is_dir():
        raise DataError(f"{root}: is not a folder")
    if (root / MANIFEST).exists():
        return "ours"
    partial = unfinished_generation(root)
    if partial:
        raise DataError(f"{root}: incomplete data folder: no {MANIFEST} beside {', '.join(partial[:3])}"
                        f"{' ...' if len(partial) > 3 else ''} (generation stopped before it finished); run "
                        "`python -m harmodt.data generate` again with the same settings to finish it")
    if minari_dataset_dirs(str(path)):
        return "minari"
    return "original"


def load_dataset(path: str | Path, tasks: list[str] | None = None, quality: str = "near-optimal",
                 episodes_per_task: int | None = None) -> dict[str, TaskData]:
    """Load ``tasks`` (v3 names; None = all in the data) from any of the three layouts.

    ``path`` is a folder of ours, of the original layout, a Minari root or dataset folder, or a
    comma list of Minari dataset ids under the local Minari root (``MINARI_DATASETS_PATH``, else
    ``~/.minari/datasets``). Minari datasets' prompt episodes are chosen as in the original
    layout: the last 2 episodes of each task's dataset, or the number its harmodt metadata
    records (see :func:`harmodt.data.minari.load_minari`).
    """
    layout = detect_layout(path)
    tasks = None if tasks is None else [canonical_name(t) for t in tasks]
    if layout == "minari":
        return load_minari(str(path), tasks, quality, episodes_per_task)
    loader = load_ours if layout == "ours" else load_original
    return loader(Path(path), tasks, quality, episodes_per_task)
