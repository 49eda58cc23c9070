"""The batched task gradients of the mask update (``--mask-grads-passes batched``: every task in
one mixed-task forward and backward) against the per-task reference loop.

The bound: each task's gbar_i and g_i within 1e-5 of that task's largest gradient entry (absolute,
per row; the rounding of fp32 sums over a different number of rows or through a ones mask
instead of ``F.linear``, as a GPU's kernels may sum). On the CPU with one thread the kernels
(reference and native) run each task's rows as a GEMM of their own, as the loop does, so the
gradients are the loop's bit for bit, and a run selects the same masks and trains the same weights
on fixed seeds; with more threads a GEMM over the pass's rows (attention, the unmasked layers) may
be split otherwise than over one task's, so the gradients agree within the bound. The shapes
are awkward on purpose: widths that are not multiples of the 32-bit mask words, one task and odd
task counts, subsets of the tasks (a torchrun rank's share), no masks (Prompt-DT).
"""

import contextlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic import datasets  # noqa: E402

from harmodt.config import ConfigError, ModelConfig, TrainConfig, validate  # noqa: E402
from harmodt.mask_grads import task_gradients  # noqa: E402
from harmodt.run.cli import parse_args  # noqa: E402
from harmodt.run.session import describe  # noqa: E402
from harmodt.train import Trainer  # noqa: E402

ALL_TASKS = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "button-press-v3", "window-open-v3")
REL = 1e-5  # |batched - per-task| <= REL * max_j |per-task row i| for every task i


def trainer(tmp_path, n_tasks=3, method="harmodt-f", recovery_grad="dense", backend=None, n_embd=40, n_head=2, passes="per-task",
            steps=40, **kw) -> Trainer:
    tasks = ALL_TASKS[:n_tasks]
    cfg = TrainConfig(tasks=",".join(tasks), method=method, steps=steps, batch_size=3, out=str(tmp_path / "run"), progress=False,
                      device="cpu", fused=backend is not None, backend=backend or "auto",
                      model=ModelConfig(n_layer=2, n_head=n_head, n_embd=n_embd, context_len=4, prompt_len=2), **kw)
    cfg.masks.recovery_grad = recovery_grad
    cfg.masks.mask_grads_passes = passes
    cfg.masks.eta_max = 50
    tr = Trainer(validate(cfg), datasets(tasks))
    if backend is not None and tr.backends.masked_linear.backend.name != backend:
        pytest.skip(f"the {backend} kernels cannot run here")
    for _ in range(3):  # away from the initialisation
        tr.train_step(tr.sample_tasks())
    return tr


def both(tr: Trainer, tasks: list[int] | None = None):
    """(per-task, batched) task gradients of ``tasks`` (default every task) on the same batches."""
    tasks = list(range(len(tr.tasks))) if tasks is None else tasks
    batches = [(i, tr.batcher.sample([i], tr.cfg.batch_size)) for i in tasks]
    m = tr.cfg.masks
    return [task_gradients(tr.model, tr.weights, tr.task_masks, tr.backends.masked_linear, batches, len(tr.tasks),
                           mask_grads="paper", recovery_grad=m.recovery_grad, grad_clip=tr.cfg.grad_clip, passes=p)
            for p in ("per-task", "batched")]


@contextlib.contextmanager
def one_thread():
    """ATen's GEMMs on one thread (restored afterwards): the same split whatever a GEMM's row count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def assert_within_bound(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = want.abs().amax(dim=1, keepdim=True)  # (T, 1): each task's largest entry
    assert torch.all((got - want).abs() <= REL * scale), float(((got - want).abs() / scale.clamp(min=1e-30)).max())


@pytest.mark.parametrize("backend,recovery_grad", [(None, "dense"), (None, "masked"), ("cpu", "dense"), ("cpu", "masked"),
                                                   pytest.param("triton", "dense", marks=[pytest.mark.interpreter, pytest.mark.long])])
def test_batched_gradients_match_the_per_task_loop(tmp_path, backend, recovery_grad):
    """Every backend's masked linear (Triton's under the interpreter on the CPU: about 4 minutes), both
    recovery gradients, K = 40 and N = 120 / 160 (not multiples of 32), 3 tasks."""
    tr = trainer(tmp_path, recovery_grad=recovery_grad, backend=backend, steps=40 if backend != "triton" else 4)
    (gbar, g), (gbar_b, g_b) = both(tr)
    assert_within_bound(gbar_b, gbar)
    assert_within_bound(g_b, g)
    if backend != "triton":  # the CPU kernels run each task's rows as a GEMM of their own, as the loop does: the same bits
        with one_thread():
            (gbar, g), (gbar_b, g_b) = both(tr)
        assert torch.equal(gbar_b, gbar) and torch.equal(g_b, g)
    active = torch.cat([tr.task_masks.masks[n].flatten(1) for n in tr.weights], dim=1)
    assert torch.all(gbar_b[~active] == 0) and gbar.abs().amax() > 0


@pytest.mark.parametrize("n_tasks,n_embd,n_head", [(1, 24, 3), (7, 36, 4)])
def test_batched_gradients_on_awkward_shapes(tmp_path, n_tasks, n_embd, n_head):
    tr = trainer(tmp_path, n_tasks=n_tasks, n_embd=n_embd, n_head=n_head, backend="cpu")
    (gbar, g), (gbar_b, g_b) = both(tr)
    assert gbar_b.shape == (n_tasks, sum(w.numel() for w in tr.weights.values()))
    assert_within_bound(gbar_b, gbar)
    assert_within_bound(g_b, g)


def test_batched_gradients_of_a_share_of_the_tasks(tmp_path):
    """A torchrun rank's share (tasks 1, 4, 6 of 7, out of order of nothing): their rows filled, the others zero."""
    tr = trainer(tmp_path, n_tasks=7, backend="cpu")
    (gbar, g), (gbar_b, g_b) = both(tr, [1, 4, 6])
    assert_within_bound(gbar_b, gbar)
    assert_within_bound(g_b, g)
    assert gbar_b[[0, 2, 3, 5]].abs().sum() == 0 and g_b[[0, 2, 3, 5]].abs().sum() == 0


