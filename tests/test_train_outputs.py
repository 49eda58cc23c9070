"""A training run from the outside: every method's outputs, the flags and their one-line errors, a
checkpoint's contents, the final and best evaluations, validation goals and --stop-at-success."""

import json
import os

import pytest
import torch

from _synthetic import datasets
from _train import TASKS, tiny_cfg
from harmodt.config import ConfigError, TrainConfig, config_from_dict, to_dict
from harmodt.run.cli import parse_args
from harmodt.train import Trainer, run


@pytest.mark.parametrize("method", ["mtdt", "prompt-dt", "harmodt-r", "harmodt-m", "harmodt-f"])
def test_every_method_trains_and_writes_outputs(tmp_path, method):
    cfg = tiny_cfg(tmp_path, method=method, steps=6)
    res = run(cfg, datasets(TASKS))
    out = tmp_path / "run"
    assert res["steps"] == 6 and res["method"] == method
    assert json.loads((out / "config.json").read_text())["method"] == method
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r and "steps_per_s" in r for r in recs)
    assert any("harmony_score" in r for r in recs)  # logged at the mask update (step 5)
    assert (out / "curves.png").stat().st_size > 1000 and any((out / "tb").iterdir())
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert {"model", "masks", "optimizer", "step", "config", "rng"} <= set(ck)
    if method.startswith("harmodt"):
        assert ck["masks"]["tasks"] == list(TASKS)
        assert all(m.dtype == torch.int32 for m in ck["masks"]["words"].values())  # 1 bit per weight
    else:
        assert ck["masks"] is None


def test_existing_run_needs_resume(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=4)
    run(cfg, datasets(TASKS))
    with pytest.raises(ConfigError, match="--resume"):
        run(cfg, datasets(TASKS))


