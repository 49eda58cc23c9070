"""Environments and data generation: random goals, determinism, format, manifest, curriculum, atomic
writes, and the errors of our layout's loader."""

import json
import os

import numpy as np
import pytest

from harmodt.data import DataError, detect_layout, load_dataset
from harmodt.data.generator import epsilon, generate
from harmodt.envs import ScriptedExpert, make_env, make_vector_env

TASKS = ["reach-v3", "drawer-close-v3"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    manifest = generate(TASKS, 3, str(out), seed=7, workers=2, prompt_episodes=2, progress=False)
    return out, manifest


def test_generated_format_and_manifest(generated):
    out, manifest = generated
    assert detect_layout(out) == "ours"
    assert manifest["tasks"] == TASKS and manifest["settings"]["seed"] == 7
    data = load_dataset(out)
    for t in TASKS:
        td = data[t]
        assert len(td.trajectories) == 3 and len(td.prompts) == 2
        tr = td.trajectories[0]
        assert tr.observations.dtype == np.float32 and tr.observations.shape == (500, 39)
        assert tr.actions.shape == (500, 4) and np.abs(tr.actions).max() <= 1.0
        assert tr.rewards.shape == (500,) and tr.dones[-1] and not tr.dones[:-1].any()
        assert tr.successes.dtype == bool
        rec = manifest["files"][t]
        assert rec["episodes"] == 3 and rec["steps"] == 1500 and len(rec["sha256"]) == 64
        assert all(rec["prompt_success"])  # noise-free expert prompts
    assert len(manifest["curriculum_success_by_decile"]) == 10


def test_generation_is_deterministic_and_worker_independent(generated, tmp_path):
    out, _ = generated
    generate(TASKS[:1], 3, str(tmp_path), seed=7, workers=1, prompt_episodes=2, progress=False)
    a = np.load(out / "reach-v3.npz")
    b = np.load(tmp_path / "reach-v3.npz")
    assert set(a.files) == set(b.files)
    for k in a.files:
        assert np.array_equal(a[k], b[k]), k
    other = tmp_path / "s8"
    generate(TASKS[:1], 3, str(other), seed=8, workers=1, prompt_episodes=2, progress=False)
    assert not np.array_equal(np.load(other / "reach-v3.npz")["observations"], a["observations"])


def test_curriculum_goes_from_random_to_expert():
    eps = [epsilon(e, 100) for e in range(100)]
    assert eps[0] == 1.0 and min(eps[:10]) > 0.88 and eps[-1] == 0.0 and max(eps[81:]) == 0.0
    assert all(x >= y for x, y in zip(eps, eps[1:]))  # never increases


def test_finished_tasks_are_reused_and_temp_files_ignored(generated, tmp_path):
    out, manifest = generated
    # a leftover temporary file from a killed run is never read
    (out / ".push-v3.npz.tmp-123").write_bytes(b"half a file")
    assert set(load_dataset(out)) == set(TASKS)
    # re-running with the same settings reuses the finished files (same checksum, no new rollouts)
    mtime = os.path.getmtime(out / "reach-v3.npz")
    m2 = generate(TASKS, 3, str(out), seed=7, workers=1, prompt_episodes=2, progress=False)
    assert os.path.getmtime(out / "reach-v3.npz") == mtime
    assert m2["files"]["reach-v3"]["sha256"] == manifest["files"]["reach-v3"]["sha256"]


def test_qualities_and_episode_subsets(generated):
    out, _ = generated
    near = load_dataset(out, ["reach-v3"])["reach-v3"].trajectories
    sub = load_dataset(out, ["reach-v3"], quality="sub-optimal")["reach-v3"].trajectories
    assert len(near) == 3 and len(sub) == 1
    assert np.array_equal(sub[0].observations, near[0].observations)  # the first (noisier) half
    two = load_dataset(out, ["reach-v3"], episodes_per_task=2)["reach-v3"].trajectories
    assert np.array_equal(two[0].observations, near[0].observations) and np.array_equal(two[1].observations, near[2].observations)


def test_checksum_mismatch_and_truncated_file(generated, tmp_path):
    out, _ = generated
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    raw = (bad / "reach-v3.npz").read_bytes()
    (bad / "reach-v3.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=f"reach-v3.npz: {len(raw) // 2} bytes, .*manifest.json lists {len(raw)} .truncated"):
        load_dataset(bad, ["reach-v3"])
    (bad / "reach-v3.npz").write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))  # same size, one bit changed
    with pytest.raises(DataError, match="reach-v3.npz: checksum does not match"):
        load_dataset(bad, ["reach-v3"])
    with pytest.raises(DataError, match="push-v3"):
        load_dataset(out, ["push-v3"])




def test_stored_actions_follow_the_curriculum(generated):
    """Episode 0 (eps = 1) is almost all uniform random actions; the last (eps = 0) is the expert's."""
    out, _ = generated
    z = np.load(out / "reach-v3.npz")
    expert = ScriptedExpert("reach-v3")
    eps = z["episode_epsilon"]
    assert eps[0] == 1.0 and eps[-1] == 0.0
    far = []
    for s, n in zip(z["episode_starts"], z["episode_lengths"]):
        obs, act = z["observations"][s : s + n].astype(np.float64), z["actions"][s : s + n]
        ref = np.stack([expert(o) for o in obs])
        far.append(float(np.mean(np.abs(act - ref).max(axis=1) > 0.5)))  # not the expert's action
    assert far[0] > 0.8 and far[-1] < 0.05 and far[0] > far[1] > far[-1], far


def test_missing_key_in_our_file_names_the_file(generated, tmp_path):
    out, manifest = generated
    import hashlib
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    z = dict(np.load(bad / "reach-v3.npz"))
    del z["prompt_actions"]
    np.savez(bad / "reach-v3.npz", **z)
    m = json.loads((bad / "manifest.json").read_text())
    m["files"]["reach-v3"]["sha256"] = hashlib.sha256((bad / "reach-v3.npz").read_bytes()).hexdigest()
    m["files"]["reach-v3"]["bytes"] = (bad / "reach-v3.npz").stat().st_size
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="reach-v3.npz: missing key 'prompt_actions'"):
        load_dataset(bad, ["reach-v3"])


