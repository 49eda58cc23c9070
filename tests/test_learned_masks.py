"""The learned-against-random mask measures of the study, by hand on masks small enough to count."""

import json

import numpy as np
import pytest
import torch

from harmodt.study.learned_masks import compare_learned_masks, compare_pair, learned_masks_markdown


def _masks():
    # two tasks, one "blocks.0.attn.qkv.weight" of 2 x 3 and one "blocks.0.fc.weight" of 1 x 2: 8 weights per task
    random = {"blocks.0.attn.qkv.weight": np.array([[[1, 1, 0], [1, 0, 0]], [[0, 1, 1], [1, 0, 0]]], bool),
              "blocks.0.fc.weight": np.array([[[1, 0]], [[1, 0]]], bool)}
    learned = {"blocks.0.attn.qkv.weight": np.array([[[1, 0, 1], [1, 0, 0]], [[0, 1, 1], [1, 0, 0]]], bool),  # task 0: 1 -> 2
               "blocks.0.fc.weight": np.array([[[1, 0]], [[0, 1]]], bool)}  # task 1: 0 -> 1 (fc)
    weights = {"blocks.0.attn.qkv.weight": np.array([[1.0, -2.0, 3.0], [4.0, 5.0, 6.0]]),
               "blocks.0.fc.weight": np.array([[-7.0, 8.0]])}
    return learned, random, weights


def test_compare_pair_by_hand():
    learned, random, weights = _masks()
    got = compare_pair(learned, random, weights)
    # flat order: qkv (6) then fc (2); task 0 random {0,1,3,6}, learned {0,2,3,6}; task 1 random {1,2,3,6}, learned {1,2,3,7}
    assert got["kept_of_random"] == pytest.approx(0.75)  # 3 of 4 in both tasks
    assert got["changed_fraction"] == pytest.approx(0.25) and got["changed_fraction_min"] == pytest.approx(0.25)
    assert got["task_jaccard_random"] == pytest.approx(3 / 5)  # {1,3,6} of {0,1,2,3,6}
    assert got["task_jaccard_learned"] == pytest.approx(2 / 6)  # {2,3} of {0,1,2,3,6,7}
    assert got["changed_by_matrix"] == pytest.approx({"attn.qkv": 1 / 6, "fc": 1 / 2})  # qkv: 1 of 6 active; fc: 1 of 2
    # recovered: (0, 2) kept by both tasks at the end, (1, 7) by task 1 alone -> other tasks 1 and 0
    assert got["other_tasks_keeping_recovered"] == pytest.approx(0.5)
    # dropped: (0, 1) kept by task 1, (1, 6) kept by task 0 -> 1 other task each
    assert got["other_tasks_keeping_dropped"] == pytest.approx(1.0)
    # active: task 0 {0,2,3,6} -> others 0,1,1,0; task 1 {1,2,3,7} -> 0,1,1,0
    assert got["other_tasks_keeping_active"] == pytest.approx(0.5)
    # |w| of every active entry: 1,3,4,7 and 2,3,4,8 -> median 3.5; recovered 3, 8 -> 5.5; dropped 2, 7 -> 4.5
    assert got["magnitude_recovered"] == pytest.approx(5.5 / 3.5)
    assert got["magnitude_dropped"] == pytest.approx(4.5 / 3.5)


def test_unchanged_masks_keep_everything():
    _, random, weights = _masks()
    got = compare_pair(random, random, weights)
    assert got["kept_of_random"] == 1.0 and got["changed_fraction"] == 0.0
    assert np.isnan(got["other_tasks_keeping_recovered"]) and np.isnan(got["magnitude_recovered"])


def _write_run(out, name, masks, tasks, harmony):
    from harmodt.checkpoint import save

    d = out / "runs" / name
    d.mkdir(parents=True)
    _, _, weights = _masks()
    save({"model": {n: torch.tensor(w) for n, w in weights.items()}, "config": {}, "eval_info": {"tasks": tasks},
          "masks": {t: {n: torch.from_numpy(m[i]) for n, m in masks.items()} for i, t in enumerate(tasks)}}, d / "checkpoint.pt")
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "harmony_score": h}) + "\n" for s, h in harmony))


def test_learned_runs_are_paired_with_the_random_run_of_their_seed(tmp_path):
    learned, random, _ = _masks()
    tasks = ["reach-v3", "push-v3"]
    _write_run(tmp_path, "harmodt-r-s0", random, tasks, [(500, 0.2), (1000, 0.3)])
    _write_run(tmp_path, "harmodt-f-s0", learned, tasks, [(500, 0.25), (1000, 0.4)])
    run = lambda name, method, seed, succ: {"name": name, "arm": method, "method": method, "variant": method, "seed": seed,  # noqa: E731
                                            "sweep": None, "status": "finished",
                                            "tasks": {t: {"success": s} for t, s in zip(tasks, succ)}}
    study = {"tasks": tasks, "runs": [run("harmodt-r-s0", "harmodt-r", 0, [0.5, 1.0]), run("harmodt-f-s0", "harmodt-f", 0, [1.0, 0.5]),
                                      run("harmodt-f-s1", "harmodt-f", 1, [1.0, 1.0])]}  # seed 1 has no R run: no entry
    got = compare_learned_masks(study, tmp_path)
    assert [e["run"] for e in got] == ["harmodt-f-s0"] and got[0]["random_run"] == "harmodt-r-s0"
    assert got[0]["success_diff_per_task"] == {"reach-v3": 0.5, "push-v3": -0.5} and got[0]["success_diff"] == 0.0
    assert got[0]["harmony_learned"]["first"] == 0.25 and got[0]["harmony_learned"]["last"] == 0.4
    assert got[0]["harmony_random"]["last"] == 0.3
    text = "\n".join(learned_masks_markdown({"learned_masks": got}))
    assert "| harmodt-f-s0 | 0.750 | 0.2500 (0.2500) | 0.600 → 0.333 |" in text
    assert learned_masks_markdown({"learned_masks": []}) == []
