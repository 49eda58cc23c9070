"""The method table: every --method is one entry; a new method is one entry plus its own functions."""

import json

import pytest
import torch

from _synthetic import datasets
from harmodt.config import ConfigError, ModelConfig, TrainConfig, validate
from harmodt.methods import METHODS, Method, register
from harmodt.train import Trainer, run

TASKS = ["reach-v3", "push-v3", "door-open-v3"]


def tiny_cfg(tmp_path, **kw) -> TrainConfig:
    model = ModelConfig(n_layer=1, n_head=2, n_embd=16, context_len=4, prompt_len=2, dropout=0.0)
    base = dict(tasks=",".join(TASKS), steps=4, batch_size=4, warmup_steps=1, lr=1e-3, eval_episodes=0, log_every=2,
                checkpoint_every=2, out=str(tmp_path / "run"), progress=False, device="cpu", model=model)
    base.update(kw)
    return validate(TrainConfig(**base))


def test_table_names_every_method_once_with_its_kind():
    assert list(METHODS) == ["mtdt", "prompt-dt", "harmodt-r", "harmodt-m", "harmodt-f", "pcgrad", "cagrad"]
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
    mean_rule = lambda grads, c, generator: grads.mean(0)  # noqa: E731
    monkeypatch.setitem(METHODS, "mean-grad", Method("mean-grad", "Mean-grad", "tab:olive", combine=mean_rule))
    cfg = tiny_cfg(tmp_path, method="mean-grad")
    assert cfg.tasks_per_batch == 3  # per-task gradients: every task in each batch
    tr = Trainer(cfg, datasets(TASKS))
    assert tr.task_masks is None and tr.model.use_prompt
    res = run(cfg, datasets(TASKS))
    assert res["method"] == "mean-grad" and res["steps"] == 4
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs if "loss" in r)


def test_an_unregistered_method_is_refused():
    with pytest.raises(ConfigError, match="--method must be one of"):
        validate(TrainConfig(method="mean-grad"))
