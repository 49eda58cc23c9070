"""Goal seeds come from one function and never let the goals that chose best.pt score it; a
checkpoint knows its data, and ``--resume`` refuses data that changed."""

import numpy as np
import pytest
import torch

from _synthetic import datasets
from harmodt.config import (EVALUATION_GOALS_SEED, TEST_GOALS_OFFSET, ConfigError, ModelConfig, TrainConfig, goal_seeds,
                            selection_goals_problem, validate)
from harmodt.data.generator import other_dataset
from harmodt.run import resume
from harmodt.run.data_cache import data_fingerprint
from harmodt.study.__main__ import build_parser
from harmodt.study.plan import StudyError
from harmodt.study.runner import Study
from harmodt.train import Trainer

TASKS = ["reach-v3", "push-v3"]


def tiny(tmp_path, **kw) -> TrainConfig:
    model = ModelConfig(n_layer=1, n_head=2, n_embd=32, context_len=5, prompt_len=2)
    return validate(TrainConfig(tasks=",".join(TASKS), steps=4, batch_size=4, warmup_steps=1, eval_episodes=1, out=str(tmp_path / "run"),
                                progress=False, model=model, device="cpu", **kw))


def test_goal_seeds_are_derived_in_one_place():
    assert goal_seeds(3) == {"test": 3 + TEST_GOALS_OFFSET, "validation": None, "evaluation": EVALUATION_GOALS_SEED}
    assert goal_seeds(3, 7)["validation"] == 7 and goal_seeds(3, 0)["validation"] == 0


def test_checkpoint_records_its_goal_seeds_and_data(tmp_path):
    tr = Trainer(tiny(tmp_path, seed=2, validation_seed=7), datasets(TASKS))
    ck = resume.state(tr)
    assert ck["goals"] == {"test": 2 + TEST_GOALS_OFFSET, "validation": 7, "evaluation": EVALUATION_GOALS_SEED}
    assert ck["data_sha256"] == data_fingerprint(datasets(TASKS)) != data_fingerprint(datasets(TASKS, seed=1))


def test_resume_refuses_changed_data_naming_both_hashes(tmp_path):
    tr = Trainer(tiny(tmp_path), datasets(TASKS))
    ck = resume.state(tr)
    other = Trainer(tiny(tmp_path), datasets(TASKS, seed=1))
    with pytest.raises(ConfigError, match="the data differ") as exc:
        resume.restore(other, ck, tmp_path / "checkpoint.pt")
    assert ck["data_sha256"][:16] in str(exc.value) and other.data_sha256[:16] in str(exc.value)
    same = Trainer(tiny(tmp_path), datasets(TASKS))
    resume.restore(same, ck, tmp_path / "checkpoint.pt")  # the same data: continues
    assert all(torch.equal(a, b) for a, b in zip(same.model.state_dict().values(), tr.model.state_dict().values()))


def test_evaluate_refuses_the_goals_a_checkpoint_was_selected_on():
    cfg = {"seed": 1, "validation_seed": EVALUATION_GOALS_SEED}
    assert f"validated on these goals (its --validation-seed {EVALUATION_GOALS_SEED})" in selection_goals_problem(cfg, EVALUATION_GOALS_SEED)
    assert f"(its test goals: --seed {1 + TEST_GOALS_OFFSET})" in selection_goals_problem(cfg, EVALUATION_GOALS_SEED)
    assert selection_goals_problem(cfg, 1 + TEST_GOALS_OFFSET) is None  # its test goals: fine
    assert selection_goals_problem({"seed": 1, "validation_seed": -1}, EVALUATION_GOALS_SEED) is None  # not validated


@pytest.mark.parametrize("extra", [["--validation-seed", "012345", "--eval-every", "2"],
                                   ["--variant", "F v=harmodt-f --validation-seed 12345", "--eval-every", "2"],
                                   ["--variant", "F v=harmodt-f --validation-seed=12345", "--eval-every", "2"]],
                         ids=["leading-zero", "variant", "variant-equals"])
def test_study_guard_compares_the_resolved_seeds_of_every_run(tmp_path, extra):
    args, rest = build_parser().parse_known_args(["--out", str(tmp_path / "s"), "--tasks", ",".join(TASKS), "--methods", "prompt-dt",
                                                  "--seeds", "1", *extra])
    with pytest.raises(StudyError, match="its --validation-seed 12345 is the study's --eval-seed"):
        Study(args, rest, "python -m harmodt.study").check()
    assert not (tmp_path / "s").exists()  # refused before the study folder is made
    args, rest = build_parser().parse_known_args(["--out", str(tmp_path / "s"), "--tasks", ",".join(TASKS), "--methods", "prompt-dt",
                                                  "--seeds", "1", "--eval-seed", "999", *extra])
    Study(args, rest, "python -m harmodt.study").check()  # other goals: accepted


def test_other_dataset_names_what_differs(tmp_path):
    from _data_folders import write_ours

    root = write_ours(tmp_path / "d", TASKS, episodes=4)
    settings = {"episodes": 4, "seed": 0, "prompt_episodes": 2, "curriculum": "synthetic", "generator_version": 2}
    assert other_dataset(root, TASKS, settings) is None  # the same data set: a rerun
    assert other_dataset(root, TASKS, dict(settings, episodes=6)) == "episodes 4 -> 6"
    assert other_dataset(root, TASKS[:1], settings) == "tasks reach-v3,push-v3 -> reach-v3"
    assert other_dataset(tmp_path / "empty", TASKS, settings) is None
    (root / "manifest.json").unlink()  # an unfinished run whose files have no per-task record yet: judged by their tasks
    assert other_dataset(root, TASKS, settings) is None
    assert other_dataset(root, TASKS[:1], settings) == "tasks push-v3,reach-v3 -> reach-v3"
    assert np.load(root / "reach-v3.npz")["observations"].shape[1] == 39
