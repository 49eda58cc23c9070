"""The flags that choose how a training step runs, not what it computes: ``--cuda-graph auto|on|off``
(harmodt/graphed_step.py; which runs auto graphs: tests/test_graphed_step.py) and ``--precision
tf32`` (TF32 matmuls on CUDA, exact fp32 on a CPU)."""

import json

import pytest
import torch

from _synthetic import datasets
from harmodt.config import ConfigError, ModelConfig, TrainConfig, config_from_dict, to_dict, validate
from harmodt.presets import EMBEDDED_DEFAULT
from harmodt.run.cli import parse_args
from harmodt.run.resume import changed_settings
from harmodt.runtime import float32_matmuls
from harmodt.train import run

TASKS = ["reach-v3", "push-v3"]


def tiny_cfg(tmp_path, name: str, **kw) -> TrainConfig:
    model = ModelConfig(n_layer=1, n_head=2, n_embd=16, context_len=4, prompt_len=2)
    return validate(TrainConfig(tasks=",".join(TASKS), steps=6, batch_size=4, warmup_steps=2, lr=1e-3, eval_episodes=0, log_every=2,
                                checkpoint_every=3, out=str(tmp_path / name), progress=False, device="cpu", model=model, **kw))


def test_cuda_graph_is_a_choice_defaulting_to_auto():
    assert TrainConfig().cuda_graph == "auto"
    cfg = parse_args(["--cuda-graph", "off"])  # a run-control flag: the embedded default run
    assert cfg.cuda_graph == "off" and cfg.tasks == EMBEDDED_DEFAULT["tasks"]
    with pytest.raises(ConfigError, match="--cuda-graph must be one of auto, on, off"):
        parse_args(["--cuda-graph", "yes"])


def test_a_saved_true_or_false_cuda_graph_reads_as_on_or_off():
    for saved, now in ((True, "on"), (False, "off")):
        assert config_from_dict({**to_dict(TrainConfig()), "cuda_graph": saved}).cuda_graph == now


def test_resume_does_not_compare_cuda_graph():
    """The graphed step computes the eager step's bits: a checkpoint of an eager run (``false``, as
    runs before the choice wrote it) continues under the default ``auto`` without --allow-changed."""
    saved = {**to_dict(TrainConfig()), "cuda_graph": False}
    assert changed_settings(saved, TrainConfig()) == {}
    assert "precision" in changed_settings(to_dict(TrainConfig()), TrainConfig(precision="tf32"))  # tf32 changes the bits on CUDA


def test_tf32_sets_tf32_matmuls_on_cuda_only():
    before = torch.get_float32_matmul_precision()
    for precision, device, inside in (("tf32", "cuda", "high"), ("tf32", "cpu", "highest"), ("fp32", "cuda", "highest"),
                                      ("bf16", "cuda", "highest")):
        with float32_matmuls(precision, torch.device(device)):
            assert torch.get_float32_matmul_precision() == inside, (precision, device)
        assert torch.get_float32_matmul_precision() == before


def test_tf32_on_a_cpu_trains_as_fp32(tmp_path, capsys):
    """--precision tf32 on a CPU: the fp32 run's losses and weights bit for bit, config.json records
    tf32 and the start line says it runs as exact fp32."""
    ckpts = {}
    for precision in ("fp32", "tf32"):
        cfg = tiny_cfg(tmp_path, precision, precision=precision)
        run(cfg, datasets(TASKS))
        assert json.loads((tmp_path / precision / "config.json").read_text())["precision"] == precision
        ckpts[precision] = torch.load(tmp_path / precision / "checkpoint.pt", weights_only=True)
    assert "precision=tf32 (exact fp32 on a CPU)" in capsys.readouterr().out
    for name, w in ckpts["fp32"]["model"].items():
        assert torch.equal(w, ckpts["tf32"]["model"][name]), name
    losses = {p: [json.loads(x).get("loss") for x in (tmp_path / p / "metrics.jsonl").read_text().splitlines()] for p in ckpts}
    assert losses["fp32"] == losses["tf32"] and any(x is not None for x in losses["fp32"])
