"""The training step captured as one CUDA graph and replayed (``--cuda-graph on``, and ``auto``, the
default, harmodt/graphed_step.py) against the same run eager (``--cuda-graph off``) on the same GPU
(marker ``cuda``; skipped without a GPU). Run on a GPU machine: ``python -m pytest tests/gpu -m cuda``.

Bit-identical is the claim: the graph replays the eager step's kernels on the same inputs (tf32 and
bf16 included; cuBLAS picks the same algorithm for the same shapes in a graph and out of it). The
tests compare with ``torch.equal``; where a run differs, the assertion names the first step."""

import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import keystr, tree_flatten_with_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from _synthetic import datasets  # noqa: E402

import harmodt_kernels  # noqa: E402
from harmodt.config import ModelConfig, TrainConfig, validate  # noqa: E402
from harmodt.train import Trainer, run  # noqa: E402

TASKS = ["reach-v3", "push-v3", "door-open-v3"]


def cfg(tmp_path, graph: bool, dropout: float = 0.1, **kw) -> TrainConfig:
    model = ModelConfig(n_layer=2, n_head=2, n_embd=64, context_len=5, prompt_len=2, dropout=dropout)
    base = dict(tasks=",".join(TASKS), method="harmodt-f", steps=12, batch_size=8, warmup_steps=4, lr=1e-3, eval_episodes=0,
                out=str(tmp_path / ("graph" if graph else "eager")), progress=False, model=model, device="cuda", fused=True,
                cuda_graph="on" if graph else "off")
    base.update(kw)
    c = TrainConfig(**base)
    c.masks.update_every = 5
    c.masks.eta_max = 50
    return validate(c)


def train(c, steps=12):
    tr = Trainer(c, datasets(TASKS))
    losses = []
    for _ in range(steps):
        if tr.step > 0 and tr.step % c.masks.update_every == 0:
            tr.mask_updater()
        losses.append(tr.train_step(tr.sample_tasks()))
    torch.cuda.synchronize()
    return tr, torch.stack(losses).cpu()


CASES = {
    "fp32": dict(),
    "tf32": dict(),
    "bf16": dict(precision="bf16"),
    "mixed-task": dict(tasks_per_batch=3),  # 8 sequences over 3 tasks: runs of 3, 3 and 2
    "prompt-dt": dict(method="prompt-dt"),
    # without dropout: under --compile the eager and the graphed step are traced as two graphs (the graphed one reads its
    # dropout seeds from a tensor), and Inductor rounds (counter dropout) or draws (torch's dropout) differently in each;
    # run under Inductor's deterministic mode (deterministic_inductor): without it two eager --compile runs already differ
    "compile": dict(compile=True, dropout=0.0),
}


@contextmanager
def deterministic_inductor():
    """``torch.use_deterministic_algorithms(True)`` and Inductor's ``deterministic`` config: without
    them Inductor's generated backward differs run to run in the last bits."""
    import torch._inductor.config as inductor_config

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with inductor_config.patch(deterministic=True):
            yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.parametrize("case", list(CASES))
def test_graph_replay_equals_eager(tmp_path, case):
    """12 steps with mask updates at 5 and 10 (outside the graph): losses, weights, optimizer state
    and masks of the graphed run equal the eager run's bit for bit."""
    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if case == "tf32" else "highest")
    try:
        with deterministic_inductor() if case == "compile" else nullcontext():
            eager, want = train(cfg(tmp_path, False, **CASES[case]))
            graphed, got = train(cfg(tmp_path, True, **CASES[case]))
    finally:
        torch.set_float32_matmul_precision(prec)
    assert graphed.graphed.graph is not None  # captured after the warm-up, then replayed
    diff = (want != got).nonzero()
    assert diff.numel() == 0, f"losses differ from step {int(diff[0])}: {want.tolist()} vs {got.tolist()}"
    for (n, a), b in zip(eager.model.state_dict().items(), graphed.model.state_dict().values()):
        assert torch.equal(a, b), n
    for p, q in zip(eager.params, graphed.params):
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(eager.opt.state[p][k], graphed.opt.state[q][k]), k
    if eager.task_masks is not None:
        assert torch.equal(eager.task_masks.snapshot(), graphed.task_masks.snapshot())