# ---- environments ----------------------------------------------------------------------------
def _goals(env, n=3):
    return [env.reset()[0][36:39].copy() for _ in range(n)]


def test_env_goals_random_per_episode_and_seeded():
    a, b, c = make_env("reach-v3", 5), make_env("reach-v3", 5), make_env("reach-v3", 6)
    ga, gb, gc = _goals(a), _goals(b), _goals(c)
    assert a.reset()[0].shape == (39,) and np.abs(ga[0]).sum() > 0  # the goal is visible
    assert not np.allclose(ga[0], ga[1]) and not np.allclose(ga[1], ga[2])  # new goal per episode
    assert all(np.array_equal(x, y) for x, y in zip(ga, gb))  # same seed, same goals
    assert not np.allclose(ga[0], gc[0])  # another seed, other goals
    # reset(seed=...) does not change the goal sequence; only the construction seed does
    d = make_env("reach-v3", 5)
    assert np.array_equal(d.reset(seed=123)[0][36:39], ga[0])


def test_env_truncates_at_500_and_expert_succeeds():
    env, expert = make_env("drawer-close-v3", 1), ScriptedExpert("drawer-close-v3")
    obs, _ = env.reset()
    success = False
    for t in range(500):
        act = expert(obs)
        assert act.shape == (4,) and np.abs(act).max() <= 1.0
        obs, _, term, trunc, info = env.step(act)
        success |= bool(info["success"])
        assert trunc == (t == 499) and not term
    assert success


def test_vector_env_copies_of_a_task_get_their_own_goals():
    envs = make_vector_env(["reach-v3", "reach-v3", "push-v3"], [1, 2, 3])
    obs, _ = envs.reset()
    assert obs.shape == (3, 39) and not np.allclose(obs[0, 36:39], obs[1, 36:39])
    obs, rew, term, trunc, info = envs.step(np.zeros((3, 4)))
    assert rew.shape == (3,) and "success" in info
    envs.close()
    with pytest.raises(ValueError, match="2 tasks but 1 seeds"):
        make_vector_env(["reach-v3", "push-v3"], [1])


@pytest.mark.parametrize("task", ["door-open-v3", "door-close-v3", "reach-v3"])
def test_scripted_expert_leaves_the_observation_unchanged(task):
    """door-open-v3's and door-close-v3's shipped policies write their target offsets into the
    array they are given; the expert must hand them a copy, or the caller's observation (and the
    generated data) changes."""
    env, expert = make_env(task, 3), ScriptedExpert(task)
    obs, _ = env.reset()
    for _ in range(40):
        before = obs.copy()
        act = expert(obs)
        assert np.array_equal(obs, before)
        obs = env.step(act)[0]


def test_stored_observations_are_the_envs_own(tmp_path):
    """Replaying an expert episode's stored actions in an env built with the generator's seed
    shows exactly the stored observations (door-open-v3: its policy alters what it reads). The
    prompt episode is the scripted expert's at every step."""
    from harmodt.tasks import task_seed

    task = "door-open-v3"
    generate([task], 1, str(tmp_path), seed=3, workers=1, prompt_episodes=1, progress=False)
    z = np.load(tmp_path / f"{task}.npz")
    env = make_env(task, (task_seed(3, task) + 1_000_003) % (2**31))  # the prompt episodes' env
    obs, _ = env.reset()
    for t in range(60):
        np.testing.assert_array_equal(z["prompt_observations"][t], obs.astype(np.float32))
        obs = env.step(z["prompt_actions"][t])[0]


