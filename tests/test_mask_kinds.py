"""A mask kind from outside the product (harmodt.mask_kinds.MaskKind): soft per-task float gates,
a float32 gate per task and masked weight, on a plain-PyTorch op of its own. A toy method with
them, registered here (a method table entry, harmodt.methods.register, in the process that
trains), trains, checkpoints, resumes after SIGKILL exactly as the uninterrupted run ends and
evaluates through harmodt.evaluate, with no change to train.py, evaluate.py or policy_inputs.py.

The training processes import this file and register the method before harmodt.train runs; this
process adds it to the table only while a test needs it.
"""

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data_folders import write_ours  # noqa: E402
from test_resume import CRASH, assert_same_run, checkpoint_step, ok, records  # noqa: E402

import harmodt_kernels  # noqa: E402
from harmodt import evaluate  # noqa: E402
from harmodt.mask_kinds import MaskKind  # noqa: E402
from harmodt.methods import METHODS, Method, register  # noqa: E402
from harmodt.training_state import TrainingState  # noqa: E402

TESTS = Path(__file__).resolve().parent
TASKS = ("reach-v3", "push-v3")


@dataclass(frozen=True)
class GatedLinear:
    """``y[r] = x[r] @ (weight * G[task_ids[r]]).T + bias`` with float gates ``G [T, N, K]``; then
    the masked-linear epilogue (ReLU, counter dropout). ``backend``: the run's op's (reported)."""

    backend: object

    def __call__(self, x, weight, bias, gates, task_ids, task_grads=None, segments=None, relu=False, dropout_p=0.0, seed=0):
        if task_grads is not None:
            raise ValueError("soft gates do not capture per-task gradients (--clip-scope masked)")
        if task_ids.shape[0] == 1:
            y = F.linear(x, weight * gates[task_ids[0]], bias)
        else:
            y = torch.einsum("rk,rnk->rn", x, weight * gates.index_select(0, task_ids))
            y = y if bias is None else y + bias
        y = F.relu(y) if relu else y
        return harmodt_kernels.reference.dropout(y, dropout_p, seed) if dropout_p > 0 else y


class SoftGates:
    """A gate in [0, 1] per task and masked weight (float32 ``[T, N, K]`` per matrix), drawn
    uniformly from the run's seed. The optimizer may change every weight; Eq. 13's vote for an
    unseen task: the tasks' mean gate where more than ``threshold`` tasks' gates exceed 1/2, else 0."""

    def __init__(self, gates: dict):
        self.gates = gates

    @property
    def n_tasks(self) -> int:
        return next(iter(self.gates.values())).shape[0]

    @classmethod
    def build(cls, weights, n_tasks, masks_cfg, seed, device):
        g = torch.Generator().manual_seed(seed + 1)
        return cls({n: torch.rand(n_tasks, *w.shape, generator=g).to(device) for n, w in weights.items()})

    def state(self, names):
        return {"kind": "soft-gates", "tasks": list(names), "gates": {n: g.cpu().clone() for n, g in self.gates.items()}}

    @classmethod
    def from_state(cls, d, names=None, device="cpu", weights=None):
        names = list(d["tasks"]) if names is None else list(names)
        missing = [t for t in names if t not in d["tasks"]]
        if missing:
            raise ValueError(f"the checkpoint holds no gates of task {missing[0]!r}")
        order = [d["tasks"].index(t) for t in names]
        kind = cls({n: g[order].to(device) for n, g in d["gates"].items()})
        for n, w in (weights or {}).items():
            if n not in kind.gates or kind.gates[n].shape[1:] != w.shape:
                raise ValueError(f"gates of {n} do not fit its weight {tuple(w.shape)}")
        return kind

    def to(self, device):
        return SoftGates({n: g.to(device) for n, g in self.gates.items()})

    def tensors(self):
        return list(self.gates.values())

    def for_op(self, op):
        return self.gates

    def linear_op(self, op):
        return GatedLinear(op.backend)

    def keep(self, task_ids, op):
        return None

    def keep_on_device(self, masks, task_ids, out):
        return None

    def vote(self, threshold):
        return {n: torch.where((g > 0.5).sum(0) > threshold, g.mean(0), 0.0) for n, g in self.gates.items()}

    def rows(self, rows, vote=None):
        full = self.gates if vote is None else {n: torch.cat([g, vote[n].unsqueeze(0)]) for n, g in self.gates.items()}
        return {n: g[rows] for n, g in full.items()}


class GateDrift:
    """Every ``--update-every`` steps, task t's gates move a tenth of the way towards
    ``sigmoid((t + 1) |w|)``: masks that change during training, as a checkpoint must keep them."""

    def __init__(self, state: TrainingState):
        self.tr, self.every, self.last_harmony = state, state.cfg.masks.update_every, None

    def due(self, step: int) -> bool:
        return step > 0 and step % self.every == 0

    def __call__(self) -> dict:
        gates = self.tr.task_masks.gates
        for n, w in self.tr.weights.items():
            scale = torch.arange(1, gates[n].shape[0] + 1, device=w.device).view(-1, 1, 1)
            gates[n].mul_(0.9).add_(0.1 * torch.sigmoid(scale * w.detach().abs()))
        return {"gate_mean": float(torch.cat([g.flatten() for g in gates.values()]).mean())}

    def movement(self):
        return None


