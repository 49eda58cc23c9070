"""`python -m harmodt.data card` on the real simulator, 2 tasks x 2 goals: it runs, its JSON and
markdown agree, its numbers do not depend on --workers, a killed run resumes from its cache, and a
cached expert unit serves a request for fewer goals."""

import json
import re

import pytest

from harmodt.data.__main__ import main
from harmodt.data.card import default_name, measure, wilson

TASKS = ["reach-v3", "drawer-close-v3"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    args = ["card", "--tasks", ",".join(TASKS), "--goals", "2", "--curriculum-episodes", "2", "--out", str(root / "out"),
            "--cache", str(root / "cache"), "--workers", "2", "--no-progress"]
    assert main(args) == 0
    name = default_name(",".join(TASKS))
    return root, json.loads((root / "out" / f"{name}.json").read_text()), (root / "out" / f"{name}.md").read_text(), name


def test_the_json_and_the_card_agree(made):
    root, card, md, name = made
    assert (root / "out" / f"{name}.png").stat().st_size > 0
    assert card["tasks"] == TASKS and card["goals_per_task"] == 2 and card["versions"]["metaworld"] and card["versions"]["mujoco"]
    assert f"Meta-World {card['versions']['metaworld']}, MuJoCo {card['versions']['mujoco']}" in md
    k = 0
    for t in TASKS:
        p = card["per_task"][t]
        assert p["goals"] == len(p["expert"]["success"]) == 2 and p["successes"] == sum(p["expert"]["success"])
        assert p["ci95"] == pytest.approx(list(wilson(p["successes"], 2)))
        assert len(p["curriculum"]["success"]) == 2 and p["curriculum"]["epsilon"] == [1.0, 0.0]
        row = re.search(rf"^\| \**{re.escape(t)}\** \| (\d+)/(\d+) \| \[([\d.]+), ([\d.]+)\] \| (\d+) ", md, re.M)
        assert row, t
        assert (int(row[1]), int(row[2])) == (p["successes"], 2)
        assert float(row[3]) == pytest.approx(p["ci95"][0], abs=0.005) and float(row[4]) == pytest.approx(p["ci95"][1], abs=0.005)
        assert int(row[5]) == round(p["mean_return"])
        k += p["successes"]
    assert card["expert_success"]["successes"] == k and f"succeed in {k} of 4 episodes" in md


def test_numbers_do_not_depend_on_workers_and_a_run_resumes(made):
    root, card, _, _ = made
    cache = root / "cache"
    files = sorted(cache.iterdir())
    assert len(files) == 4  # (expert, curriculum) x 2 tasks
    files[0].unlink()  # as if killed before that unit finished
    kept = {f: f.stat().st_mtime_ns for f in files[1:]}
    again = measure(TASKS, 2, 2, seed=0, workers=1, cache=cache, progress=False)
    assert {f: f.stat().st_mtime_ns for f in files[1:]} == kept  # the finished units were reused
    assert files[0].exists()
    assert json.loads(json.dumps(again["per_task"])) == card["per_task"]
    fewer = measure(TASKS, 1, 2, seed=0, workers=1, cache=cache, progress=False)  # served by the 2-goal units, cut
    assert sorted(cache.iterdir()) == files
    for t in TASKS:
        assert fewer["per_task"][t]["expert"] == {k: v[:1] for k, v in card["per_task"][t]["expert"].items()}


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["card", "--tasks", "reach-v3", "--goals", "0", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --goals") and "\n" not in err
    assert main(["card", "--tasks", "no-such-task-v3", "--out", str(tmp_path), "--no-progress"]) == 2


def test_the_training_sets_own_success_by_decile_from_its_manifest(tmp_path):
    """`card --training-data DIR`: the success per task and by decile of the episodes `generate` wrote
    (a tiny folder, no simulator), and the card's section from it; a task the folder lacks is refused."""
    from _data_folders import write_ours
    from harmodt.data.card import training_set
    from harmodt.data.card_report import _training_set
    from harmodt.data.formats import DataError, read_manifest

    write_ours(tmp_path, tasks=("reach-v3", "push-v3"), episodes=10)
    files = read_manifest(tmp_path)["files"]
    ts = training_set(tmp_path, ["reach-v3", "push-v3"])
    flags = {t: files[t]["episode_success"] for t in ("reach-v3", "push-v3")}
    assert ts["episodes_per_task"] == [10]
    assert ts["success_by_decile"] == [(flags["reach-v3"][i] + flags["push-v3"][i]) / 2 for i in range(10)]
    assert ts["success_rate"] == {t: sum(f) / 10 for t, f in flags.items()}
    md = "\n".join(_training_set({"training_set": ts, "curriculum_episodes_per_task": 10}))
    assert "| success | " + " | ".join(f"{d:.2f}" for d in ts["success_by_decile"]) + " |" in md and "| push-v3 |" in md
    assert "Not measured" in "\n".join(_training_set({"curriculum_episodes_per_task": 10}))
    with pytest.raises(DataError, match="no episode_success for door-open-v3"):
        training_set(tmp_path, ["reach-v3", "door-open-v3"])
