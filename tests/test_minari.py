"""Minari datasets: export of our layout, reading Minari as a third --data layout, the round trip
ours -> Minari -> ours, prompt choice, qualities, and the errors of this layout."""

import json
import subprocess
import sys
import warnings

import minari
import numpy as np
import pytest

from _data_folders import minari_episodes, write_minari_dataset, write_ours
from harmodt.data import DataError, detect_layout, load_dataset
from harmodt.tasks import task_seed
from harmodt.data.minari import dataset_id, export_minari

FIELDS = ("observations", "actions", "rewards", "dones", "successes", "terminals", "truncations")
TASKS = ("reach-v3", "push-v3")


def assert_same_episodes(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for f in FIELDS:
            u, v = getattr(x, f), getattr(y, f)
            assert u.dtype == v.dtype and np.array_equal(u, v), f


def assert_same_data(a: dict, b: dict):
    assert list(a) == list(b)
    for task in a:
        assert_same_episodes(a[task].trajectories, b[task].trajectories)
        assert_same_episodes(a[task].prompts, b[task].prompts)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("minari")
    ours = write_ours(base / "ours", TASKS, episodes=5, prompts=3)
    ids = export_minari(ours, base / "root")
    return ours, base / "root", ids


def test_round_trip_gives_identical_episodes(exported):
    ours, root, ids = exported
    assert ids == [dataset_id(t, "near-optimal") for t in TASKS] == [f"metaworld/{t}/harmodt-near-optimal-v0" for t in TASKS]
    assert detect_layout(root) == "minari"
    a, b = load_dataset(ours), load_dataset(root)
    assert_same_data(a, b)
    reach = b["reach-v3"]
    assert len(reach.trajectories) == 5 and len(reach.prompts) == 3  # the prompt count the export recorded
    assert reach.trajectories[1].terminals[-1] and not reach.trajectories[0].terminals.any()  # kept apart from truncation
    assert reach.trajectories[1].successes.sum() == len(reach.trajectories[1].rewards) - 3


def test_round_trip_of_generated_data(tmp_path):
    """Real Meta-World rollouts (float32 observations straight from the env) survive the trip,
    and the datasets carry the curriculum and generation metadata."""
    from harmodt.data import generate

    manifest = generate(["reach-v3"], 2, str(tmp_path / "gen"), seed=4, workers=1, prompt_episodes=1, progress=False)
    export_minari(tmp_path / "gen", tmp_path / "root")
    assert_same_data(load_dataset(tmp_path / "gen"), load_dataset(tmp_path / "root"))
    ds = minari.MinariDataset(tmp_path / "root" / dataset_id("reach-v3", "near-optimal") / "data")
    meta = ds.storage.metadata["harmodt"]
    assert meta["settings"] == manifest["settings"] and meta["episode_success"] == manifest["files"]["reach-v3"]["episode_success"]
    assert meta["curriculum_success_by_decile"][0] == manifest["curriculum_success_by_decile"][0]
    assert ds.total_episodes == 3 and ds.total_steps == 1500


def test_exported_datasets_are_valid_minari(exported, monkeypatch):
    _, root, ids = exported
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    assert sorted(minari.list_local_datasets()) == sorted(ids)
    ds = minari.load_dataset(ids[0])
    assert ds.total_episodes == 5 + 3 and ds.observation_space.shape == (39,) and ds.action_space.shape == (4,)
    ep = ds[0]
    assert ep.observations.shape == (21, 39) and ep.actions.shape == (20, 4) and ep.infos["success"].shape == (21,)
    spec = ds.spec.env_spec
    assert spec.entry_point == "harmodt.envs:make_env" and spec.max_episode_steps == 500
    assert spec.kwargs == {"task": "reach-v3", "seed": task_seed(0, "reach-v3") % 2**31}
    meta = ds.storage.metadata["harmodt"]
    assert meta["task"] == "reach-v3" and meta["quality"] == "near-optimal" and meta["prompt_episodes"] == 3
    assert meta["settings"]["curriculum"] == "synthetic" and meta["episode_success"] == [False, True, False, True, False]
    roles = [m["harmodt_role"] for m in ds.storage.get_episode_metadata(range(8))]
    assert roles == ["training"] * 5 + ["prompt"] * 3


def test_recovered_environment_is_the_generators(exported):
    """The stored env spec rebuilds harmodt's env with the generator's seed: same first goal."""
    from harmodt.envs import make_env

    _, root, ids = exported
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = minari.MinariDataset(root / ids[0] / "data").recover_environment()
        obs = env.reset()[0]
    ref = make_env("reach-v3", task_seed(0, "reach-v3") % 2**31).reset()[0]
    assert np.array_equal(obs[36:39], ref[36:39])


def test_dataset_ids_and_single_dataset_folders(exported, monkeypatch):
    ours, root, ids = exported
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    monkeypatch.chdir(root.parent)  # ids are not folders here: they resolve under the Minari root
    assert detect_layout(ids[1]) == "minari"
    by_ids = load_dataset(",".join(ids[::-1]), ["push-v3"])
    assert list(by_ids) == ["push-v3"]
    assert_same_episodes(by_ids["push-v3"].trajectories, load_dataset(ours, ["push-v3"])["push-v3"].trajectories)
    assert list(load_dataset("metaworld")) == list(TASKS)  # a namespace: every dataset in it
    one = load_dataset(root / ids[0])  # one dataset's own folder
    assert list(one) == ["reach-v3"]
    with pytest.raises(DataError, match="nor is it a Minari dataset id"):
        load_dataset("metaworld/reach-v3/harmodt-expert-v0")


def test_qualities_and_episode_subsets(exported, tmp_path):
    ours, root, _ = exported
    for quality, per_task in (("sub-optimal", None), ("near-optimal", 2), ("sub-optimal", 1)):
        assert_same_data(load_dataset(ours, quality=quality, episodes_per_task=per_task),
                         load_dataset(root, quality=quality, episodes_per_task=per_task))
    # a folder generated for one quality exports under that quality's id and is taken whole
    sub = write_ours(tmp_path / "sub", ["reach-v3"], episodes=3, quality="sub-optimal")
    assert export_minari(sub, tmp_path / "root") == ["metaworld/reach-v3/harmodt-sub-optimal-v0"]
    assert len(load_dataset(tmp_path / "root", quality="sub-optimal")["reach-v3"].trajectories) == 3
    with pytest.raises(DataError, match="holds sub-optimal data; near-optimal data cannot be taken from it"):
        load_dataset(tmp_path / "root")
    # beside a near-optimal dataset of the same task, each quality picks its own
    export_minari(write_ours(tmp_path / "near", ["reach-v3"], episodes=6), tmp_path / "root")
    assert len(load_dataset(tmp_path / "root")["reach-v3"].trajectories) == 6
    assert len(load_dataset(tmp_path / "root", quality="sub-optimal")["reach-v3"].trajectories) == 3


def _foreign_dataset(root, ds_id, episodes=5, with_success=True):
    return write_minari_dataset(root, ds_id, minari_episodes(episodes, with_success=with_success))


def test_foreign_dataset_prompts_are_its_last_two_episodes(tmp_path):
    _foreign_dataset(tmp_path, "metaworld/reach-v2/expert-v1", episodes=5)  # a -v2 name maps to v3
    td = load_dataset(tmp_path)["reach-v3"]
    assert [t.rewards[0] for t in td.trajectories] == [0.0, 1.0, 2.0]
    assert [t.rewards[0] for t in td.prompts] == [3.0, 4.0]  # the last 2, as in the original layout
    tr = td.trajectories[0]
    assert tr.observations.dtype == np.float32 and tr.observations.shape == (12, 39)  # the final observation dropped
    assert tr.successes.tolist() == (np.arange(1, 13) > 5).tolist()  # infos[1:]: each step's flag
    assert tr.terminals[-1] and tr.dones[-1] and not tr.truncations.any()


def test_foreign_dataset_without_success_infos(tmp_path):
    _foreign_dataset(tmp_path, "metaworld/push-v3/random-v0", episodes=3, with_success=False)
    td = load_dataset(tmp_path)["push-v3"]
    assert len(td.trajectories) == 1 and td.trajectories[0].successes is None


def test_several_datasets_for_a_task_need_an_id(tmp_path):
    _foreign_dataset(tmp_path, "metaworld/reach-v3/expert-v0")
    _foreign_dataset(tmp_path, "metaworld/reach-v3/medium-v0")
    with pytest.raises(DataError, match="2 Minari datasets for reach-v3 .*name the one to use"):
        load_dataset(tmp_path)
    assert len(load_dataset(tmp_path / "metaworld" / "reach-v3" / "medium-v0")["reach-v3"].trajectories) == 3


def test_export_refuses_what_it_cannot_write(exported, tmp_path):
    ours, root, ids = exported
    with pytest.raises(DataError, match=f"{ids[0]}: a Minari dataset with this id exists"):
        export_minari(ours, root)
    with pytest.raises(DataError, match="export reads our layout"):
        export_minari(root, tmp_path / "other")
    assert not any(p.name.startswith(".harmodt-export") for p in root.iterdir())  # no temporary root left


def test_killed_export_leaves_nothing_that_loads(exported, tmp_path):
    """A dataset still in the export's hidden temporary root is not found by the loader."""
    import shutil

    _, root, ids = exported
    partial = tmp_path / "root"
    shutil.copytree(root / ids[0], partial / ".harmodt-export-99" / ids[0])
    with pytest.raises(DataError, match="no task folders"):
        load_dataset(partial)


def test_missing_minari_is_one_clear_line(exported, monkeypatch):
    _, root, _ = exported
    monkeypatch.setitem(sys.modules, "minari", None)  # import minari now raises ImportError
    with pytest.raises(DataError) as err:
        load_dataset(root)
    msg = str(err.value)
    assert "\n" not in msg and str(root) in msg and "pip install 'harmodt[minari]'" in msg


def test_training_loads_a_minari_root(exported):
    from harmodt.config import TrainConfig
    from harmodt.train import load_training_data

    ours, root, _ = exported
    cfg = TrainConfig(data=str(root), tasks="push-v3,reach-v3", episodes_per_task=3)
    got = load_training_data(cfg, ["push-v3", "reach-v3"])
    assert list(got) == ["push-v3", "reach-v3"]
    assert_same_data(got, load_dataset(ours, ["push-v3", "reach-v3"], episodes_per_task=3))


def test_export_and_inspect_cli(tmp_path):
    ours = write_ours(tmp_path / "ours", ["reach-v3"], episodes=3)
    run = [sys.executable, "-m", "harmodt.data"]
    proc = subprocess.run(run + ["export", str(ours), "--minari", str(tmp_path / "root")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "wrote Minari dataset metaworld/reach-v3/harmodt-near-optimal-v0" in proc.stdout
    proc = subprocess.run(run + ["inspect", str(tmp_path / "root")], capture_output=True, text=True)
    assert proc.returncode == 0 and "minari layout, 1 tasks" in proc.stdout and "prompts 2" in proc.stdout
    proc = subprocess.run(run + ["export", str(ours), "--minari", str(tmp_path / "root")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr
    meta = json.loads((tmp_path / "root" / "metaworld/reach-v3/harmodt-near-optimal-v0/data/metadata.json").read_text())
    assert meta["harmodt"]["task"] == "reach-v3" and meta["total_episodes"] == 5