# the toy method: the table entry a plugin would register (the training processes below call register(TOY))
TOY = Method("soft-gates", "Soft gates", "tab:pink", masks="fixed", mask_kind=SoftGates, mask_updater=GateDrift)

# 12 steps: checkpoints every 3, gate updates at 4 and 8, a metric line every 2 steps
ARGS = ["--method", "soft-gates", "--tasks", ",".join(TASKS), "--steps", "12", "--batch-size", "4", "--n-layer", "2", "--n-embd", "32",
        "--n-head", "2", "--context-len", "5", "--prompt-len", "2", "--update-every", "4", "--eval-episodes", "0", "--log-every", "2",
        "--checkpoint-every", "3", "--warmup-steps", "2", "--lr", "1e-3", "--device", "cpu", "--threads", "1", "--no-progress"]


def train(out: Path, args: list, kill: str | None = None, resume: bool = False) -> subprocess.CompletedProcess:
    """``python -m harmodt.train`` (or tests/_crash.py killing itself at ``kill``) in a process that
    imported this file first: the toy method is in its table."""
    argv = [*args, "--out", str(out), *(["--resume"] if resume else [])]
    run = (f"import runpy; sys.argv = {[str(CRASH), kill, '--', *argv]!r}; runpy.run_path({str(CRASH)!r}, run_name='__main__')"
           if kill else f"from harmodt.train import main; sys.exit(main({argv!r}))")
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_mask_kinds as t; t.register(t.TOY); {run}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)


def test_every_kind_follows_the_protocol():
    """The built-in kinds and this file's are MaskKinds; a dense method has none."""
    from harmodt.config import MaskConfig

    weights = {"w": torch.zeros(4, 40)}
    assert isinstance(SoftGates.build(weights, 3, None, 0, "cpu"), MaskKind)
    for name in ("harmodt-r", "harmodt-s", "harmodt-f"):
        assert isinstance(METHODS[name].mask_kind.build(weights, 3, MaskConfig(), 0, torch.device("cpu")), MaskKind), name
    assert METHODS["prompt-dt"].mask_kind is None
    with pytest.raises(ValueError, match="a mask kind needs masks"):
        Method("dense-gates", "x", "tab:pink", mask_kind=SoftGates)


@pytest.mark.long
@pytest.mark.parametrize("variant", ["eager", "graphed"])
def test_soft_gates_train_resume_after_sigkill_and_evaluate(tmp_path, monkeypatch, variant):
    """Killed after step 5 (checkpoint at 3, gates moved at 4) and resumed: the same final
    checkpoint (weights, gates, optimizer, RNG streams), results and metric lines as the run that
    was not killed; its gates moved from their draw and differ per task; the checkpoint
    evaluates through harmodt.evaluate on the gates (a seen and an unseen task, Eq. 13's vote)."""
    args = ARGS + ["--data", str(write_ours(tmp_path / "data", TASKS, episodes=4, length=30))]
    if variant == "graphed":
        args += ["--dropout-rng", "counter", "--cuda-graph", "on"]
    ref, out = tmp_path / "ref", tmp_path / "killed"
    ok(train(ref, args))
    killed = train(out, args, kill="step:5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert checkpoint_step(out) == 3
    resumed = ok(train(out, args, resume=True))
    assert "resumed from" in resumed.stdout
    assert_same_run(ref, out)
    assert len([r for r in records(ref) if "gate_mean" in r]) == 2  # the gate updates at 4 and 8

    ck = torch.load(ref / "checkpoint.pt", weights_only=True)
    assert ck["masks"]["kind"] == "soft-gates" and ck["masks"]["tasks"] == list(TASKS)
    monkeypatch.setitem(METHODS, TOY.name, TOY)  # this process evaluates the toy method's checkpoint
    model, gates, *_ = evaluate.load_checkpoint(str(ref / "checkpoint.pt"))
    drawn = SoftGates.build(model.masked_weights(), 2, None, 0, "cpu")
    for n, g in ck["masks"]["gates"].items():
        assert g.dtype == torch.float32 and not torch.equal(g, drawn.gates[n]) and not torch.equal(g[0], g[1]), n

    assert isinstance(gates, SoftGates) and torch.equal(gates.gates[n], g)
    res = tmp_path / "eval.json"
    assert evaluate.main([str(ref / "checkpoint.pt"), "--tasks", "reach-v3,window-open-v3", "--episodes", "1", "--vote-threshold", "0",
                          "--device", "cpu", "--no-progress", "--out", str(res)]) == 0
    tasks = json.loads(res.read_text())["tasks"]
    assert set(tasks) == {"reach-v3", "window-open-v3"}


def test_gated_rows_are_their_tasks_forwards():
    """Each row goes through its own task's gates (a mixed batch equals one-task calls), and the
    gates change the output (not the dense layer's)."""
    torch.manual_seed(0)
    w, x = torch.randn(8, 16), torch.randn(3, 16)
    kind = SoftGates.build({"w": w}, 2, None, 0, "cpu")
    op = kind.linear_op(harmodt_kernels.REFERENCE_OPS.masked_linear)
    g = kind.for_op(op)["w"]
    both = op(x, w, None, g, torch.tensor([0, 1, 1]))
    assert torch.allclose(both[:1], op(x[:1], w, None, g, torch.tensor([0])), atol=1e-6)
    assert torch.allclose(both[1:], op(x[1:], w, None, g, torch.tensor([1])), atol=1e-6)
    assert not torch.allclose(both, F.linear(x, w), atol=1e-3)
