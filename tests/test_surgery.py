"""Gradient-surgery baselines: the PCGrad and CAGrad rules on hand-worked and brute-forced
problems, their invariances, the training step that feeds them, and a SIGKILL-resumed run of each."""

import concurrent.futures
import json
import math
import signal

import numpy as np
import pytest
import torch

from _data_folders import write_ours
from _synthetic import datasets
from harmodt.baselines import CAGradOptions, cagrad, cagrad_direction, cagrad_weights, pcgrad, pcgrad_direction, random_orders
from harmodt.baselines.cagrad import dual_objective, project_simplex
from harmodt.config import ConfigError, ModelConfig, TrainConfig, config_from_dict, validate
from harmodt.model import action_loss
from harmodt.run.cli import parse_args
from harmodt.train import Trainer
from test_resume import SYNTHETIC, assert_same_run, checkpoint_step, ok, records, train

T = torch.tensor


# ---- PCGrad ---------------------------------------------------------------------------------
def pcgrad_by_definition(grads: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """PCGrad written out on the vectors: each g_i projected in turn against the original g_j it conflicts with."""
    out = torch.zeros_like(grads[0])
    for i in range(grads.shape[0]):
        g = grads[i].clone()
        for j in orders[i].tolist():
            dot = g @ grads[j]
            if dot < 0:
                g = g - dot / (grads[j] @ grads[j]) * grads[j]
        out += g
    return out


def test_pcgrad_two_conflicting_gradients_by_hand():
    # g1 = (1, 0), g2 = (-1, 1): g1.g2 = -1 < 0
    # g1' = g1 - (-1 / |g2|^2) g2 = (1, 0) + (-1, 1) / 2 = (0.5, 0.5);  g2' = g2 - (-1 / |g1|^2) g1 = (0, 1)
    grads = T([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    # Every value on the way (the Gram matrix, the coefficients 1/2 and 1, the result) is a small
    # dyadic number, exact in float64 in any order of summation: the result is exact.
    out = pcgrad(grads, T([[1], [0]]))
    assert torch.equal(out, T([0.5, 1.5], dtype=torch.float64))
    # each projected gradient is orthogonal to the other original one
    assert (T([0.5, 0.5], dtype=torch.float64) @ grads[1]) == 0


def test_pcgrad_without_conflict_returns_the_sum():
    grads = T([[1.0, 2.0, 0.0], [0.5, 0.0, 1.0], [2.0, 1.0, 3.0]])  # every pairwise inner product >= 0
    assert (grads @ grads.T >= 0).all()
    # No conflict leaves the coefficients at the identity, and the sums of these dyadic entries are
    # exact in float32 in any order: the sum is exact.
    out = pcgrad(grads, random_orders(3, torch.Generator().manual_seed(0)))
    assert torch.equal(out, grads.sum(0))
    # pcgrad_direction() divides by T: the mean gradient, Prompt-DT's scale. Dividing the exact sum by 3
    # rounds once; mean() may multiply by a rounded 1/3 instead (two roundings): at most 2 float32 ulps apart.
    two_ulps = 2 * torch.finfo(torch.float32).eps
    assert torch.allclose(pcgrad_direction(grads, None, torch.Generator().manual_seed(0)), grads.mean(0), rtol=two_ulps, atol=0)


def test_pcgrad_of_two_tasks_does_not_depend_on_the_order_draws():
    grads = torch.randn(2, 50, generator=torch.Generator().manual_seed(1))
    grads[1] -= 2 * grads[0]  # make them conflict
    assert grads[0] @ grads[1] < 0
    outs = [pcgrad_direction(grads, None, torch.Generator().manual_seed(s)) for s in range(4)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("seed", range(5))
def test_pcgrad_matches_its_definition_on_random_problems(seed):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(5, 40, generator=g, dtype=torch.float64) + 0.3 * torch.randn(40, generator=g, dtype=torch.float64)
    orders = random_orders(5, g)
    # float64, the Gram-matrix route against the vector route: they differ by roundings, about
    # T * P * eps64 ~ 4e-14 of an entry (measured: 6e-14 entry-wise with AVX-512, AVX2 and baseline
    # kernels; the entries are >= 0.19 here, so atol never decides). rtol 1e-10: 1000x that.
    assert torch.allclose(pcgrad(grads, orders), pcgrad_by_definition(grads, orders), rtol=1e-10, atol=1e-12)


def test_pcgrad_depends_on_the_order_with_three_tasks():
    """With three tasks the order matters (so the seeded draw is part of the method)."""
    grads = T([[1.0, 0.0], [-1.0, 0.2], [-0.2, -1.0]], dtype=torch.float64)
    a = pcgrad(grads, T([[1, 2], [0, 2], [0, 1]]))
    b = pcgrad(grads, T([[2, 1], [2, 0], [1, 0]]))
    assert not torch.allclose(a, b)
    assert torch.allclose(a, pcgrad_by_definition(grads, T([[1, 2], [0, 2], [0, 1]])))


def test_random_orders_are_seeded_permutations_of_the_other_tasks():
    a = random_orders(6, torch.Generator().manual_seed(3))
    b = random_orders(6, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (6, 5)
    for i in range(6):
        assert sorted(a[i].tolist()) == [j for j in range(6) if j != i]
    assert not torch.equal(a, random_orders(6, torch.Generator().manual_seed(4)))
    assert random_orders(1, torch.Generator()).shape == (1, 0)


# ---- CAGrad ---------------------------------------------------------------------------------
def test_cagrad_at_c_zero_is_the_mean_gradient():
    grads = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cagrad(grads, 0.0), grads.mean(0))
    assert torch.equal(cagrad_direction(grads, CAGradOptions(0.0), torch.Generator()), grads.mean(0))


def test_cagrad_two_orthogonal_gradients_by_hand():
    # g1 = (1, 0), g2 = (0, 1): by symmetry w = (1/2, 1/2), g_w = g0 = (1/2, 1/2), so
    # d = g0 + c |g0| g0 / |g0| = (1 + c) g0 = (0.75, 0.75) at c = 0.5; rescaled by 1 / (1 + c^2): (0.6, 0.6)
    grads = T([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # The solver starts at the uniform weights, which are the optimum here by symmetry: w and d move
    # by rounding only (measured: not at all); 1e-9 is far above that and below the solver's 1e-8.
    assert np.allclose(cagrad_weights((grads @ grads.T).numpy(), 0.5), [0.5, 0.5], atol=1e-9)
    assert torch.allclose(cagrad(grads, 0.5, rescale=False), T([0.75, 0.75], dtype=torch.float64), atol=1e-9)
    assert torch.allclose(cagrad(grads, 0.5), T([0.6, 0.6], dtype=torch.float64), atol=1e-9)


def test_cagrad_one_task():
    g = T([[3.0, -4.0]], dtype=torch.float64)  # w = (1): d = g + c g = 1.5 g, / 1.25
    assert torch.allclose(cagrad(g, 0.5), 1.2 * g[0])


def brute_force_weights(gram: np.ndarray, c: float) -> np.ndarray:
    """The best point of a dense grid over the simplex (T = 2: 20001 points; T = 3: 1/300 steps)."""
    t = gram.shape[0]
    if t == 2:
        grid = [np.array([x, 1 - x]) for x in np.linspace(0, 1, 20001)]
    else:
        n = 300
        grid = [np.array([i, j, n - i - j]) / n for i in range(n + 1) for j in range(n + 1 - i)]
    return min(grid, key=lambda w: dual_objective(w, gram, c))


def direction(grads: torch.Tensor, w: np.ndarray, c: float) -> torch.Tensor:
    """The paper's d = g0 + c |g0| g_w / |g_w| for weights w (no rescale)."""
    g0 = grads.mean(0)
    gw = torch.as_tensor(w) @ grads
    return g0 + c * g0.norm() * gw / gw.norm()


@pytest.mark.parametrize("n_tasks,c,seed", [(2, 0.5, 0), (2, 1.0, 1), (2, 0.2, 2), (3, 0.5, 3), (3, 0.9, 4), (3, 0.3, 5), (3, 2.0, 6)])
def test_cagrad_solves_its_dual_as_well_as_brute_force(n_tasks, c, seed):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(n_tasks, 6)) + 0.2 * rng.normal(size=6)
    grads = torch.from_numpy(g)
    gram = g @ g.T
    w = cagrad_weights(gram, c)
    assert abs(w.sum() - 1) < 1e-12 and (w >= 0).all()
    best = brute_force_weights(gram, c)
    f, f_best = dual_objective(w, gram, c), dual_objective(best, gram, c)
    assert f <= f_best + 1e-9  # never worse than the grid's best
    assert f_best - f < 1e-3 * (1 + abs(f_best))  # and the grid's best is close to it
    d, d_best = direction(grads, w, c), direction(grads, best, c)
    assert torch.nn.functional.cosine_similarity(d, d_best, dim=0) > 0.999
    # cagrad() solves for its own weights on torch's Gram matrix (MKL), w here came from numpy's
    # (OpenBLAS): the two differ in the last bits, so the weights agree to the solver's accuracy
    # (measured: 7e-9 of the largest entry with AVX-512 kernels, 5e-9 with AVX2 ones). The old
    # entry-wise rtol 1e-6 / atol 1e-9 held only for entries above ~7e-3.
    assert close_to_solver_accuracy(cagrad(grads, c, rescale=False), d)
    # strong duality: the worst task's improvement g_i . d equals the dual's value
    assert abs(float((grads @ d).min()) - f) < 1e-6 * (1 + abs(f))
    # and no point of the ball |d' - g0| <= c |g0| does better
    g0 = grads.mean(0)
    u = torch.from_numpy(rng.normal(size=(2000, 6)))
    ball = g0 + c * g0.norm() * u / u.norm(dim=1, keepdim=True)
    assert float((ball @ grads.T).min(1).values.max()) <= float((grads @ d).min()) + 1e-9


# The dual solver's weights are accurate to about 1e-8: FISTA stops on the size of its step, and a
# one-ulp change of the Gram matrix (another BLAS kernel, another order of tasks) moves the weights by
# up to 1e-8 (measured: 3e-9 with AVX-512 kernels, 1e-8 with AVX2 ones). d = coef @ grads with
# |coef| <= 1 + lam, so d moves by about 1e-8 of its largest entry: compare norm-wise, with 100x margin.
# (An entry-wise rtol means nothing for entries near 0, whose error is set by the largest ones.)
CAGRAD_DIRECTION_ACCURACY = 1e-6


def close_to_solver_accuracy(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= CAGRAD_DIRECTION_ACCURACY * float(b.abs().max())


def test_cagrad_does_not_depend_on_the_order_of_tasks():
    gen = torch.Generator().manual_seed(7)
    grads = torch.randn(5, 100, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(100, generator=gen, dtype=torch.float64)
    d = cagrad(grads, 0.5)
    for perm in ([4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        assert close_to_solver_accuracy(cagrad(grads[perm], 0.5), d)


def test_cagrad_is_exactly_scale_invariant():
    """CAGrad's d is homogeneous of degree 1 in the gradients, and the solver works on the Gram matrix
    divided by |g0|^2 with a stopping rule on the (dimensionless) weights, so its path does not depend
    on the scale: a power-of-two scale, exact in every floating-point sum, gives the same bits on any
    processor. Any other scale rounds the input, so the result agrees to the solver's accuracy."""
    gen = torch.Generator().manual_seed(7)
    grads = torch.randn(5, 100, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(100, generator=gen, dtype=torch.float64)
    d = cagrad(grads, 0.5)
    for k in (-20, -13, 7):
        assert torch.equal(cagrad(2.0**k * grads, 0.5), 2.0**k * d)
    for s in (1e-4, 3e3):
        assert close_to_solver_accuracy(cagrad(s * grads, 0.5), s * d)


def test_cagrad_improves_the_worst_task_over_the_mean_gradient():
    """Two strongly conflicting tasks: the mean gradient makes task 1 worse (g_1 . g0 < 0), CAGrad's
    direction does not, and it stays within the ball around g0."""
    grads = T([[1.0, 0.1], [-0.6, 0.3]], dtype=torch.float64)
    g0 = grads.mean(0)
    assert (grads @ g0).min() < 0
    d = cagrad(grads, 0.8, rescale=False)
    assert (grads @ d).min() > (grads @ g0).min()
    assert (d - g0).norm() <= 0.8 * g0.norm() + 1e-9


def test_cagrad_zero_gradients():
    assert torch.equal(cagrad(torch.zeros(3, 4), 0.5), torch.zeros(4))


def test_project_simplex():
    for v in (np.array([0.2, 0.3, 0.5]), np.array([3.0, -1.0, 0.0]), np.array([-5.0, -5.0])):
        w = project_simplex(v)
        assert abs(w.sum() - 1) < 1e-12 and (w >= 0).all()
    assert np.allclose(project_simplex(np.array([0.2, 0.3, 0.5])), [0.2, 0.3, 0.5])
    assert np.allclose(project_simplex(np.array([3.0, -1.0, 0.0])), [1.0, 0.0, 0.0])
    assert np.allclose(project_simplex(np.array([-5.0, -5.0])), [0.5, 0.5])
    # the projection is the closest simplex point: check against a grid
    v = np.array([0.9, 0.4, -0.2])
    grid = [np.array([i, j, 100 - i - j]) / 100 for i in range(101) for j in range(101 - i)]
    assert np.linalg.norm(project_simplex(v) - v) <= min(np.linalg.norm(x - v) for x in grid) + 1e-12


# ---- configuration --------------------------------------------------------------------------
def test_tasks_per_batch_auto():
    assert parse_args(["--method", "pcgrad", "--tasks", "MT5"]).tasks_per_batch == 5
    assert parse_args(["--method", "cagrad", "--tasks", "MT10"]).tasks_per_batch == 8  # capped at --batch-size
    assert parse_args(["--method", "cagrad", "--tasks", "MT10", "--batch-size", "16"]).tasks_per_batch == 10
    assert parse_args(["--method", "pcgrad", "--tasks", "MT10", "--tasks-per-batch", "3"]).tasks_per_batch == 3
    assert parse_args(["--method", "prompt-dt", "--tasks", "MT10"]).tasks_per_batch == 1
    assert parse_args(["--method", "harmodt-f", "--tasks", "MT10", "--tasks-per-batch", "2"]).tasks_per_batch == 2
    assert parse_args(["--method", "cagrad", "--tasks", "MT5"]).method_options == {"cagrad_c": 0.5}
    assert parse_args(["--method", "pcgrad", "--tasks", "MT5"]).method_options == {}
    # a validated config is validated again unchanged (as a run's config.json is on --config / --resume)
    cfg = parse_args(["--method", "pcgrad", "--tasks", "MT5"])
    assert validate(cfg) == cfg


@pytest.mark.parametrize("argv,msg", [
    (["--method", "cagrad", "--cagrad-c", "-0.1"], "--cagrad-c must be >= 0"),
    (["--method", "pcgrad", "--cagrad-c", "0.1"], "--cagrad-c does not apply to --method pcgrad"),
    (["--method", "pcgrad", "--tasks-per-batch", "-1"], "--tasks-per-batch must be >= 0"),
    (["--method", "pcgrad", "--tasks-per-batch", "9", "--batch-size", "8"], "--tasks-per-batch cannot exceed --batch-size"),
])
def test_bad_surgery_flags_are_one_clear_line(argv, msg):
    with pytest.raises(ConfigError, match=msg) as err:
        parse_args(argv)
    assert "\n" not in str(err.value)


def test_a_saved_config_with_the_top_level_cagrad_c_reads_as_cagrads_option():
    """config.json and checkpoints written when --cagrad-c was a top-level setting load as the
    method's option (and other methods, which ignored it, without it)."""
    assert validate(config_from_dict({"method": "cagrad", "cagrad_c": 0.9})).method_options == {"cagrad_c": 0.9}
    assert validate(config_from_dict({"method": "pcgrad", "cagrad_c": 0.5})).method_options == {}


# ---- the training step ----------------------------------------------------------------------
TASKS = ["reach-v3", "push-v3", "door-open-v3"]


def tiny_cfg(tmp_path, **kw) -> TrainConfig:
    model = ModelConfig(n_layer=2, n_head=2, n_embd=32, context_len=5, prompt_len=2, dropout=0.0)
    base = dict(tasks=",".join(TASKS), method="cagrad", steps=12, batch_size=5, warmup_steps=2, lr=1e-3, eval_episodes=0,
                out=str(tmp_path / "run"), progress=False, device="cpu", model=model)
    base.update(kw)
    return validate(TrainConfig(**base))


@pytest.mark.parametrize("method,c", [("cagrad", 0.0), ("cagrad", 0.5), ("pcgrad", 0.5)])
def test_surgery_step_combines_each_tasks_gradient_on_its_own_rows(tmp_path, method, c):
    """The gradient the step hands the optimizer is the method's combination of each task's
    gradient on its own rows (2, 2 and 1 of a batch of 5); at c = 0, CAGrad's is the gradient of
    the mean task loss."""
    tr = Trainer(tiny_cfg(tmp_path, method=method, method_options={"cagrad_c": c} if method == "cagrad" else {}), datasets(TASKS))
    assert tr.cfg.tasks_per_batch == 3 and tr.task_masks is None
    tr.train_step(tr.sample_tasks())
    state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    data = tr.batcher.state_dict()
    task_ids = [2, 0, 1]
    batches = [tr.batcher.sample([t], k) for t, k in zip(task_ids, (2, 2, 1))]  # the rows the step will draw
    orders = random_orders(3, tr.batcher.generator)  # and then PCGrad's orders
    losses = [action_loss(tr.model(b), b) for b in batches]
    params = list(tr.model.parameters())
    grads = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)]) for loss in losses])
    mean_loss_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(torch.stack(losses).mean(), params)])
    tr.batcher.load_state_dict(data)
    loss = tr.train_step(task_ids)
    got = torch.cat([p.grad.reshape(-1) for p in params])
    want = pcgrad(grads, orders) / 3 if method == "pcgrad" else cagrad(grads, c)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-8)
    assert torch.allclose(loss, torch.stack(losses).mean().detach())
    if c == 0:  # the mean of the task gradients against the gradient of the mean: fp32 sums in another order
        assert torch.allclose(got, mean_loss_grad, rtol=1e-5, atol=1e-6 * mean_loss_grad.abs().max().item())
    assert any(not torch.equal(v, tr.model.state_dict()[k]) for k, v in state.items())  # the step moved the weights
    assert tr.step == 2


# ---- end to end: train, SIGKILL, resume -----------------------------------------------------
@pytest.mark.parametrize("method", ["pcgrad", "cagrad"])
def test_surgery_run_resumes_after_sigkill_as_uninterrupted(tmp_path, method):
    """`python -m harmodt.train --method pcgrad|cagrad` trains and writes results.json; killed
    after step 5 (checkpoint at 3, harmony logged at 4) and resumed, it ends bit for bit as the
    uninterrupted run (PCGrad's order draws and the dropout stream included)."""
    args = SYNTHETIC + ["--method", method, "--batch-size", "5", "--data", str(write_ours(tmp_path / "data", ("reach-v3", "push-v3")))]
    out = tmp_path / "killed"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ref = pool.submit(train, tmp_path / "ref", args)
        killed = train(out, args, kill="step:5")
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        assert checkpoint_step(out) == 3
        ok(train(out, args, resume=True))
        ok(ref.result())
    assert_same_run(tmp_path / "ref", out)
    res = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert res["method"] == method and res["steps"] == 12
    config = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert config["tasks_per_batch"] == 2 and config["method_options"] == ({"cagrad_c": 0.5} if method == "cagrad" else {})
    losses = [r["loss"] for r in records(tmp_path / "ref") if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)

