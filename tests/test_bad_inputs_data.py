"""Bad data files, one row each, in the three layouts: each gives one DataError line that names
the bad file, and the CLIs print it as `error: ...` and exit with status 2, never a traceback.

Run as a script (`python tests/test_bad_inputs_data.py DIR`) it writes every row's folder under
DIR, runs `python -m harmodt.train --data BADDIR --steps 1 --eval-episodes 0 --out ...` on each
and prints the markdown table of bad input, error line and exit code.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data_folders import minari_episodes, rewrite_task_file, task_arrays, write_minari_dataset, write_ours  # noqa: E402

from harmodt.data import DataError, load_dataset  # noqa: E402

TASKS = ["reach-v3", "push-v3"]


# ---- our layout: every builder returns (--data value, the bad file, a piece of the message) ----
def _ours(root, tasks):
    return write_ours(root, tasks, episodes=3, length=12)


def _ours_with(root, tasks, change):
    """Our layout whose first task's arrays went through ``change`` (manifest checksums updated)."""
    _ours(root, tasks)
    arrays = task_arrays(root, tasks[0])
    change(arrays)
    return rewrite_task_file(root, tasks[0], arrays)


def ours_truncated(root, tasks):
    _ours(root, tasks)
    path = root / f"{tasks[0]}.npz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return root, path, "(truncated or modified file)"


