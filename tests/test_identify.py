"""harmodt.study.identify: task identification from prompts and first observations, on tiny synthetic data."""

import json

import numpy as np
import pytest
import torch

from harmodt.data.batches import _flatten, episode_segments, first_states, prompt_segment
from harmodt.data.formats import TaskData, Trajectory
from harmodt.study import identify as idf
from harmodt.study import task_identity as tid
from tests._data_folders import write_ours

CFG = tid.IdentifyConfig(prompt_len=3, max_ep_len=50, folds=4, max_iter=100)


def _traj(obs: np.ndarray, rng) -> Trajectory:
    n = len(obs)
    return Trajectory(obs.astype(np.float32), rng.uniform(-1, 1, (n, 4)).astype(np.float32),
                      rng.uniform(0, 1, n).astype(np.float32), np.eye(1, n, n - 1, dtype=bool)[0])


def _offset_tasks(n_tasks=3, episodes=8, length=10, seed=0) -> dict:
    """Tasks whose states are the same noise shifted by a task-specific constant: told apart by raw
    (or pooled) states, but identical in distribution once each task is normalised by its own statistics."""
    rng = np.random.default_rng(seed)
    out = {}
    for k in range(n_tasks):
        shift = 5.0 * k

        def ep():
            return _traj(rng.normal(size=(length, 39)) + shift, rng)

        out[f"task{k}"] = TaskData(f"task{k}", [ep() for _ in range(episodes)], [ep() for _ in range(2)])
    return out


def test_episode_segments_last_is_the_prompt_cut():
    rng = np.random.default_rng(1)
    trajs = [_traj(rng.normal(size=(n, 39)), rng) for n in (10, 3, 7)]
    mean, std = np.zeros(39, np.float32), np.ones(39, np.float32)
    flat = _flatten(trajs, mean, std, 1000.0, 50)
    seg = episode_segments(flat, 4, "last", torch.Generator())
    assert seg["timesteps"][0].tolist() == [5, 6, 7, 8]  # the 4 steps ending one before the last (9)
    assert seg["mask"][1].tolist() == [False, True, True, True]  # 3 steps, left-padded
    assert torch.equal(first_states(flat), torch.from_numpy(np.stack([t.observations[0] for t in trajs])))
    # the same window as the evaluation prompt of the highest-return episode
    best = int(np.argmax([t.rewards.sum() for t in trajs]))
    one, _ = prompt_segment(trajs, mean, std, 4, 1000.0, 50, torch.Generator(), "last")
    assert torch.equal(one["prompt_states"][0], seg["states"][best])
    with pytest.raises(ValueError, match="segment must be one of"):
        episode_segments(flat, 4, "middle", torch.Generator())


def test_classifiers_separate_blobs_and_not_noise():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    separable = rng.normal(size=(60, 5)) + 4.0 * np.eye(3, 5)[y]
    noise = rng.normal(size=(60, 5))
    for clf in tid.CLASSIFIERS:
        assert np.mean(tid.heldout_predictions(separable, y, 3, clf, CFG) == y) == 1.0
        assert np.mean(tid.heldout_predictions(noise, y, 3, clf, CFG) == y) < 0.6


def test_folds_hold_every_class():
    y = np.repeat(np.arange(3), 7)
    fold = tid.fold_of(y, 3, seed=0)
    assert all(set(y[fold == f]) == {0, 1, 2} for f in range(3))
    assert np.array_equal(fold, tid.fold_of(y, 3, seed=0))


def test_per_task_statistics_hide_an_offset_that_pooled_ones_show():
    data = _offset_tasks()
    res = idf.identify(data, CFG, classifiers=("logistic",))

    def acc(norm, view, seg):
        return next(r for r in res if (r["state_norm"], r["view"], r["segment"]) == (norm, view, seg))["heldout"]

    assert acc("pooled", "first", None) == 1.0
    assert acc("pooled", "prompt", "last") == 1.0
    assert acc("per-task", "first", None) < 0.6  # chance 1/3: the offset is normalised away
    r = next(r for r in res if (r["state_norm"], r["view"], r["segment"]) == ("pooled", "both", "last"))
    assert set(r["per_task"]) == set(data) and r["per_task"]["task2"]["heldout"] == 1.0
    assert r["prompt_episodes"] == 1.0  # fitted on training episodes, tested on the prompt episodes


def test_too_few_episodes_for_the_folds():
    data = _offset_tasks(episodes=3)
    with pytest.raises(tid.IdentifyError, match="--folds 4"):
        idf.identify(data, CFG)


def test_cli_writes_report_with_rank_correlation(tmp_path, capsys):
    tasks = ("reach-v3", "push-v3", "pick-place-v3")
    data = write_ours(tmp_path / "data", tasks=tasks, episodes=6, length=12)
    runs = tmp_path / "runs"
    for name, succ in (("prompt-dt-s0", (1.0, 0.5, 0.0)), ("prompt-dt-s1", (0.8, 0.4, 0.2)), ("mtdt-s0", (0.0, 0.5, 1.0))):
        run = runs / name
        run.mkdir(parents=True)
        (run / "run_eval.json").write_text(json.dumps({"tasks": {t: {"success": s} for t, s in zip(tasks, succ)}}))
        (run / "config.json").write_text(json.dumps({"prompt_segment": "last", "state_norm": "pooled", "steps": 10,
                                                     "model": {"prompt_len": 3}}))
    out = tmp_path / "out"
    rc = idf.main(["--data", str(data), "--out", str(out), "--runs", str(runs), "--prompt-len", "3", "--folds", "3",
                   "--max-ep-len", "50", "--max-iter", "20", "--control", "mtdt"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "identify.json").read_text())
    assert report["model_state_norm"] == "pooled"
    assert report["prompt_dt"]["per_task"] == pytest.approx({"reach-v3": 0.9, "push-v3": 0.45, "pick-place-v3": 0.1})
    assert len(report["results"]) == len(idf.STATE_NORMS) * len(tid.VIEWS) * len(tid.CLASSIFIERS)
    sp = report["results"][0]["spearman"]["heldout"]
    assert sp["n"] == 3 and (sp["rho"] is None or -1.0 <= sp["rho"] <= 1.0)
    assert report["controls"]["mtdt"]["per_task"]["pick-place-v3"] == 1.0
    for row in report["results"]:  # the control's success is the reverse order of Prompt-DT's: opposite ranks
        for test in tid.TESTS:
            a, b = row["spearman"][test]["rho"], row["spearman_controls"]["mtdt"][test]["rho"]
            assert (a is None and b is None) or a == pytest.approx(-b)
    md = (out / "identify.md").read_text()
    assert "| reach-v3 | 0.90 |" in md and "Spearman ρ with mtdt success" in md
    assert (out / "identify.png").stat().st_size > 0


def test_cli_one_line_errors(tmp_path, capsys):
    data = write_ours(tmp_path / "data", episodes=6)
    assert idf.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert idf.main(["--data", str(data), "--out", str(tmp_path / "o"), "--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "does not exist" in err[0] and "no prompt-dt-s*/run_eval.json" in err[1]
