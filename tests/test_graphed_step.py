"""The captured training step's logic on the CPU (harmodt/graphed_step.py, ``--cuda-graph``): the
same step over static buffers with every per-step value in a device tensor gives the eager step's
bits, waits for nothing, and passes no per-step Python value to any op (what a CUDA graph would
bake in). Capture and replay themselves run in tests/gpu/test_graphed_step_cuda.py."""

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import harmodt_kernels
from _synthetic import datasets
from harmodt.config import ConfigError, ModelConfig, TrainConfig, validate
from harmodt.graphed_step import auto_problem, graph_problem
from harmodt.methods import METHODS, Method
from harmodt.run.session import describe
from harmodt.steps import MaskedStep
from harmodt.train import Trainer
from test_host_sync import SYNCING

TASKS = ["reach-v3", "push-v3", "door-open-v3"]
NATIVE = "cpu" in harmodt_kernels.available_backends("cpu")


def config(method="harmodt-f", fused=True, tasks_per_batch=1, graph=False, backend=None, dropout=0.1, **kw) -> TrainConfig:
    model = ModelConfig(n_layer=2, n_head=2, n_embd=32, context_len=5, prompt_len=2, dropout=dropout)
    kw.setdefault("cuda_graph", "on" if graph else "off")
    return validate(TrainConfig(tasks=",".join(TASKS), method=method, steps=10, batch_size=4, tasks_per_batch=tasks_per_batch,
                                warmup_steps=3, lr=1e-3, eval_episodes=0, progress=False, model=model, device="cpu", fused=fused,
                                backend=backend or ("cpu" if fused else "auto"), **kw))


def trainer(cfg: TrainConfig) -> Trainer:
    return Trainer(cfg, datasets(TASKS))


def run(tr: Trainer, steps: int, update_at: int | None = None) -> list[torch.Tensor]:
    losses = []
    for _ in range(steps):
        if update_at is not None and tr.step == update_at:
            tr.mask_updater()
        losses.append(tr.train_step(tr.sample_tasks()))
    return losses


def assert_same_state(a: Trainer, b: Trainer) -> None:
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name
    for p, q in zip(a.params, b.params):
        sa, sb = a.opt.state[p], b.opt.state[q]
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[k], sb[k]), k
    if a.task_masks is not None:
        assert torch.equal(a.task_masks.snapshot(), b.task_masks.snapshot())
    assert a.step == b.step and a.sched.get_last_lr() == b.sched.get_last_lr()


