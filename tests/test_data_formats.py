"""Loading the original HarmoDT layout (task folders of numbered npz files), its errors, the task
lists and the data CLI's error reporting."""

import numpy as np
import pytest

from harmodt.data import DataError, detect_layout, load_dataset
from harmodt.tasks import parse_tasks


def write_episode(path, t=20, **override):
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    arrs = {"observations": rng.normal(size=(t, 39)).astype(np.float32), "actions": rng.uniform(-1, 1, (t, 4)).astype(np.float32),
            "rewards": rng.uniform(0, 1, t).astype(np.float32), "dones": np.eye(1, t, t - 1, dtype=bool)[0]}
    arrs.update(override)
    arrs = {k: v for k, v in arrs.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrs)


def original_folder(root, n=12, task="reach-v2"):
    for i in range(n):
        write_episode(root / task / f"{i}.npz", t=20 + i)
    return root


def test_original_layout_prompts_are_last_two_in_numeric_order(tmp_path):
    root = original_folder(tmp_path)
    assert detect_layout(root) == "original"
    td = load_dataset(root)["reach-v3"]  # -v2 folder maps to the v3 task
    assert len(td.trajectories) == 10 and len(td.prompts) == 2
    # 10.npz and 11.npz (lengths 30, 31) are the prompts, not 8/9 as a string sort would give
    assert [len(p.rewards) for p in td.prompts] == [30, 31]
    assert [len(t.rewards) for t in td.trajectories] == list(range(20, 30))


def test_original_layout_terminals_and_v3_names(tmp_path):
    for i in range(4):
        write_episode(tmp_path / "push-v3" / f"{i}.npz", dones=None, terminals=np.zeros(20, bool))
    td = load_dataset(tmp_path, ["push-v3"])["push-v3"]
    assert len(td.trajectories) == 2


@pytest.mark.parametrize("override,needle", [
    ({"actions": None}, "missing key 'actions'"),
    ({"dones": None}, "missing key 'dones'"),
    ({"observations": np.zeros((20, 12), np.float32)}, "observations must be"),
    ({"actions": np.zeros((19, 4), np.float32)}, "actions has 19 steps"),
    ({"rewards": np.full(20, np.nan, np.float32)}, "NaN or inf"),
    ({"rewards": np.float32(1.0)}, "rewards must be [T]"),
    ({"dones": np.zeros((20, 3), bool)}, "dones must be [T]"),
    ({"actions": np.array(["a"] * 20)}, "non-numeric"),
    ({"rewards": np.ones((20, 1), np.float32)}, None),  # a [T, 1] column is accepted
    ({"observations": np.full((20, 39), np.inf, np.float32)}, "NaN or inf"),
])
def test_original_layout_bad_episode_errors_name_the_file(tmp_path, override, needle):
    root = original_folder(tmp_path, n=4)
    write_episode(root / "reach-v2" / "1.npz", **override)
    if needle is None:
        assert load_dataset(root)["reach-v3"].trajectories[1].rewards.shape == (20,)
        return
    with pytest.raises(DataError) as err:
        load_dataset(root)
    assert needle in str(err.value) and "1.npz" in str(err.value)


def test_unreadable_and_empty_inputs(tmp_path):
    root = original_folder(tmp_path, n=4)
    (root / "reach-v2" / "2.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="2.npz.*unreadable or truncated"):
        load_dataset(root)
    (tmp_path / "empty" / "reach-v2").mkdir(parents=True)
    with pytest.raises(DataError, match="0 episode files"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no folder for task 'push-v3'"):
        load_dataset(root, ["push-v3"])
    write_episode(tmp_path / "zero" / "reach-v2" / "0.npz", t=0)
    for i in (1, 2):
        write_episode(tmp_path / "zero" / "reach-v2" / f"{i}.npz")
    with pytest.raises(DataError, match="0.npz: empty episode"):
        load_dataset(tmp_path / "zero")


def test_task_lists():
    assert len(parse_tasks("MT50")) == 50 and parse_tasks("MT5") == parse_tasks("MT50")[:5]
    assert parse_tasks("MT10")[0] == "reach-v3" and len(parse_tasks("MT30")) == 30
    assert parse_tasks("reach-v2,push") == ["reach-v3", "push-v3"]
    with pytest.raises(ValueError, match="nope"):
        parse_tasks("reach-v3,nope")


def test_data_cli_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "harmodt.data", "inspect", str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "harmodt.data", "generate", "--tasks", "MT7", "--episodes", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "MT7" in proc.stderr