@pytest.mark.parametrize("argv,msg", [
    (["--method", "foo"], "--method"),
    (["--tasks", "reach-v3,nope"], "nope"),
    (["--sparsity", "1.5"], "--sparsity"),
    (["--tasks-per-batch", "9", "--batch-size", "4"], "--tasks-per-batch"),
    (["--conditioning", "task"], "--conditioning must be one of auto, prompt, task-state, task-embedding"),
    (["--prompt-segment", "start"], "--prompt-segment must be one of last, random, first"),
    (["--task-order", "cyclic"], "--task-order must be random or round-robin"),
    (["--clip-scope", "all"], "--clip-scope must be masked or unmasked"),
    (["--weight-decay-scope", "none"], "--weight-decay-scope must be matrices or all"),
    (["--init", "gpt2"], "--init must be ours or reference"),
    (["--erk-draw", "uniform"], "--erk-draw must be exact or bernoulli"),
])
def test_bad_flags_are_one_clear_line(argv, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_args(argv)


def test_no_arguments_selects_embedded_default_and_preset_paper():
    cfg = parse_args([])
    assert cfg.steps == 5000 and cfg.model.n_layer == 3 and cfg.method == "harmodt-f"
    cfg = parse_args(["--preset", "paper-mt50"])
    assert cfg.tasks == "MT50" and cfg.model.n_layer == 6 and cfg.masks.sparsity == 0.2 and cfg.masks.update_every == 5000
    cfg = parse_args(["--preset", "paper-mt50", "--sparsity", "0.3", "--n-layer", "4"])
    assert cfg.masks.sparsity == 0.3 and cfg.model.n_layer == 4


def test_checkpoint_is_device_free_and_safe(tmp_path):
    """The checkpoint holds CPU tensors and plain types only (weights_only=True loads it) and
    resumes on the CPU whatever device wrote it."""
    cfg = tiny_cfg(tmp_path, steps=4)
    run(cfg, datasets(TASKS))
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    tensors = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(ck)
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    from harmodt.evaluate import load_checkpoint

    model, masks, info, _, step = load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"), "cpu")
    assert step == 4 and next(model.parameters()).device.type == "cpu" and info["tasks"] == TASKS


def test_impossible_backend_is_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "harmodt.train", "--device", "cpu", "--fused", "--backend", "triton", "--steps", "1",
                        "--out", str(tmp_path / "x"), "--no-progress"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "triton" in r.stderr and "Traceback" not in r.stderr


def test_conditioning_and_prompt_segment_flags_and_configs_written_before_them():
    cfg = parse_args(["--method", "mtdt", "--steps", "5"])
    assert cfg.conditioning == "auto" and cfg.prompt_segment == "last"
    assert parse_args(["--method", "mtdt", "--conditioning", "task-id"]).conditioning == "task-embedding"  # the earlier name
    assert parse_args(["--prompt-segment", "random"]).prompt_segment == "random"
    # a config written before --prompt-segment: random windows, and MTDT's "auto" meant the learned embedding
    old = {k: v for k, v in to_dict(TrainConfig(method="mtdt")).items() if k != "prompt_segment"}
    cfg = config_from_dict(old)
    assert cfg.prompt_segment == "random" and cfg.conditioning == "task-embedding"
    cfg = config_from_dict({**old, "method": "prompt-dt"})
    assert cfg.prompt_segment == "random" and cfg.conditioning == "auto"
    assert config_from_dict({**old, "conditioning": "task-id"}).conditioning == "task-embedding"
    new = config_from_dict(to_dict(TrainConfig(method="mtdt")))  # today's config is read as written
    assert new.prompt_segment == "last" and new.conditioning == "auto"


@pytest.mark.parametrize("conditioning", ["auto", "task-embedding", "prompt"])
def test_mtdt_trains_with_every_conditioning(tmp_path, conditioning):
    tr = Trainer(tiny_cfg(tmp_path, method="mtdt", conditioning=conditioning), datasets(TASKS))
    assert tr.model.conditioning == {"auto": "task-state"}.get(conditioning, conditioning)
    assert ("prompt_states" in tr.batcher.sample([0], 2)) == (conditioning == "prompt")
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    loss = tr.train_step([1])
    assert torch.isfinite(loss) and any(not torch.equal(before[k], v) for k, v in tr.model.state_dict().items())


def test_results_keep_the_final_and_the_best_evaluation(tmp_path, monkeypatch):
    """--eval-every: results.json's top level and "final" are the last evaluation; "best" is the one
    with the highest mean success (the earliest of equal ones), with its step."""
    scores = {2: [0.2, 0.4], 4: [1.0, 0.6], 6: [0.6, 0.6], 8: [0.4, 0.2], 10: [0.0, 0.2]}  # steps 4 and 6 tie at 0.8

    def fake_evaluate(self):
        per = {t: {"success": s, "return": 100 * s, "episodes": 1, "prompt": {"episode": 1, "timesteps": [58, 59]}}
               for t, s in zip(self.tasks, scores[self.step])}
        return {"tasks": per, "mean_success": sum(scores[self.step]) / 2, "env_steps": 2, "seconds": 1.0}

    monkeypatch.setattr(Trainer, "evaluate", fake_evaluate)
    two = TASKS[:2]
    res = run(tiny_cfg(tmp_path, tasks=",".join(two), steps=10, eval_every=2, eval_episodes=1), datasets(two))
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert on_disk["mean_success"] == pytest.approx(0.1) and on_disk["tasks"][two[1]] == {
        "success": 0.2, "return": 20.0, "prompt": {"episode": 1, "timesteps": [58, 59]}}
    assert on_disk["final"] == {"step": 10, "mean_success": on_disk["mean_success"], "tasks": on_disk["tasks"]}
    best = on_disk["best"]
    assert best["step"] == 4 and best["mean_success"] == pytest.approx(0.8) and best["evaluations"] == 5
    assert best["tasks"][two[0]]["success"] == 1.0


def test_validation_goals_choose_the_best_checkpoint(tmp_path, monkeypatch):
    """--validation-seed: the evaluations during training (and at the last step) run on the validation
    goals; the best of them is saved as best.pt with that step's weights; the final evaluation runs on
    the test goals and is not a candidate for "best"."""
    validation = {2: 0.2, 4: 0.9, 6: 0.5, 8: 0.9, 10: 0.3}  # best at step 4 (8 ties it, later)
    seen = []

    def fake_evaluate(self, goals_seed=None):
        seen.append((self.step, goals_seed))
        s = validation[self.step] if goals_seed == 777 else 1.0  # the test goals always score 1.0
        per = {t: {"success": s, "return": 100 * s, "episodes": 1, "prompt": {"episode": 1, "timesteps": [58, 59]}} for t in self.tasks}
        return {"tasks": per, "mean_success": s, "env_steps": 2, "seconds": 1.0}

    monkeypatch.setattr(Trainer, "evaluate", fake_evaluate)
    two = TASKS[:2]
    cfg = tiny_cfg(tmp_path, tasks=",".join(two), steps=10, eval_every=2, eval_episodes=1, validation_seed=777, checkpoint_every=3)
    res = run(cfg, datasets(two))
    assert seen == [(2, 777), (4, 777), (6, 777), (8, 777), (10, 777), (10, None)]
    assert res["final"]["mean_success"] == 1.0 and res["mean_success"] == 1.0
    best = res["best"]
    assert (best["step"], best["mean_success"], best["evaluations"], best["goals"]) == (4, 0.9, 5, "validation")
    assert best["checkpoint"] == "best.pt" and best["validation_seed"] == 777
    saved = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert saved["step"] == 4
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "validation_mean_success" in m] == [2, 4, 6, 8, 10]
    assert [m["step"] for m in metrics if "eval_mean_success" in m] == [10]


def test_validation_goals_must_differ_from_the_test_goals(tmp_path):
    with pytest.raises(ConfigError, match="--validation-seed 12346 draws the final evaluation's test goals"):
        tiny_cfg(tmp_path, seed=1, validation_seed=12346, eval_episodes=1)


def test_results_without_evaluation_have_no_final_or_best(tmp_path):
    res = run(tiny_cfg(tmp_path, method="prompt-dt", steps=2), datasets(TASKS))
    assert res["final"] is None and res["best"] is None and res["tasks"] == {}


@pytest.mark.parametrize("stop", [False, True])
def test_stop_at_success_reaches_every_evaluation_of_a_run(tmp_path, monkeypatch, stop):
    """--stop-at-success: the evaluations during training and the final one all stop at success, and
    results.json says its returns are truncated; without it none does."""
    import harmodt.evaluate as evaluation

    seen, real = [], evaluation.evaluate

    def spy(*args, **kw):
        seen.append(kw.get("stop_at_success"))
        return real(*args, **{**kw, "max_steps": 5})

    monkeypatch.setattr(evaluation, "evaluate", spy)
    two = TASKS[:2]
    cfg = tiny_cfg(tmp_path, tasks=",".join(two), steps=4, eval_every=2, eval_episodes=1, validation_seed=777, stop_at_success=stop)
    res = run(cfg, datasets(two))
    assert seen == [stop] * 3 and res["returns_truncated"] is stop