def test_data_of_the_first_generator_version_are_refused_for_the_door_tasks(generated, tmp_path):
    import shutil

    out, _ = generated
    old = tmp_path / "v1"
    shutil.copytree(out, old)
    m = json.loads((old / "manifest.json").read_text())
    del m["settings"]["generator_version"]  # as version 1 wrote it
    m["files"]["door-open-v3"] = dict(m["files"]["reach-v3"], file="door-open-v3.npz")
    shutil.copy(old / "reach-v3.npz", old / "door-open-v3.npz")
    (old / "manifest.json").write_text(json.dumps(m))
    assert set(load_dataset(old, ["reach-v3"])) == {"reach-v3"}  # unaffected tasks still load
    with pytest.raises(DataError, match="door-open-v3.npz: written by generator version 1"):
        load_dataset(old, ["door-open-v3"])


# ---- crash safety ----------------------------------------------------------------------------
def _wait_for(proc, cond, timeout=60.0):
    import time

    end = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"generation ended (rc {proc.returncode}) before the kill point"
        assert time.monotonic() < end, "kill point not reached in time"
        time.sleep(0.002)


KILL_POINTS = {
    # the run has started (it removes the old manifest first) but no task is finished
    "before any task file": lambda out: not (out / "manifest.json").exists(),
    # the first task's file is being written under its temporary name
    "while writing a task file": lambda out: any(p.name.startswith(".reach-v3.npz.tmp-") for p in out.iterdir()),
    # the first task is finished (its record is written after its file); the second is running
    "after the first task file": lambda out: (out / ".reach-v3.record.json").exists(),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_generation_killed_never_leaves_data_that_load_and_the_rerun_finishes(tmp_path, point):
    """SIGKILL at a kill point of `python -m harmodt.data generate --overwrite` over a folder that held a
    complete (other) data set: loading the folder then fails with one clear line, every task
    file present is whole, and running the command again completes it."""
    import signal
    import subprocess
    import sys

    from _data_folders import write_ours

    out = write_ours(tmp_path / "data", TASKS, episodes=2)  # an earlier, finished data set
    assert set(load_dataset(out)) == set(TASKS)
    cmd = [sys.executable, "-m", "harmodt.data", "generate", "--tasks", ",".join(TASKS), "--episodes", "4",
           "--out", str(out), "--seed", "5", "--workers", "1", "--no-progress", "--overwrite"]  # (another data set is there)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(proc, lambda: KILL_POINTS[point](out))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(DataError, match="incomplete data folder: no manifest.json .*run `python -m harmodt.data generate` again"):
        load_dataset(out)
    for t in TASKS:  # what a task file holds is whole: the earlier run's or this run's, never a part
        z = np.load(out / f"{t}.npz")
        assert len(z["episode_lengths"]) in (2, 4) and z["rewards"].shape[0] == z["episode_lengths"].sum()
    record = out / ".reach-v3.record.json"
    first = json.loads(record.read_text())["sha256"] if record.exists() else None
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = load_dataset(out)
    assert [len(data[t].trajectories) for t in TASKS] == [4, 4]
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]  # temporary files of the killed run removed
    manifest = json.loads((out / "manifest.json").read_text())
    if first is not None:  # the finished task was reused as it was
        assert manifest["files"]["reach-v3"]["sha256"] == first


def test_rerun_regenerates_a_task_whose_file_does_not_match_its_record(generated, tmp_path):
    """A task file cut short without the atomic rename (a copy, a full disk) and no manifest:
    loading refuses the folder, the rerun regenerates that task only."""
    import shutil

    out, manifest = generated
    part = tmp_path / "part"
    shutil.copytree(out, part)
    (part / "manifest.json").unlink()
    raw = (part / "drawer-close-v3.npz").read_bytes()
    (part / "drawer-close-v3.npz").write_bytes(raw[: len(raw) // 3])
    (part / ".drawer-close-v3.npz.tmp-4242").write_bytes(raw[:100])
    with pytest.raises(DataError, match=r"part: incomplete data folder"):
        load_dataset(part)
    mtime = os.path.getmtime(part / "reach-v3.npz")
    m2 = generate(TASKS, 3, str(part), seed=7, workers=1, prompt_episodes=2, progress=False)
    assert os.path.getmtime(part / "reach-v3.npz") == mtime  # reused
    assert m2["files"]["drawer-close-v3"]["sha256"] == manifest["files"]["drawer-close-v3"]["sha256"]  # regenerated, same bytes
    assert not (part / ".drawer-close-v3.npz.tmp-4242").exists()
    assert set(load_dataset(part)) == set(TASKS)
