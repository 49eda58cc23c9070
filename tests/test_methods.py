"""The method table: every --method is one entry; a new method is one entry plus its own functions."""

import json
from dataclasses import dataclass, field

import pytest
import torch

from _synthetic import datasets
from harmodt.config import ConfigError, ModelConfig, TrainConfig, validate
from harmodt.mask_update import Algorithm2
from harmodt.masks import TaskMasks
from harmodt.methods import METHODS, Method, register
from harmodt.run.cli import build_parser, parse_args
from harmodt.train import Trainer, run

TASKS = ["reach-v3", "push-v3", "door-open-v3"]


def tiny_cfg(tmp_path, **kw) -> TrainConfig:
    model = ModelConfig(n_layer=1, n_head=2, n_embd=16, context_len=4, prompt_len=2, dropout=0.0)
    base = dict(tasks=",".join(TASKS), steps=4, batch_size=4, warmup_steps=1, lr=1e-3, eval_episodes=0, log_every=2,
                checkpoint_every=2, out=str(tmp_path / "run"), progress=False, device="cpu", model=model)
    base.update(kw)
    return validate(TrainConfig(**base))


def test_table_names_every_method_once_with_its_kind():
    assert list(METHODS) == ["mtdt", "prompt-dt", "harmodt-r", "harmodt-s", "harmodt-m", "harmodt-f", "pcgrad", "cagrad"]
    assert [m.name for m in METHODS.values() if m.learns_masks] == ["harmodt-m", "harmodt-f"]
    assert [m.name for m in METHODS.values() if m.per_task_gradients] == ["pcgrad", "cagrad"]
    assert METHODS["mtdt"].resolve_conditioning() == "task-state" and METHODS["harmodt-r"].resolve_conditioning() == "prompt"
    assert METHODS["mtdt"].resolve_conditioning("task-id") == "task-embedding"  # an earlier name
    with pytest.raises(ValueError, match="already registered"):
        register(METHODS["mtdt"])
    with pytest.raises(ValueError, match="importance"):
        Method("bad", "Bad", "k", masks="learned")


def test_a_registered_toy_method_trains_without_other_changes(tmp_path, monkeypatch):
    """A dense method whose step averages the per-task gradients: one entry, its own rule."""
    mean_rule = lambda grads, options, generator: grads.mean(0)  # noqa: E731
    monkeypatch.setitem(METHODS, "mean-grad", Method("mean-grad", "Mean-grad", "tab:olive", combine=mean_rule))
    cfg = tiny_cfg(tmp_path, method="mean-grad")
    assert cfg.tasks_per_batch == 3  # per-task gradients: every task in each batch
    tr = Trainer(cfg, datasets(TASKS))
    assert tr.task_masks is None and tr.model.use_prompt
    res = run(cfg, datasets(TASKS))
    assert res["method"] == "mean-grad" and res["steps"] == 4
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs if "loss" in r)


@dataclass(frozen=True)
class ScaleOptions:
    mean_scale: float = field(default=1.0, metadata={"help": "what scaled-mean multiplies the mean task gradient by"})

    def __post_init__(self):
        if not self.mean_scale > 0:
            raise ValueError("--mean-scale must be positive")


TINY_FLAGS = ["--tasks", ",".join(TASKS), "--steps", "4", "--batch-size", "4", "--warmup-steps", "1", "--lr", "1e-3",
              "--eval-episodes", "0", "--log-every", "2", "--checkpoint-every", "2", "--no-progress", "--device", "cpu",
              "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--context-len", "4", "--prompt-len", "2", "--dropout", "0.0"]


def test_a_toy_combination_method_with_its_own_hyper_parameter_trains_from_its_flag(tmp_path, monkeypatch):
    """A gradient-combination method whose rule has a hyper-parameter of its own: its options
    dataclass makes the flag --mean-scale, validated as one line, kept in config.json, and the
    value reaches the rule at every step; no other product file knows of it."""
    seen = []

    def scaled_mean(grads, options, generator):
        seen.append(options.mean_scale)
        return options.mean_scale * grads.mean(0)

    monkeypatch.setitem(METHODS, "scaled-mean", Method("scaled-mean", "Scaled mean", "tab:olive", combine=scaled_mean,
                                                       options=ScaleOptions))
    assert "--mean-scale" in build_parser().format_help()
    with pytest.raises(ConfigError, match="--mean-scale must be positive"):
        parse_args(["--method", "scaled-mean", "--mean-scale", "0"])
    with pytest.raises(ConfigError, match="--mean-scale does not apply to --method pcgrad"):
        parse_args(["--method", "pcgrad", "--mean-scale", "2"])
    assert parse_args(["--method", "scaled-mean"]).method_options == {"mean_scale": 1.0}
    cfg = parse_args(["--method", "scaled-mean", "--mean-scale", "0.25", "--out", str(tmp_path / "run")] + TINY_FLAGS)
    assert cfg.method_options == {"mean_scale": 0.25} and cfg.tasks_per_batch == 3
    res = run(cfg, datasets(TASKS))
    assert res["steps"] == 4 and seen == [0.25] * 4
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["method_options"] == {"mean_scale": 0.25}


class EarlyUpdates(Algorithm2):
    """A toy mask schedule: Algorithm 2 before steps 2 and 3 only, 4 weights per task each time."""

    def due(self, step: int) -> bool:
        return step in (2, 3)

    def alpha(self, step: int) -> int:
        return 4


def test_a_toy_mask_schedule_trains_without_other_changes(tmp_path, monkeypatch):
    """A learned-mask method with its own schedule (a subclass of Algorithm 2 built by its entry):
    the loop runs the update when the schedule says, with the schedule's alpha_t."""
    monkeypatch.setitem(METHODS, "harmodt-early", Method("harmodt-early", "HarmoDT early", "tab:brown", masks="learned",
                                                         importance="fisher", mask_updater=lambda tr: EarlyUpdates(tr, "fisher")))
    cfg = parse_args(["--method", "harmodt-early", "--out", str(tmp_path / "run")] + TINY_FLAGS)
    assert cfg.masks.update_every == 5000  # the default schedule would not run in 4 steps
    tr = Trainer(cfg, datasets(TASKS))
    erk = tr.task_masks.snapshot()
    run(cfg, datasets(TASKS))
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in recs if "alpha" in r]
    assert [(r["step"], r["alpha"], r["masked_per_task"]) for r in updates] == [(2, 4, [4, 4, 4]), (3, 4, [4, 4, 4])]
    assert all(f > 0 for f in updates[-1]["mask_changed_fraction"])
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 4 and not torch.equal(TaskMasks.from_state(ck["masks"], TASKS).snapshot(), erk)


def test_an_unregistered_method_is_refused():
    with pytest.raises(ConfigError, match="--method must be one of"):
        validate(TrainConfig(method="mean-grad"))
