"""Task names for unseen-task studies: goal variations of one Meta-World task (ML1 train/test
goals, fixed per task and hidden from the observation) and Meta-World's ML10/ML45 splits."""

import pickle
import subprocess
import sys

import numpy as np
import pytest

from harmodt.tasks import ML1_SEED, MT50, goal_of, parse_tasks, task_seed

PP = "pick-place-v3"


@pytest.fixture(scope="module")
def ml1():
    import metaworld

    return metaworld.ML1(PP, seed=ML1_SEED)


def _rand_vec(task) -> np.ndarray:
    return pickle.loads(task.data)["rand_vec"]  # pick-place: object position (3), goal position (3)


# ---- names --------------------------------------------------------------------------------------
def test_goal_names_parse_and_slice():
    assert parse_tasks("ML1-pick-place-train[:20]") == [f"{PP}@g{i}" for i in range(20)]
    assert parse_tasks("ML1-pick-place-test[:5]") == [f"{PP}@test{i}" for i in range(5)]
    assert parse_tasks("ML1-pick-place-train") == [f"{PP}@g{i}" for i in range(50)]
    assert parse_tasks("ML1-pick-place-v3-test[5:11:3]") == [f"{PP}@test5", f"{PP}@test8"]
    assert parse_tasks("ml1-reach-test[-1]") == ["reach-v3@test49"]
    assert parse_tasks("pick-place@g7,pick-place-v2@test3,reach") == [f"{PP}@g7", f"{PP}@test3", "reach-v3"]
    assert parse_tasks("ML1-pick-place-train[:2],ML10-test")[:3] == [f"{PP}@g0", f"{PP}@g1", "drawer-open-v3"]
    assert goal_of(f"{PP}@g7") == (PP, "train", 7) and goal_of(f"{PP}@test3") == (PP, "test", 3)
    assert goal_of("reach-v3") == ("reach-v3", None, None)
    # a goal variation's data stream is its own, apart from its base task's and the other split's
    seeds = {task_seed(0, t) for t in (PP, f"{PP}@g0", f"{PP}@test0", f"{PP}@g1")}
    assert len(seeds) == 4 and task_seed(0, "reach-v3") == task_seed(0, "reach-v3")


def test_ml10_ml45_lists_are_metaworlds():
    from metaworld.env_dict import ML10_V3, ML45_V3

    assert parse_tasks("ML10-train") == list(ML10_V3["train"]) and len(parse_tasks("ml10-train")) == 10
    assert parse_tasks("ML10-test") == list(ML10_V3["test"])
    assert set(parse_tasks("ML10-test")) == {"drawer-open-v3", "door-close-v3", "shelf-place-v3", "sweep-into-v3", "lever-pull-v3"}
    assert parse_tasks("ML45-train") == list(ML45_V3["train"]) and len(parse_tasks("ML45-train")) == 45
    assert parse_tasks("ML45-test") == list(ML45_V3["test"])
    for split in ("ML10-train", "ML10-test", "ML45-train", "ML45-test"):
        assert set(parse_tasks(split)) <= set(MT50)
    assert not set(parse_tasks("ML10-train")) & set(parse_tasks("ML10-test"))
    assert not set(parse_tasks("ML45-train")) & set(parse_tasks("ML45-test"))