def test_auto_graphs_a_fused_cuda_run(tmp_path):
    """``--cuda-graph auto`` (the default) captures a --fused run on CUDA, and says so."""
    tr = Trainer(cfg(tmp_path, True, cuda_graph="auto"), datasets(TASKS))
    assert tr.graphed is not None and tr.step_kind.startswith("step=graphed")
    for _ in range(5):
        tr.train_step(tr.sample_tasks())
    assert tr.graphed.graph is not None


def test_replay_launches_no_kernel_from_python(tmp_path):
    """After the capture, a step is one graph replay: the profiler sees no kernel launched by the
    step besides the replay's and the few copies and fills around it (batch, step, learning rates)."""
    from torch.profiler import ProfilerActivity, profile

    tr = Trainer(cfg(tmp_path, True), datasets(TASKS))
    tr.train_step(tr.sample_tasks())
    tables = tr.opt.kernel_workspace["triton_adamw_tables"]  # the Triton AdamW's launch tables, made by the first step
    made = len(tables)
    for _ in range(5):
        tr.train_step(tr.sample_tasks())
    assert len(tables) == made  # the capture found the warm-up's launch table (nothing uploaded inside it)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tr.train_step(tr.sample_tasks())
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert "cudaGraphLaunch" in names
    assert not any(n.startswith("harmodt_triton::") for n in names), sorted({n for n in names if "harmodt" in n})


def test_triton_seed_and_lr_tensors_equal_python_values_on_cuda():
    """The kernels that read the dropout seed and the learning rate from device memory give the
    bits of the by-value launch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g).cuda().requires_grad_()
    w = torch.randn(128, 96, generator=g).cuda().requires_grad_()
    masks = harmodt_kernels.pack_masks(torch.rand(2, 128, 96, generator=g) > 0.3).cuda()
    ids = torch.tensor([1], device="cuda")
    seed = harmodt_kernels.reference.site_seed(5, 2)
    outs = []
    for s in (seed, torch.tensor(seed, device="cuda")):
        x.grad = w.grad = None
        y = harmodt_kernels.masked_linear(x, w, None, masks, ids, backend="triton", relu=True, dropout_p=0.1, seed=s)
        y.backward(torch.ones_like(y))
        d = harmodt_kernels.dropout(x.detach(), 0.2, s, backend="triton")
        outs.append((y.detach(), x.grad.clone(), w.grad.clone(), d))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    ps = [torch.randn(128, 96, generator=g).cuda()]
    res = []
    for lr in (1e-3, torch.tensor(1e-3, dtype=torch.float64, device="cuda")):
        p = [ps[0].clone()]
        m, v, st = [torch.zeros_like(p[0])], [torch.zeros_like(p[0])], [torch.zeros((), device="cuda")]
        harmodt_kernels.masked_adamw_(p, [ps[0] * 0.01], m, v, [masks[0]], st, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                              backend="triton")
        res.append((p[0], m[0], v[0]))
    for a, b in zip(*res):
        assert torch.equal(a, b)


class Interrupted(Exception):
    """Raised from a patched ``Trainer.train_step``: the run stops as a crash would stop it."""


def test_graphed_run_resumes_as_uninterrupted(tmp_path, monkeypatch):
    """A graphed run interrupted after step 7 (its checkpoint at 6 on disk) and resumed (a fresh
    capture) ends with the uninterrupted graphed run's weights, optimizer state and masks. Both
    runs have the same ``steps``: the mask-update schedule (Eq. 12) depends on it."""
    import dataclasses

    full = cfg(tmp_path, True, checkpoint_every=6)
    run(full, datasets(TASKS))
    half = dataclasses.replace(full, out=str(tmp_path / "half"))
    train_step = Trainer.train_step

    def interrupted(self, task_ids):
        loss = train_step(self, task_ids)
        if self.step == 7:
            raise Interrupted
        return loss

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(Interrupted):
        run(half, datasets(TASKS))
    monkeypatch.undo()
    assert torch.load(tmp_path / "half" / "checkpoint.pt", weights_only=True)["step"] == 6
    run(dataclasses.replace(half, resume=True), datasets(TASKS))
    a = torch.load(Path(full.out) / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "half" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 12
    for part in ("model", "masks", "optimizer"):
        (xs, spec), (ys, spec_b) = tree_flatten_with_path(a[part]), tree_flatten_with_path(b[part])
        assert spec == spec_b, part
        for (where, x), (_, y) in zip(xs, ys):
            assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), (part, keystr(where))