@pytest.mark.parametrize("backend", [None, "cpu"])
def test_batched_gradients_without_masks(tmp_path, backend):
    """Prompt-DT (no masks): gbar_i is the plain gradient, g_i None."""
    tr = trainer(tmp_path, method="prompt-dt", backend=backend)
    (gbar, g), (gbar_b, g_b) = both(tr)
    assert g is None and g_b is None
    assert_within_bound(gbar_b, gbar)


def test_batched_gradients_refuse_batches_of_different_sizes(tmp_path):
    tr = trainer(tmp_path, n_tasks=2)
    batches = [(0, tr.batcher.sample([0], 3)), (1, tr.batcher.sample([1], 2))]
    with pytest.raises(ValueError, match="one size"):
        task_gradients(tr.model, tr.weights, tr.task_masks, tr.backends.masked_linear, batches, 2, mask_grads="paper",
                       recovery_grad="dense", grad_clip=0.25, passes="batched")


def run_updates(tmp_path, passes: str, backend, n_tasks: int, updates: int = 3) -> list[tuple]:
    """One run of the fixed seed through ``updates`` mask updates at mid-run alpha with two training
    steps after each; per update (its log line, the masks, the batch draw's state), then the weights.
    Each run is made and trained alone: the runs share torch's global RNG, which dropout draws from."""
    tr = trainer(tmp_path / passes, n_tasks=n_tasks, backend=backend, passes=passes)
    assert tr.mask_updater.passes == passes
    out = []
    for update in range(updates):
        tr.step = tr.cfg.steps // 2 + update
        info = tr.mask_updater()
        out.append((info, tr.task_masks.snapshot(), tr.batcher.generator.get_state()))
        for _ in range(2):
            tr.train_step(tr.sample_tasks())
    return out + [[p.detach().clone() for p in tr.model.parameters()]]


@pytest.mark.parametrize("backend,n_tasks", [(None, 3), ("cpu", 3), ("cpu", 7)])
def test_batched_mask_update_selects_the_same_masks(tmp_path, backend, n_tasks):
    """Two runs of one seed, one per task-gradient pass, through three mask updates at mid-run
    alpha with training steps between: after each update the same batches drawn, the same masks,
    and at the end the same weights (on the CPU with one thread the batched gradients equal the loop's bit for bit)."""
    with one_thread():
        ref, got = (run_updates(tmp_path, p, backend, n_tasks) for p in ("per-task", "batched"))
    for (info, masks, draws), (info_b, masks_b, draws_b) in zip(ref[:-1], got[:-1]):
        assert info["alpha"] >= 49 and sum(info["masked_per_task"]) > 0
        assert info == info_b
        assert torch.equal(draws, draws_b) and torch.equal(masks, masks_b)
    for a, b in zip(ref[-1], got[-1]):
        assert torch.equal(a, b)


def test_mask_grads_passes_flag(tmp_path):
    """``--mask-grads-passes``: auto is per-task on the CPU; batched with --mask-grads official is refused in one line."""
    assert parse_args(["--mask-grads-passes", "batched"]).masks.mask_grads_passes == "batched"
    tr = trainer(tmp_path, passes="auto")
    assert tr.mask_updater.passes == "per-task" and " mask-grads-passes=per-task (auto) step=" in describe(tr)
    cfg = TrainConfig(tasks="reach-v3", out=str(tmp_path / "x"))
    cfg.masks.mask_grads, cfg.masks.mask_grads_passes = "official", "batched"
    with pytest.raises(ConfigError, match="--mask-grads-passes batched needs --mask-grads paper"):
        validate(cfg)
