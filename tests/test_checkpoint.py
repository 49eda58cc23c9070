"""Safe checkpoints: every file training writes opens without unpickling code (checkpoint.pt with
``torch.load(weights_only=True)``, the rest as JSON); a checkpoint of the older pickled format is
one clear line in both CLIs (exit 2) and ``python -m harmodt.checkpoint convert`` makes it
loadable and resumable; writes are atomic."""

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic import datasets  # noqa: E402

from harmodt import checkpoint  # noqa: E402
from harmodt.files import temp_name  # noqa: E402
from harmodt.config import ModelConfig, TrainConfig, to_dict, validate  # noqa: E402
from harmodt.evaluate import load_checkpoint  # noqa: E402
from harmodt.train import run  # noqa: E402
from test_resume import assert_equal_tree  # noqa: E402  (one tree comparison for both files)

TASKS = ["reach-v3", "push-v3"]
PLAIN = (str, int, float, bool, type(None))


def tiny(out: Path, **kw) -> TrainConfig:
    model = ModelConfig(n_layer=2, n_head=2, n_embd=32, context_len=5, prompt_len=2)
    base = dict(tasks=",".join(TASKS), method="harmodt-f", steps=6, batch_size=4, warmup_steps=2, lr=1e-3, eval_episodes=0,
                log_every=2, checkpoint_every=3, out=str(out), progress=False, device="cpu", model=model)
    base.update(kw)
    cfg = TrainConfig(**base)
    cfg.masks.update_every = 4
    return validate(cfg)


def cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, **kw)


def one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    return proc.stderr.strip()


