"""Training benchmarks at the paper's size (6 layers, 8 heads, width 256, K 20, K* 5, batch 8,
5 tasks of synthetic data; 4.72 M masked weights), on the CPU and (marker ``cuda``) on a GPU.

Every step is one ``Trainer.train_step`` (Algorithm 1: one task's batch, forward, backward,
clipping, masked AdamW) of the trainer the CLI builds. "fused" is HarmoDT-F with ``--fused``
(masked linear, masked AdamW and mask selection on the device's kernels: native on a CPU, Triton
on CUDA), "reference" the same without ``--fused`` (plain PyTorch, ``W * M`` materialized), and
"dense" Prompt-DT with ``--fused``: the same model and step without masks.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .baseline import BaselineStep, baseline_dir
from .common import (H100_STEP_GOAL_MS, TASKS, Timed, call_runner, devices, figure, gpu_figures, gpu_times, interleave,
                     make_trainer, paired_ratio, record, rounds, step_runner, time_figure)
from .launches import count_step

CPU_STEP_TARGET_MS = {"fp32": 125.0, "bf16": 70.0}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("device", devices())
def test_step(benchmark, device, precision):
    """ms per training step: HarmoDT-F ``--fused`` against the dense Prompt-DT step (the masking
    overhead), the reference step, and on a CPU with ``HARMODT_BENCH_BASELINE`` set the previous
    version's HarmoDT-F ``--fused`` step (bench/baseline.py), all interleaved round by round.
    Targets: CPU fp32 <= 125 ms, bf16 <= 70 ms, masking overhead < 5 %, fused >= 1.0x the
    reference; GPU masked/dense <= 1.1x, fused step <= 3.6 ms (MT50 x 1e6 steps in an hour)."""
    cpu = device == "cpu"
    trainers = {"fused": make_trainer("harmodt-f", device, True, precision),
                "dense": make_trainer("prompt-dt", device, True, precision),
                "reference": make_trainer("harmodt-f", device, False, precision)}
    variants = {k: Timed(lambda tr=tr: tr.train_step(tr.sample_tasks()), device) for k, tr in trainers.items()}
    base, info = None, {}
    if cpu and baseline_dir() is not None:
        base = BaselineStep(baseline_dir(), TASKS, "harmodt-f", True, precision)
        variants["previous_fused"] = base
        info.update(previous_version=base.commit, previous_version_path=str(base.path))
    try:
        times = interleave(benchmark, variants, rounds(12 if cpu else 10), calls=1 if cpu else 20,
                           warmup=3 if cpu else 20)
    finally:
        if base is not None:
            base.close()
    overhead = paired_ratio(times, "fused", "dense")
    speedup = 1.0 / paired_ratio(times, "fused", "reference")
    derived = {"masked_over_dense": overhead, "fused_speedup_over_reference": speedup}
    step_target = ("<=", CPU_STEP_TARGET_MS[precision]) if cpu else ("<=", H100_STEP_GOAL_MS)
    figs = [time_figure(f"HarmoDT-F --fused step, {precision}", times, "fused", target=step_target,
                        baseline_key="previous_fused"),
            time_figure(f"Prompt-DT dense step, {precision}", times, "dense"),
            time_figure(f"HarmoDT-F reference step, {precision}", times, "reference")]
    if cpu:
        figs.append(figure(f"masking overhead (fused over dense), {precision}", 100 * (overhead - 1), "%",
                           target=("<", 5.0)))
    else:
        figs.append(figure(f"masked over dense step, {precision}", overhead, "x", target=("<=", 1.1)))
    figs.append(figure(f"--fused speed-up over reference step, {precision}", speedup, "x",
                       target=(">=", 1.0) if cpu else None))
    if not cpu:  # what the GPU spent per step (CUDA events), beside the wall time
        figs += gpu_figures(f"step, {precision}", variants)
        derived["masked_over_dense_gpu"] = paired_ratio(gpu_times(variants), "fused", "dense")
        figs.append(figure(f"masked over dense step, GPU time, {precision}", derived["masked_over_dense_gpu"], "x",
                           target=("<=", 1.1)))
    if "previous_fused" in times:
        derived["fused_over_previous"] = paired_ratio(times, "fused", "previous_fused")
        figs.append(figure(f"--fused step over the previous version's, {precision}", derived["fused_over_previous"],
                           "x", target=("<=", 1.25) if precision == "fp32" else None))
    record(benchmark, f"training step, {precision}", device, times, figs, derived, info)


PEER_TARGETS = {"fused": 0.85, "reference": 1.05}  # each step over the plain-PyTorch peer's
# (layers, heads, width): Table 6's model, and the studies' (docs/results)
PEER_SIZES = {"paper": (6, 8, 256), "study": (3, 4, 128)}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("size", list(PEER_SIZES))
def test_step_peer(benchmark, size, precision):
    """ms per training step on the CPU at the paper's size (6 x 256, 8 heads) and the studies'
    (3 x 128, 4 heads), batch 8, K 20, K* 5: harmodt's HarmoDT-F ``--fused`` step, its
    reference step (no ``--fused``) and the plain-PyTorch peer step of bench/peer.py (the same
    masked Prompt-DT written the obvious way: ``F.linear(x, W * M)``, ``grad *= M``,
    ``clip_grad_norm_``, ``torch.optim.AdamW``), interleaved round by round. Targets: fused <=
    0.85x the peer, reference <= 1.05x."""
    from harmodt.config import ModelConfig

    from .peer import PeerConfig, PeerStep

    n_layer, n_head, n_embd = PEER_SIZES[size]
    peer = PeerStep(PeerConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd), precision=precision)
    model = ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    variants = {"fused": step_runner(make_trainer("harmodt-f", "cpu", True, precision, model=model)),
                "reference": step_runner(make_trainer("harmodt-f", "cpu", False, precision, model=model)),
                "peer": call_runner(peer.step, "cpu")}
    times = interleave(benchmark, variants, rounds(12), calls=1, warmup=3)
    derived = {f"{k}_over_peer": paired_ratio(times, k, "peer") for k in PEER_TARGETS}
    what = f"{size} size {n_layer}x{n_embd}, {precision}"
    figs = [time_figure(f"HarmoDT-F --fused step, {what}", times, "fused"),
            time_figure(f"HarmoDT-F reference step, {what}", times, "reference"),
            time_figure(f"plain-PyTorch peer step (bench/peer.py), {what}", times, "peer")]
    figs += [figure(f"{k} step over the peer's, {what}", derived[f"{k}_over_peer"], "x", target=("<=", t))
             for k, t in PEER_TARGETS.items()]
    record(benchmark, f"training step against the plain-PyTorch peer, {what}", "cpu", times, figs, derived,
           {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd})


@pytest.mark.parametrize("device", devices())
def test_step_launches(benchmark, device):
    """Kernel launches of one training step (bench/launches.py: the CUDA runtime's launch events
    on a GPU; on a CPU the operator tree's estimate of what a GPU would launch) for the fused,
    reference and dense steps, and the expected eager H100 step time at 5 us per launch. Target:
    fused step <= 3.6 ms (MT50 x 1e6 steps in under an hour on one H100)."""
    trainers = {"fused": make_trainer("harmodt-f", device, True), "reference": make_trainer("harmodt-f", device, False),
                "dense": make_trainer("prompt-dt", device, True)}
    counts = {}
    for name, tr in trainers.items():
        for _ in range(3):
            tr.train_step(tr.sample_tasks())
        counts[name] = count_step(tr)
    tr = trainers["fused"]
    benchmark.pedantic(lambda: tr.train_step(tr.sample_tasks()), rounds=1, iterations=1)
    figs = []
    for name in trainers:
        c = counts[name]
        figs.append(figure(f"launches per step, {name} ({c['method']})", c["launches"], "launches"))
        figs.append(figure(f"host syncs per step, {name}", c["host_syncs"], "syncs"))
        figs.append(figure(f"expected H100 eager step from launches, {name}", c["expected_h100_ms"], "ms",
                           target=("<=", H100_STEP_GOAL_MS) if name == "fused" else None))
    derived = {f"{k}_launches": v["launches"] for k, v in counts.items()}
    derived.update({f"{k}_host_syncs": v["host_syncs"] for k, v in counts.items()})
    derived.update({f"{k}_expected_h100_ms": v["expected_h100_ms"] for k, v in counts.items()})
    record(benchmark, "kernel launches of one training step", device, None, figs, derived,
           {k: {"method": v["method"], "by_op": v["by_op"]} for k, v in counts.items()}, unit="launches")


@pytest.mark.cuda
def test_step_compile(benchmark):
    """ms per ``--fused`` fp32 step on CUDA: eager, ``--compile`` (``torch.compile`` of the model,
    default mode) and ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), set on the
    trainer's compiled-forward hook ``Trainer.forward``; and the launches of each. A mode that
    fails is recorded with its error. Target: <= 3.6 ms per step."""
    device = "cuda"
    trainers = {"eager": make_trainer("harmodt-f", device, True),
                "compile": make_trainer("harmodt-f", device, True, compile=True)}
    ro = make_trainer("harmodt-f", device, True)
    ro.forward = torch.compile(ro.model, mode="reduce-overhead")
    trainers["reduce_overhead"] = ro
    variants, errors = {}, {}
    for name, tr in trainers.items():
        run = step_runner(tr)
        if name == "reduce_overhead":
            def run(n, _tr=tr):
                torch.cuda.synchronize()
                import time
                t = time.perf_counter()
                for _ in range(n):
                    torch.compiler.cudagraph_mark_step_begin()
                    _tr.train_step(_tr.sample_tasks())
                torch.cuda.synchronize()
                return (time.perf_counter() - t) / n * 1e3
        try:
            run(5)  # compiles
            variants[name] = run
        except Exception as exc:  # recorded, not raised: the other modes still run
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if "eager" not in variants:
        pytest.fail(f"the eager --fused step fails on CUDA: {errors['eager']}")
    times = interleave(benchmark, variants, rounds(10), calls=20, warmup=5)
    launches = {}
    for name in variants:
        try:
            launches[name] = count_step(trainers[name])["launches"]
        except Exception as exc:
            errors[f"{name}_launch_count"] = str(exc).splitlines()[0]
    figs = [time_figure(f"--fused step, {k.replace('_', '-')}", times, k, target=("<=", H100_STEP_GOAL_MS))
            for k in times]
    figs += [figure(f"launches per step, {k.replace('_', '-')}", v, "launches") for k, v in launches.items()]
    derived = {f"{k}_speedup_over_eager": 1.0 / paired_ratio(times, k, "eager") for k in times if k != "eager"}
    record(benchmark, "--compile step on CUDA", device, times, figs, derived, {"errors": errors, "launches": launches})


MASK_UPDATE_CASES = [pytest.param("cpu", "MT10", id="cpu-MT10"),
                     pytest.param("cuda", "MT10", id="cuda-MT10", marks=pytest.mark.cuda),
                     pytest.param("cuda", "MT50", id="cuda-MT50", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device,task_set", MASK_UPDATE_CASES)
def test_mask_update(benchmark, device, task_set):
    """Seconds per mask update (the trainer's ``mask_updater``: Algorithm 2, every task's masked and
    dense gradient on a fresh batch, then ``harmony_select``) at MT10 and (CUDA) MT50, HarmoDT-F
    ``--fused`` against the reference: wall and GPU time (CUDA events). Target: fused >= 3x the
    reference at MT50. It runs once per 5,000 steps."""
    from harmodt import tasks as task_sets

    tasks = getattr(task_sets, task_set)
    trainers = {"fused": make_trainer("harmodt-f", device, True, tasks=tasks),
                "reference": make_trainer("harmodt-f", device, False, tasks=tasks)}
    for tr in trainers.values():
        tr.step = 1  # past step 0 of the alpha schedule: the selection moves weights
    variants = {k: Timed(tr.mask_updater, device) for k, tr in trainers.items()}
    times = interleave(benchmark, variants, rounds(1) if device == "cpu" else rounds(3), calls=1,
                       warmup=0 if device == "cpu" else 1)
    times = {k: [x / 1e3 for x in v] for k, v in times.items()}
    gpu = {k: [x / 1e3 for x in v] for k, v in gpu_times(variants).items()}
    target = (">=", 3.0) if task_set == "MT50" else None
    derived = {"fused_speedup_over_reference": 1.0 / paired_ratio(times, "fused", "reference"),
               "fused_speedup_over_reference_gpu": 1.0 / paired_ratio(gpu, "fused", "reference")}
    figs = [time_figure(f"mask update, {task_set}, {k}, wall", times, k, unit="s") for k in times]
    figs += [time_figure(f"mask update, {task_set}, {k}, GPU time ({variants[k].clock})", gpu, k, unit="s")
             for k in gpu]
    figs.append(figure(f"mask update, {task_set}: --fused speed-up over reference, wall",
                       derived["fused_speedup_over_reference"], "x", target=target))
    figs.append(figure(f"mask update, {task_set}: --fused speed-up over reference, GPU time",
                       derived["fused_speedup_over_reference_gpu"], "x", target=target if device == "cuda" else None))
    record(benchmark, f"mask update at {task_set}", device, times, figs, derived,
           {"clock": variants["fused"].clock, "tasks": len(tasks)}, unit="s")


CLI_TASKS = ["reach-v3", "push-v3"]


def _cli_steps_per_s(tmp: Path, data: Path, device: str, fused: bool, steps: int, log_every: int) -> float:
    out = tmp / ("fused" if fused else "reference")
    cmd = [sys.executable, "-m", "harmodt.train", "--tasks", ",".join(CLI_TASKS), "--data", str(data),
           "--method", "harmodt-f", "--device", device, "--steps", str(steps), "--log-every", str(log_every),
           "--eval-episodes", "0", "--out", str(out),
           "--no-progress", "--update-every", str(steps // 2), "--warmup-steps", "10", "--checkpoint-every", str(steps)]
    if fused:
        cmd.append("--fused")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sps = [r["steps_per_s"] for r in recs if "steps_per_s" in r][1:]  # the first window holds the warm-up
    return statistics.median(sps)


@pytest.mark.parametrize("device", devices())
def test_train_cli(benchmark, device, tmp_path):
    """Steps/s of ``python -m harmodt.train --device D --fused`` end to end (2 tasks of generated
    Meta-World data, HarmoDT-F, one mask update inside, its time excluded as the CLI excludes it;
    the first logged window dropped) against the same run without ``--fused``. Target: fused
    steps/s >= the reference's."""
    from harmodt.data import generate

    data = tmp_path / "data"
    generate(CLI_TASKS, 2, str(data), seed=0, progress=False)
    steps, log_every = (40, 10) if device == "cpu" else (600, 100)
    res = {"fused": [], "reference": []}
    n = rounds(1)
    import time

    def run():
        for fused in (True, False):
            res["fused" if fused else "reference"].append(
                _cli_steps_per_s(tmp_path / f"{len(res['fused'])}", data, device, fused, steps, log_every))

    t = time.perf_counter()
    benchmark.pedantic(run, rounds=n, iterations=1)
    sps = {k: statistics.median(v) for k, v in res.items()}
    derived = {"fused_over_reference": sps["fused"] / sps["reference"]}
    figs = [figure(f"CLI steps/s, {k}", v, "steps/s", lo=min(res[k]), hi=max(res[k]), target=None)
            for k, v in sps.items()]
    figs.append(figure("CLI --fused steps/s over reference", derived["fused_over_reference"], "x", target=(">=", 1.0)))
    record(benchmark, "python -m harmodt.train steps/s", device, None, figs, derived,
           {"steps": steps, "log_every": log_every, "rounds": n, "seconds": time.perf_counter() - t,
            "steps_per_s": res},
           unit="steps/s")