CASES = {  # name -> config arguments
    "fused-one-task": dict(),
    "fused-mixed-task": dict(tasks_per_batch=2),
    "fused-mixed-task-uneven": dict(tasks_per_batch=3),  # 4 sequences over 3 tasks: runs of 2, 1 and 1
    "reference-one-task": dict(fused=False, dropout_rng="counter"),
    "dense-prompt-dt": dict(method="prompt-dt"),
    "bf16": dict(precision="bf16"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_graphed_step_gives_the_eager_steps_bits(case):
    """Losses, weights, optimizer state and masks of 5 steps with a mask update after the second
    (the graph's mask copy refreshed outside the step) equal the eager run's bit for bit."""
    kw = CASES[case]
    if kw.get("fused", True) and not NATIVE:
        pytest.skip("the native CPU library is not built")
    eager, graphed = trainer(config(**kw)), trainer(config(graph=True, **kw))
    assert graphed.graphed is not None and eager.graphed is None
    want, got = run(eager, 5, update_at=2), run(graphed, 5, update_at=2)
    for i, (x, y) in enumerate(zip(want, got)):
        assert torch.equal(x, y), f"loss of step {i}"
    assert_same_state(eager, graphed)


def test_static_buffers_keep_their_addresses():
    """The batch, the masks' copy, the gradients, the per-step values and the optimizer's masks
    stay where a captured graph would read them, across steps and a mask update."""
    tr = trainer(config(fused=False, dropout_rng="counter", graph=True))
    run(tr, 2)
    g = tr.graphed

    def addresses():
        return ([t.data_ptr() for t in g.batch.values()], [m.data_ptr() for m in g.masks.values()],
                [t.data_ptr() for t in g.grads if t is not None], g.values.step.data_ptr(), [t.data_ptr() for t in g.values.lrs],
                [t.data_ptr() for t in g.keep.values()])

    before = addresses()
    tr.mask_updater()
    run(tr, 2)
    assert addresses() == before
    assert all(torch.equal(a, b) for a, b in zip(g.masks.values(), tr.task_masks.for_op(tr.backends.masked_linear).values()))
    assert all(p.grad is s for p, s in zip(g.params, g.grads))


class OpArguments(TorchDispatchMode):
    """Every op called, with the arguments that are not tensors (what a CUDA graph bakes in)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = [x for x in pytree.tree_leaves((args, kwargs)) if not isinstance(x, torch.Tensor)]
        self.calls.append((str(func), tuple(repr(x) for x in leaves)))
        return func(*args, **kwargs)


def body_ops(tr: Trainer, body) -> list:
    with OpArguments() as rec:
        body()
    return rec.calls


def test_no_per_step_python_value_reaches_an_op():
    """Two steps of the graphed body at different steps, learning rates (warm-up), dropout seeds
    and tasks call the same ops with the same non-tensor arguments: everything that changes per
    step reaches the ops in tensors. (The reference backend: the ops a CUDA graph records are
    ATen's and Triton's; the native CPU backend is never captured.)"""
    tr = trainer(config(fused=False, dropout_rng="counter", graph=True))
    run(tr, 1)
    g = tr.graphed
    seen = []
    for task in (0, 2):
        g._load_batch(tr.batcher.sample([task], tr.cfg.batch_size), 1)
        g.values.set(tr.step, [grp["lr"] for grp in tr.opt.param_groups])
        seen.append(body_ops(tr, g.body))
        tr.sched.step()
        tr.step += 1
    assert seen[0] == seen[1]
    assert len(seen[0]) > 100


def test_the_op_check_sees_a_per_step_python_value():
    """The comparison above fails on the eager step, which passes the seed, the learning rate and
    the task as Python values."""
    tr = trainer(config(fused=False, dropout_rng="counter"))
    calls = [body_ops(tr, lambda: tr.train_step([t])) for t in (0, 2)]
    assert calls[0] != calls[1]


def test_graphed_step_has_no_host_sync():
    """The graphed step (copies into the static buffers and the per-step values included) reads
    nothing back from the device (tests/test_host_sync.py's operators), with counter dropout on
    the ops a GPU runs (the reference here; the native CPU backend reads the seed and learning-rate
    tensors on the host, as CPU tensors allow: it never runs on a GPU): HarmoDT-F with one task per
    batch, dense Prompt-DT with mixed-task batches."""
    from torch.profiler import ProfilerActivity, profile

    cases = [dict(fused=False, dropout_rng="counter"), dict(method="prompt-dt", backend="reference", tasks_per_batch=2)]
    for kw in cases:
        tr = trainer(config(graph=True, **kw))
        run(tr, 2)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(tr, 3)
        found = {e.name for e in prof.events() if e.name in SYNCING}
        assert found == set(), (kw, found)


@pytest.mark.parametrize("kw,needle", [
    (dict(method="pcgrad"), "--cuda-graph on: --method pcgrad computes per-task gradients"),
    (dict(clip_scope="unmasked"), "--cuda-graph on: --clip-scope unmasked"),
])
def test_unsupported_runs_fail_in_one_line(kw, needle):
    if not NATIVE:
        pytest.skip("the native CPU library is not built")
    with pytest.raises(ConfigError, match=needle) as err:
        trainer(config(graph=True, **kw))
    assert "\n" not in str(err.value)
    tr = trainer(config(**kw))  # the same run without --cuda-graph on: eager, the reason in graph_problem
    assert tr.graphed is None and graph_problem(tr) in str(err.value)


def test_mixed_task_reference_is_refused():
    with pytest.raises(ConfigError, match="--cuda-graph on needs --fused"):
        config(fused=False, tasks_per_batch=2, graph=True)
    with pytest.raises(ConfigError, match="--cuda-graph on: a mixed-task batch on the reference ops"):
        trainer(config(backend="reference", tasks_per_batch=2, graph=True))


class ScaledLoss(MaskedStep):
    """A toy step rule of its own: three times the action loss plus a small penalty on the predicted
    actions."""

    def loss(self, pred, batch, count):
        return 3.0 * super().loss(pred, batch, count) + 0.01 * pred.float().square().mean()


class OwnCall(MaskedStep):
    """A toy step rule whose eager step is its own ``__call__``: a graph cannot run it."""

    def __call__(self, task_ids):
        return super().__call__(task_ids) * 1.0


class OwnCapture(MaskedStep):
    """A toy step rule that changes its forward's context on the host, from the step's task list."""

    def capture(self, ctx, task_ids):
        return super().capture(ctx, task_ids[::-1])


def toy(monkeypatch, name: str, rule) -> str:
    monkeypatch.setitem(METHODS, name, Method(name, name, "tab:brown", masks="learned", importance="fisher", step_rule=rule))
    return name


def test_a_method_with_its_own_step_rule_is_captured_as_it_is(monkeypatch):
    """The graphed step runs the method's own step rule: a toy method whose rule changes the loss
    gives its eager run's losses, weights, optimizer state and masks bit for bit, which differ
    from the stock HarmoDT-F step's (the graph runs no step of its own)."""
    method = toy(monkeypatch, "harmodt-scaled", ScaledLoss)
    kw = dict(fused=False, dropout_rng="counter")
    eager, graphed = trainer(config(method=method, **kw)), trainer(config(method=method, graph=True, **kw))
    stock = trainer(config(graph=True, **kw))
    assert isinstance(graphed.graphed.rule, ScaledLoss)
    want, got, other = run(eager, 4, update_at=2), run(graphed, 4, update_at=2), run(stock, 4, update_at=2)
    for i, (x, y) in enumerate(zip(want, got)):
        assert torch.equal(x, y), f"loss of step {i}"
    assert_same_state(eager, graphed)
    assert not any(torch.equal(x, y) for x, y in zip(got, other))


def test_a_step_rule_a_graph_cannot_run_is_refused_or_runs_eager(monkeypatch):
    """A rule with its own host-side ``__call__`` or ``capture``, or a bare function, is never
    replaced by the stock step: ``--cuda-graph on`` refuses it in one line naming it; ``auto``
    trains it eager."""
    cases = ((toy(monkeypatch, "harmodt-own-call", OwnCall), "its step rule OwnCall has its own __call__"),
             (toy(monkeypatch, "harmodt-own-capture", OwnCapture), "its step rule OwnCapture has its own capture"),
             (toy(monkeypatch, "harmodt-bare", lambda tr: MaskedStep(tr).__call__), "step rule PlainStep.__call__ has no step()"))
    for method, needle in cases:
        with pytest.raises(ConfigError, match=f"--cuda-graph on: .*{needle}"):
            trainer(config(method=method, fused=False, graph=True))
        tr = trainer(config(method=method, fused=False, cuda_graph="auto"))
        assert tr.graphed is None and needle.split(" has ")[0] in graph_problem(tr)


@pytest.mark.parametrize("kw,reason", [
    (dict(), None),  # --fused: counter dropout, captured with the eager bits
    (dict(method="prompt-dt", tasks_per_batch=2), None),
    (dict(dropout=0.0, fused=False), None),
    (dict(fused=False), "dropout from torch's RNG"),
    (dict(compile=True), "--compile with dropout"),
    (dict(compile=True, dropout=0.0), None),
])
def test_auto_graphs_a_cuda_run_whose_bits_are_checked(kw, reason):
    """``--cuda-graph auto`` on a CUDA device: the runs whose graphed bits are the eager step's
    (tests/gpu/test_graphed_step_cuda.py); any other device: eager."""
    cfg = config(cuda_graph="auto", **{"fused": True, "backend": "auto", **kw})
    got = auto_problem(cfg, torch.device("cuda"))
    assert got is None if reason is None else reason in got
    assert auto_problem(cfg, torch.device("cpu")) == "no CUDA graph on cpu"


def test_the_start_line_says_which_step_runs_and_why():
    """One line: eager on a CPU under ``auto`` (why), graphed under ``on`` (uncaptured there), eager under ``off``."""
    kw = dict(fused=False, dropout_rng="counter")
    lines = {mode: describe(trainer(config(cuda_graph=mode, **kw))) for mode in ("auto", "on", "off")}
    assert lines["auto"].endswith("step=eager (--cuda-graph auto: no CUDA graph on cpu)")
    assert lines["on"].endswith("step=graphed (uncaptured on cpu)")
    assert lines["off"].endswith("step=eager (--cuda-graph off)")
    assert all("\n" not in line for line in lines.values())