def old_format(ck: dict) -> dict:
    """``ck`` as the older trainer pickled it: numpy arrays in eval_info, numpy's RNG state as
    the tuple np.random.get_state() returns, no run state."""
    old = copy.deepcopy(ck)
    info = old["eval_info"]
    info["state_mean"] = {t: v.numpy() for t, v in info["state_mean"].items()}
    info["state_std"] = {t: v.numpy() for t, v in info["state_std"].items()}
    info["prompts"] = {t: [{k: v.numpy() for k, v in p.items()} for p in ps] for t, ps in info["prompts"].items()}
    n = old["rng"]["numpy"]
    old["rng"]["numpy"] = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    del old["run"]
    return old


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 6-step run, and its checkpoint in the old pickled format (old/checkpoint.pt)."""
    base = tmp_path_factory.mktemp("ck")
    run(tiny(base / "run"), datasets(TASKS))
    (base / "old").mkdir()
    torch.save(old_format(checkpoint.load(base / "run" / "checkpoint.pt")), base / "old" / "checkpoint.pt")
    return base


def test_every_file_training_writes_opens_safely(finished):
    out = finished / "run"
    ck = torch.load(out / "checkpoint.pt", weights_only=True)  # no pickled code can run

    def walk(x, where):
        if isinstance(x, torch.Tensor):
            assert x.device.type == "cpu", where
        elif isinstance(x, dict):
            for k, v in x.items():
                assert isinstance(k, (str, int)), where
                walk(v, f"{where}.{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{where}[{i}]")
        else:
            assert isinstance(x, PLAIN), (where, type(x))

    walk(ck, "checkpoint")
    assert {"model", "masks", "optimizer", "scheduler", "step", "config", "rng", "eval_info", "run"} <= set(ck)
    assert {"torch", "python", "numpy", "batcher"} <= set(ck["rng"]) and ck["step"] == 6
    assert json.loads((out / "config.json").read_text()) == to_dict(tiny(out))
    assert json.loads((out / "results.json").read_text())["steps"] == 6
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [2, 4, 6] and any("harmony_score" in r for r in recs)
    assert list((out / "tb").iterdir()) and not list(out.glob("*.tmp*"))


def test_old_checkpoint_is_one_line_in_both_clis(finished):
    old = finished / "old" / "checkpoint.pt"
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(old, weights_only=True)  # what the old format does to a safe load
    line = one_error_line(cli("harmodt.evaluate", str(old), "--device", "cpu", "--episodes", "1", "--no-progress"),
                          "unsafe", f"python -m harmodt.checkpoint convert {old} NEW.pt")
    assert str(old) in line
    one_error_line(cli("harmodt.train", "--resume", "--out", str(old.parent), "--no-progress"), "--resume:", "unsafe", "convert")


def test_convert_makes_the_old_checkpoint_loadable_and_resumable(finished):
    """The converted checkpoint loads safely, holds what the original held, evaluates, and a run
    resumed from it to 10 steps ends as an uninterrupted 10-step run."""
    new = finished / "converted" / "checkpoint.pt"
    new.parent.mkdir()
    proc = cli("harmodt.checkpoint", "convert", str(finished / "old" / "checkpoint.pt"), str(new))
    assert proc.returncode == 0 and "wrote" in proc.stdout, proc.stderr
    conv = torch.load(new, weights_only=True)
    orig = torch.load(finished / "run" / "checkpoint.pt", weights_only=True)
    del orig["run"]
    assert_equal_tree(conv, orig)
    model, masks, info, cfg, step = load_checkpoint(str(new), "cpu")
    assert step == 6 and masks is not None and info["tasks"] == TASKS
    shutil.copytree(finished / "run", finished / "unconverted")
    for name in ("converted", "unconverted"):
        run(tiny(finished / name, steps=10, resume=True, allow_changed=["steps"]), datasets(TASKS))
    a = torch.load(finished / "unconverted" / "checkpoint.pt", weights_only=True)
    b = torch.load(new, weights_only=True)
    assert a["step"] == b["step"] == 10
    for key in ("model", "masks", "optimizer", "rng"):
        assert_equal_tree(a[key], b[key], key)
    # the converted run's metric lines before step 6 were kept by step (it records no size)
    steps = [json.loads(line)["step"] for line in (finished / "converted" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 10


def test_convert_errors_are_one_line(tmp_path):
    one_error_line(cli("harmodt.checkpoint", "convert", str(tmp_path / "none.pt"), str(tmp_path / "new.pt")), "checkpoint not found")
    (tmp_path / "empty.pt").write_bytes(b"")
    one_error_line(cli("harmodt.checkpoint", "convert", str(tmp_path / "empty.pt"), str(tmp_path / "new.pt")), "(empty file)")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    one_error_line(cli("harmodt.checkpoint", "convert", str(tmp_path / "other.pt"), str(tmp_path / "new.pt")),
                   "not a harmodt training checkpoint")
    assert not (tmp_path / "new.pt").exists()


def test_save_is_atomic_when_the_write_stops_halfway(tmp_path, monkeypatch):
    """A write that stops inside the temporary file, before its rename, leaves the previous
    checkpoint whole and loadable and no temporary file; a torn temporary file (a kill there) is
    not a checkpoint."""
    path = tmp_path / "checkpoint.pt"
    state = {"model": {"w": torch.arange(10_000.0)}, "config": {"n": 1}, "eval_info": {"tasks": ["reach-v3"]}}
    checkpoint.save(state, path)

    class Stop(Exception):
        pass

    def stop(fd):
        raise Stop

    monkeypatch.setattr(os, "fsync", stop)  # the write stops after the bytes, before the rename
    with pytest.raises(Stop):
        checkpoint.save(dict(state, model={"w": torch.zeros(10_000)}), path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["model"]["w"], state["model"]["w"])
    assert not list(tmp_path.glob("checkpoint.pt.tmp*"))  # the failed write removed its temporary file
    tmp = temp_name(path)
    tmp.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a temporary file torn halfway (a kill mid-write)
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.load(tmp)
    checkpoint.save(state, path)  # the next write goes through a temporary file of its own
    assert torch.equal(checkpoint.load(path)["model"]["w"], state["model"]["w"]) and tmp.exists()


def test_save_keeps_numpy_values_as_plain_types(tmp_path):
    state = {"model": {"w": torch.randn(50)}, "config": {}, "eval_info": {"tasks": []}, "n": np.float32(2.5), "a": np.arange(3)}
    checkpoint.save(state, tmp_path / "a.pt")
    a = checkpoint.load(tmp_path / "a.pt")
    assert torch.equal(a["model"]["w"], state["model"]["w"]) and a["n"] == 2.5 and torch.equal(a["a"], torch.arange(3))


def test_resume_from_a_checkpoint_with_another_config_shape_is_one_line(finished, tmp_path):
    """A checkpoint whose weights are of another model shape than its config says: --resume and
    evaluate each give one line."""
    ck = checkpoint.load(finished / "run" / "checkpoint.pt")
    from harmodt.methods import build_model

    ck["model"] = build_model(dataclasses.replace(tiny(tmp_path).model, n_embd=16), len(TASKS), "harmodt-f").state_dict()
    (tmp_path / "run").mkdir()
    checkpoint.save(ck, tmp_path / "run" / "checkpoint.pt")
    from harmodt.config import ConfigError
    from harmodt.evaluate import EvalError

    with pytest.raises(ConfigError, match=r"does not fit this model \(RuntimeError: Error\(s\) in loading state_dict") as err:
        run(tiny(tmp_path / "run", resume=True), datasets(TASKS))
    assert "\n" not in str(err.value)
    with pytest.raises(EvalError, match="the weights do not fit the model its config describes") as err:
        load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    assert "\n" not in str(err.value)