def ours_truncated_npz(root, tasks):
    _ours(root, tasks)
    path = root / f"{tasks[0]}.npz"
    raw = path.read_bytes()
    return root, rewrite_bytes(root, tasks[0], raw[: len(raw) // 2]), "unreadable or truncated npz file"


def rewrite_bytes(root, task, raw: bytes) -> Path:
    from harmodt.data.formats import sha256

    path = root / f"{task}.npz"
    path.write_bytes(raw)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"][task].update(bytes=len(raw), sha256=sha256(path))
    (root / "manifest.json").write_text(json.dumps(manifest))
    return path


def ours_missing_key(root, tasks):
    return root, _ours_with(root, tasks, lambda a: a.pop("rewards")), "missing key 'rewards'"


def ours_wrong_shape(root, tasks):
    def change(a):
        a["observations"] = a["observations"][:, :12]
    return root, _ours_with(root, tasks, change), "observations must be [T, 39], got [39, 12]"


def ours_nan(root, tasks):
    def change(a):
        a["rewards"][5] = np.nan
    return root, _ours_with(root, tasks, change), "rewards contain NaN or inf"


def ours_inf(root, tasks):
    def change(a):
        a["observations"][3, 0] = np.inf
    return root, _ours_with(root, tasks, change), "observations contain NaN or inf"


def ours_empty_task(root, tasks):
    def change(a):
        for k in ("observations", "actions", "rewards", "terminals", "truncations", "successes"):
            a[k] = a[k][:0]
        a["episode_starts"], a["episode_lengths"], a["episode_epsilon"] = a["episode_starts"][:0], a["episode_lengths"][:0], a["episode_epsilon"][:0]
    return root, _ours_with(root, tasks, change), "no training episodes (empty task)"


def ours_wrong_dtype(root, tasks):
    def change(a):
        a["observations"] = a["observations"].astype(np.float64)
    return root, _ours_with(root, tasks, change), "observations must be float32, got float64"


def ours_wrong_flag_dtype(root, tasks):
    def change(a):
        a["terminals"] = a["terminals"].astype(np.float32)
    return root, _ours_with(root, tasks, change), "terminals must be bool, got float32"


def ours_unknown_task(root, tasks):
    _ours(root, tasks)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"]["fly-v3"] = manifest["files"][tasks[0]]
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root, root / "manifest.json", "unknown task 'fly-v3' (not a Meta-World v3 task name)"


def ours_unreadable_manifest(root, tasks):
    _ours(root, tasks)
    text = (root / "manifest.json").read_text()
    (root / "manifest.json").write_text(text[: len(text) // 2])
    return root, root / "manifest.json", "unreadable manifest"


def ours_interrupted(root, tasks):
    _ours(root, tasks)
    (root / "manifest.json").unlink()
    return root, root, "incomplete data folder: no manifest.json"


# ---- original layout -------------------------------------------------------------------------
def _original(root, tasks, episodes=4):
    rng = np.random.default_rng(0)
    for task in tasks:
        for i in range(episodes):
            _episode_file(root / task.replace("-v3", "-v2") / f"{i}.npz", rng)
    return root


def _episode_file(path, rng, t=12, **override):
    arrs = {"observations": rng.normal(size=(t, 39)).astype(np.float32), "actions": rng.uniform(-1, 1, (t, 4)).astype(np.float32),
            "rewards": rng.uniform(0, 1, t).astype(np.float32), "dones": np.eye(1, t, t - 1, dtype=bool)[0]}
    arrs.update(override)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: v for k, v in arrs.items() if v is not None})
    return path


def _original_with(root, tasks, **override):
    _original(root, tasks)
    path = root / tasks[0].replace("-v3", "-v2") / "1.npz"
    return _episode_file(path, np.random.default_rng(1), **override)


def original_truncated(root, tasks):
    _original(root, tasks)
    path = root / tasks[0].replace("-v3", "-v2") / "1.npz"
    path.write_bytes(path.read_bytes()[:300])
    return root, path, "unreadable or truncated npz file"


def original_missing_key(root, tasks):
    return root, _original_with(root, tasks, rewards=None), "missing key 'rewards'"


def original_wrong_shape(root, tasks):
    return root, _original_with(root, tasks, observations=np.zeros((12, 12), np.float32)), "observations must be [T, 39], got [12, 12]"


def original_nan(root, tasks):
    return root, _original_with(root, tasks, rewards=np.full(12, np.nan, np.float32)), "rewards contain NaN or inf"


def original_empty_task(root, tasks):
    _original(root, tasks)
    folder = root / tasks[0].replace("-v3", "-v2")
    shutil.rmtree(folder)
    folder.mkdir()
    return root, folder, "0 episode files"


def original_wrong_dtype(root, tasks):
    return root, _original_with(root, tasks, actions=np.array([["a"] * 4] * 12)), "non-numeric data"


def original_unknown_task(root, tasks):
    _original(root, tasks)
    _episode_file(root / "fly-v2" / "0.npz", np.random.default_rng(0))
    return root, root / "fly-v2", "holds episode files but 'fly-v2' is not a Meta-World v3 task name"


# ---- Minari ----------------------------------------------------------------------------------
def _minari(root, tasks, first=None, **kw):
    """One dataset per task under the Minari root ``root``; the first task's episodes from ``first``."""
    for i, task in enumerate(tasks):
        episodes = first if i == 0 and first is not None else minari_episodes(4, **kw)
        write_minari_dataset(root, f"metaworld/{task}/expert-v0", episodes)
    return root / f"metaworld/{tasks[0]}/expert-v0" / "data"


def _h5_edit(data, edit):
    import h5py

    with h5py.File(data / "main_data.hdf5", "a") as f:
        edit(f["episode_1"])


def minari_truncated(root, tasks):
    data = _minari(root, tasks)
    path = data / "main_data.hdf5"
    path.write_bytes(path.read_bytes()[:2000])
    return root, data, "unreadable or truncated Minari dataset"


def minari_missing_key(root, tasks):
    data = _minari(root, tasks)
    _h5_edit(data, lambda ep: ep.__delitem__("rewards"))
    return root, data, "unreadable or truncated Minari dataset (KeyError"


def minari_wrong_shape(root, tasks):
    return root, _minari(root, tasks, first=minari_episodes(4, obs_dim=12)), "observations must be [T, 39], got [12, 12]"


def minari_nan(root, tasks):
    episodes = minari_episodes(4)
    episodes[1]["rewards"][3] = np.nan
    return root, _minari(root, tasks, first=episodes), "(episode 1): rewards contain NaN or inf"


def minari_empty_task(root, tasks):
    return root, _minari(root, tasks, first=minari_episodes(2)), "2 episodes; need more than 2"


def minari_wrong_dtype(root, tasks):
    data = _minari(root, tasks)

    def edit(ep):
        values = ep["terminations"][()].astype(np.float32)
        del ep["terminations"]
        ep["terminations"] = values
    _h5_edit(data, edit)
    return root, data, "(episode 1): terminations must be boolean, got float32"


def minari_unknown_task(root, tasks):
    _minari(root, tasks)
    write_minari_dataset(root, "metaworld/fly-v3/expert-v0", minari_episodes(4))
    return root, root / "metaworld/fly-v3/expert-v0/data/metadata.json", "is for 'fly-v3', not a Meta-World v3 task"


ROWS = {
    "ours: truncated task file": ours_truncated,
    "ours: truncated npz (manifest rewritten to match it)": ours_truncated_npz,
    "ours: missing key": ours_missing_key,
    "ours: wrong shape": ours_wrong_shape,
    "ours: NaN values": ours_nan,
    "ours: inf values": ours_inf,
    "ours: empty task (no episodes)": ours_empty_task,
    "ours: wrong dtype (float64 observations)": ours_wrong_dtype,
    "ours: wrong dtype (float terminals)": ours_wrong_flag_dtype,
    "ours: unknown task name in the manifest": ours_unknown_task,
    "ours: truncated manifest": ours_unreadable_manifest,
    "ours: generation killed (no manifest)": ours_interrupted,
    "original: truncated episode file": original_truncated,
    "original: missing key": original_missing_key,
    "original: wrong shape": original_wrong_shape,
    "original: NaN values": original_nan,
    "original: empty task (no episode files)": original_empty_task,
    "original: wrong dtype (text actions)": original_wrong_dtype,
    "original: unknown task name (folder)": original_unknown_task,
    "minari: truncated hdf5 file": minari_truncated,
    "minari: missing key (episode without rewards)": minari_missing_key,
    "minari: wrong shape": minari_wrong_shape,
    "minari: NaN values": minari_nan,
    "minari: empty task (prompts only)": minari_empty_task,
    "minari: wrong dtype (float terminations)": minari_wrong_dtype,
    "minari: unknown task name (dataset id)": minari_unknown_task,
}


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_data_gives_one_line_naming_the_file(tmp_path, row):
    data, bad, needle = ROWS[row](tmp_path / "data", TASKS)
    with pytest.raises(DataError) as err:
        load_dataset(data, TASKS)
    msg = str(err.value)
    assert "\n" not in msg and needle in msg and str(bad) in msg, msg


@pytest.mark.parametrize("row", list(ROWS))
def test_data_cli_prints_the_line_and_exits_2(tmp_path, row):
    data, bad, needle = ROWS[row](tmp_path / "data", TASKS)
    proc = subprocess.run([sys.executable, "-m", "harmodt.data", "inspect", str(data)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and str(bad) in proc.stderr


def test_train_cli_prints_the_line_and_exits_2(tmp_path):
    data, bad, needle = ours_nan(tmp_path / "data", TASKS)
    cmd = [sys.executable, "-m", "harmodt.train", "--data", str(data), "--tasks", ",".join(TASKS), "--steps", "1",
           "--eval-episodes", "0", "--out", str(tmp_path / "run"), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr == f"error: {bad} (training data): {needle}\n", proc.stderr


def table(base: Path, tasks: list[str]) -> str:
    """The markdown table of every row, measured by running the training CLI on it."""
    lines = ["| bad input | error line | exit code |", "|---|---|---|"]
    for i, (row, build) in enumerate(ROWS.items()):
        data, _, _ = build(base / f"row{i:02d}", tasks)
        proc = subprocess.run([sys.executable, "-m", "harmodt.train", "--data", str(data), "--steps", "1", "--eval-episodes", "0",
                               "--out", str(base / "run")], capture_output=True, text=True)
        err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        shown = err[-1] if len(err) == 1 else f"{len(err)} lines: " + " / ".join(err[-2:])
        shown = shown.replace(str(base) + "/", "").replace("|", "/")
        lines.append(f"| {row} | {'`` ' + shown + ' ``' if '`' in shown else '`' + shown + '`'} | {proc.returncode} |")
    return "\n".join(lines)


if __name__ == "__main__":
    from harmodt.tasks import MT5

    print(table(Path(sys.argv[1]), MT5))