@pytest.mark.cuda
def test_train_torchrun_2gpu(benchmark, tmp_path):
    """Steps/s of ``torchrun --nproc_per_node 2 -m harmodt.train --device cuda --fused`` on two
    GPUs (data parallel, harmodt/run/distributed.py) against one GPU. Skipped with fewer than two GPUs."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two GPUs, found {torch.cuda.device_count()}")
    from harmodt.data import generate

    data = tmp_path / "data"
    generate(CLI_TASKS, 2, str(data), seed=0, progress=False)
    res = {}

    def run():
        res["one_gpu"] = _cli_steps_per_s(tmp_path / "one", data, "cuda", True, 600, 100)
        out = tmp_path / "two"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "harmodt.train", "--tasks", ",".join(CLI_TASKS), "--data", str(data), "--method", "harmodt-f",
               "--device", "cuda", "--fused",
               "--steps", "600", "--log-every", "100", "--eval-episodes", "0", "--out", str(out), "--no-progress",
               "--update-every", "300", "--warmup-steps", "10", "--checkpoint-every", "600"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        res["two_gpus"] = statistics.median([r["steps_per_s"] for r in recs if "steps_per_s" in r][1:])

    benchmark.pedantic(run, rounds=1, iterations=1)
    figs = [figure("CLI steps/s, one GPU", res["one_gpu"], "steps/s"),
            figure("CLI steps/s, two GPUs (torchrun)", res["two_gpus"], "steps/s"),
            figure("two-GPU scaling", res["two_gpus"] / res["one_gpu"], "x")]
    record(benchmark, "torchrun on two GPUs", "cuda", None, figs, {"scaling": res["two_gpus"] / res["one_gpu"]}, res,
           unit="steps/s")