@pytest.mark.parametrize("bad, needle", [
    ("pick-place@g50", "goal index 50 out of range"),
    ("pick-place@test-1", "pick-place@test-1"),
    ("fly@g1", "'fly-v3' is not a Meta-World v3 task"),
    ("ML1-fly-train", "'ML1-fly-train'"),
    ("ML1-pick-place-train[7:7]", "empty slice [7:7]"),
    ("ML1-pick-place-train[x]", "bad slice [x]"),
    ("ML1-pick-place-train[50]", "index out of range"),
    ("ML1-pick-place-valid", "'ML1-pick-place-valid'"),
    ("ML11-train", "'ML11-train'"),
    ("pick-place@g1,ML1-pick-place-train[:2]", "listed twice"),
])
def test_bad_names_give_one_line(bad, needle):
    with pytest.raises(ValueError) as err:
        parse_tasks(bad)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_bad_name_in_the_clis_is_one_error_line(tmp_path):
    from harmodt.config import ConfigError, TrainConfig, validate

    with pytest.raises(ConfigError, match=r"--tasks: unknown task 'pick-place@g99'"):
        validate(TrainConfig(tasks="pick-place@g99"))
    proc = subprocess.run([sys.executable, "-m", "harmodt.data", "generate", "--tasks", "ML1-pick-place-tests[:3]",
                           "--episodes", "1", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "'ML1-pick-place-tests[:3]'" in proc.stderr


# ---- environments -------------------------------------------------------------------------------
def test_goal_is_fixed_hidden_and_reproducible(ml1):
    from harmodt.envs import fixed_goal, make_env, make_vector_env

    a, b = make_env(f"{PP}@g3", 0), make_env(f"{PP}@g3", 12345)
    first, _ = a.reset()
    assert np.array_equal(first[36:39], np.zeros(3))  # hidden, as ML1 presents it
    np.testing.assert_allclose(first[4:7], _rand_vec(ml1.train_tasks[3])[:3], atol=1e-6)  # ML1's object position
    np.testing.assert_allclose(fixed_goal(f"{PP}@g3"), _rand_vec(ml1.train_tasks[3])[3:])  # ML1's goal
    for _ in range(3):  # steps then a new episode: the same start, whatever the seed
        for _ in range(5):
            a.step(np.random.uniform(-1, 1, 4))
        np.testing.assert_array_equal(a.reset()[0], first)
        assert np.array_equal(a.unwrapped._get_pos_goal(), fixed_goal(f"{PP}@g3"))
    np.testing.assert_array_equal(b.reset()[0], first)
    # other goals differ: another train goal, a test goal, and every test goal from every train goal
    np.testing.assert_allclose(fixed_goal(f"{PP}@test3"), _rand_vec(ml1.test_tasks[3])[3:])
    goals = [fixed_goal(t) for t in (f"{PP}@g3", f"{PP}@g4", f"{PP}@test3")]
    assert min(np.abs(goals[i] - goals[j]).max() for i in range(3) for j in range(i)) > 1e-3
    # a random-goal task still shows its goal and draws a new one per reset
    r = make_env(PP, 0)
    g0, g1 = r.reset()[0][36:39], r.reset()[0][36:39]
    assert np.abs(g0).sum() > 0 and not np.array_equal(g0, g1)
    # vector envs (evaluation) build the same envs from the names
    v = make_vector_env([f"{PP}@g3", f"{PP}@test3"], [1, 2])
    obs, _ = v.reset(seed=None)
    np.testing.assert_array_equal(obs[0], first)
    assert not np.array_equal(obs[1], first)
    v.close()


# ---- data ---------------------------------------------------------------------------------------
def test_held_out_goals_never_appear_in_training_data(tmp_path, ml1):
    """Generate ML1-pick-place-train[:3]: every stored episode's goal and object start is its own
    train goal's, and none is any of the 50 test goals."""
    from harmodt.data import generate, load_dataset

    tasks = parse_tasks("ML1-pick-place-train[:3]")
    data_dir = tmp_path / "data"
    manifest = generate(tasks, 1, str(data_dir), seed=0, workers=1, prompt_episodes=1, progress=False)
    assert manifest["tasks"] == tasks and all(manifest["files"][t]["prompt_success"] == [True] for t in tasks)
    data = load_dataset(data_dir)
    assert list(data) == tasks
    test_vecs = np.stack([_rand_vec(t) for t in ml1.test_tasks])  # (50, 6)
    for i, task in enumerate(tasks):
        z = np.load(data_dir / f"{task}.npz")
        goals = np.concatenate([z["episode_goals"], z["prompt_episode_goals"]])  # (2, 3)
        np.testing.assert_allclose(goals, np.tile(_rand_vec(ml1.train_tasks[i])[3:], (2, 1)), atol=1e-6)
        starts = np.stack([tr.observations[0] for tr in data[task].trajectories + data[task].prompts])
        assert not starts[:, 36:39].any()  # the goal is not in the observations
        np.testing.assert_allclose(starts[:, 4:7], np.tile(_rand_vec(ml1.train_tasks[i])[:3], (2, 1)), atol=1e-6)
        for g in goals:
            assert np.abs(test_vecs[:, 3:] - g).max(axis=1).min() > 1e-3
        for s in starts:
            assert np.abs(test_vecs[:, :3] - s[4:7]).max(axis=1).min() > 1e-3
    # the goal variations survive a Minari export (whose ids cannot hold '@') and its import
    from harmodt.data.minari import export_minari

    pytest.importorskip("minari")
    ids = export_minari(data_dir, tmp_path / "minari")  # (a Minari root beside the data folder, not in it)
    assert ids[0] == "metaworld/pick-place-v3/harmodt-g0-near-optimal-v0"
    back = load_dataset(tmp_path / "minari")
    assert list(back) == tasks
    for task in tasks:
        np.testing.assert_array_equal(back[task].trajectories[0].actions, data[task].trajectories[0].actions)


def test_expert_is_told_the_hidden_goal():
    from harmodt.envs import ScriptedExpert, fixed_goal, make_env

    task = f"{PP}@test2"
    obs, _ = make_env(task, 0).reset()
    expert, plain = ScriptedExpert(task), ScriptedExpert(PP)
    seen = obs.copy()
    seen[36:39] = fixed_goal(task)
    np.testing.assert_array_equal(expert(obs), plain(seen))
    assert np.array_equal(obs[36:39], np.zeros(3))  # the caller's observation is untouched
