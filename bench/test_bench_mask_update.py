"""The mask update's task gradients (Algorithm 2's gbar_i and dense g_i, ``--mask-grads paper``)
computed per task against batched (``--mask-grads-passes per-task|batched``), HarmoDT-F
``--fused`` at the paper's size (6 layers, width 256, K 20, K* 5, batch 8 per task; synthetic
data), at MT10 and MT50, on the CPU and (marker ``cuda``) on a GPU.

"per-task" runs two forward and backward passes per task (the reference), "batched" one
mixed-task forward and backward for all tasks: each variant is the trainer's
``mask_updater.task_gradients()`` (every task's gradients on a fresh batch), the two trainers
built alike, at mid-run (step E / 2, alpha_t = ``--eta-max``; at step 0 alpha_t is
``--eta-min`` and nothing moves), timed in alternating rounds. On CUDA the whole update
(``mask_updater()``: the gradients, the scores and ``harmony_select``) is timed too. The
kernel-op calls of the gradient passes (on batches drawn beforehand) and, apart, of the per-task
batch draws (the same in both variants) are counted from ``torch.profiler``'s operator tree
(bench/launches.py: on a CPU, the ops that would launch a kernel on a GPU; on CUDA the launches).

Targets: on the CPU batched >= 3x faster than per-task and >= 10x fewer kernel-op calls, at MT10
and MT50; on a GPU a whole MT50 update <= 0.1 s.
"""

from __future__ import annotations

import statistics

import pytest

from harmodt import tasks as task_sets

from .common import Timed, figure, gpu_times, interleave, make_trainer, paired_ratio, record, rounds, time_figure
from .launches import count_call

CASES = [pytest.param("cpu", "MT10", id="cpu-MT10"), pytest.param("cpu", "MT50", id="cpu-MT50"),
         pytest.param("cuda", "MT10", id="cuda-MT10", marks=pytest.mark.cuda),
         pytest.param("cuda", "MT50", id="cuda-MT50", marks=pytest.mark.cuda)]
PASSES = ("batched", "per-task")


@pytest.mark.parametrize("device,task_set", CASES)
def test_mask_update_passes(benchmark, device, task_set):
    tasks = getattr(task_sets, task_set)
    trainers = {k: make_trainer("harmodt-f", device, True, tasks=tasks, masks=_mask_config(k)) for k in PASSES}
    for tr in trainers.values():
        tr.step = tr.cfg.steps // 2  # mid-run: alpha_t = --eta-max
    alpha = trainers["batched"].mask_updater.alpha(trainers["batched"].step)
    cpu = device == "cpu"
    variants = {k: Timed(tr.mask_updater.task_gradients, device) for k, tr in trainers.items()}
    if not cpu:
        variants.update({f"update, {k}": Timed(tr.mask_updater, device) for k, tr in trainers.items()})
    times = interleave(benchmark, variants, rounds(2 if cpu else 5), calls=1, warmup=0 if cpu else 1)
    times = {k: [x / 1e3 for x in v] for k, v in times.items()}
    gpu = {k: [x / 1e3 for x in v] for k, v in gpu_times(variants).items()}
    ops = {k: count_call(_passes_of(tr), device) for k, tr in trainers.items()}
    draws = count_call(_draws_of(trainers["batched"]), device)["launches"]  # the same draws in both variants
    speedup = 1.0 / paired_ratio(times, "batched", "per-task")
    fewer = ops["per-task"]["launches"] / ops["batched"]["launches"]
    what = f"{task_set}, alpha {alpha}"
    figs = [time_figure(f"task gradients, {what}, {k}, wall", times, k, unit="s") for k in PASSES]
    figs += [time_figure(f"mask update, {what}, {k.split(', ')[1]}, wall", times, k, unit="s",
                         target=("<=", 0.1) if k == "update, batched" and task_set == "MT50" else None)
             for k in times if k not in PASSES]
    if not cpu:
        figs += [time_figure(f"{k}, {what}, GPU time ({variants[k].clock})", gpu, k, unit="s") for k in gpu]
    figs += [figure(f"task gradients, {what}: batched speed-up over per-task, wall", speedup, "x",
                    target=(">=", 3.0) if cpu else None),
             figure(f"task gradients, {what}: kernel-op calls, per-task / batched ({ops['batched']['method']})",
                    fewer, "x", target=(">=", 10.0) if cpu else None)]
    figs += [figure(f"task gradients, {what}, {k}: kernel-op calls ({ops[k]['method']})", ops[k]["launches"], "calls")
             for k in PASSES]
    record(benchmark, f"mask update's task gradients, {what}", device, times, figs,
           {"batched_speedup": speedup, "fewer_kernel_op_calls": fewer},
           {"alpha": alpha, "tasks": len(tasks), "kernel_op_calls": {k: v["launches"] for k, v in ops.items()},
            "kernel_op_calls_of_the_batch_draws": draws,
            "clock": variants["batched"].clock}, unit="s")


ARITHMETIC = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")  # and every scaled_dot_product op


def test_mask_update_passes_bound(benchmark):
    """How much faster batching can make the task gradients on the CPU: the per-task loop at MT10
    profiled op by op (one thread); its GEMMs and attention are arithmetic both ways run alike (the
    batched passes run each task's rows as a GEMM of their own), so batching can at most remove the
    rest: the speed-up is bounded by total / (GEMMs + attention)."""
    from torch.profiler import ProfilerActivity, profile

    tr = make_trainer("harmodt-f", "cpu", True, tasks=task_sets.MT10, masks=_mask_config("per-task"))
    tr.step = tr.cfg.steps // 2
    passes = _passes_of(tr)
    passes()  # warm-up
    shares = []

    def target():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            passes()
        ops = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in ops)
        shares.append(sum(e.self_cpu_time_total for e in ops
                          if e.key in ARITHMETIC or "scaled_dot_product" in e.key) / total)

    benchmark.pedantic(target, rounds=rounds(2), warmup_rounds=0, iterations=1)
    share = statistics.median(shares)
    figs = [figure("per-task task gradients, MT10: share of CPU time in GEMMs and attention", 100 * share, "%",
                   lo=100 * min(shares), hi=100 * max(shares)),
            figure("the most batching can speed them up: total / (GEMMs + attention)", 1 / share, "x",
                   target=(">=", 3.0))]
    record(benchmark, "bound on the CPU speed-up of batched task gradients, MT10", "cpu", None, figs,
           {"arithmetic_share": share, "speedup_bound": 1 / share},
           {"ops": list(ARITHMETIC) + ["*scaled_dot_product*"]})


def _passes_of(tr):
    """The task-gradient computation alone (harmodt.mask_grads.task_gradients) on batches drawn
    beforehand: the per-task batch draws (about 55 ops per task, the same in both variants) left out."""
    from harmodt.mask_grads import task_gradients

    m = tr.cfg.masks
    batches = [(i, tr.batcher.sample([i], tr.cfg.batch_size)) for i in range(len(tr.tasks))]
    return lambda: task_gradients(tr.model, tr.weights, tr.task_masks, tr.backends.masked_linear, batches,
                                  len(tr.tasks), mask_grads=m.mask_grads, recovery_grad=m.recovery_grad,
                                  grad_clip=tr.cfg.grad_clip, passes=tr.mask_updater.passes)


def _draws_of(tr):
    """The per-task batch draws of one update (``batcher.sample`` per task): counted apart."""
    return lambda: [tr.batcher.sample([i], tr.cfg.batch_size) for i in range(len(tr.tasks))]


def _mask_config(passes: str):
    from harmodt.config import MaskConfig

    return MaskConfig(mask_grads_passes=passes)
