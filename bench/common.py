"""What the benchmarks share: the paper's model size, synthetic training data, trainers, a random
model with its masks, timing of variants in alternating rounds, and the results registry that
bench/conftest.py writes as JSON.

Timing: :func:`interleave` runs every variant of a benchmark once per round, in turn (the
primary variant through pytest-benchmark's ``pedantic``, the others in its untimed ``setup``), so
a drift of a shared machine's speed hits them alike; figures are medians over rounds, and ratios
are medians of the per-round ratios. On CUDA every timed call synchronizes before and after.

GPU time: a :class:`Timed` variant also records, each round, the time between two CUDA events
around its calls (what the GPU spent, idle gaps between kernels included), and
:func:`kernel_time` sums the kernels' own durations from ``torch.profiler``. On a CPU both fall
back to wall time (``clock`` says which), so a report has the same shape on every device.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch

# The paper's model (Table 6): 6 layers, 8 heads, width 256, K = 20, K* = 5, batch 8, S = 0.2.
TASKS = ["reach-v3", "push-v3", "door-open-v3", "drawer-open-v3", "window-open-v3"]
# (K, N) of each masked matrix
LAYERS = {"qkv": (256, 768), "attn_proj": (256, 256), "fc": (256, 1024), "mlp_proj": (1024, 256)}
P_MODEL = 6 * sum(k * n for k, n in LAYERS.values())  # 4,718,592 masked weights
TRAIN_ROWS = 8 * 75  # a training batch: 8 sequences of 3 * (20 + 5) tokens
EVAL_TOKENS = 3 * 20 - 1  # an evaluation row's history tokens (the last action is not fed)
SPARSITY, ETA_MAX, LAMBDA = 0.2, 100, 10.0  # Table 6

US_PER_LAUNCH = 5.0  # eager cost of one kernel launch on an H100 (launch plus the Python and dispatch around it)
H100_STEP_GOAL_MS = 3.6  # MT50 x 1e6 steps in under one hour


def rounds(default: int) -> int:
    """Rounds of a benchmark: ``HARMODT_BENCH_ROUNDS`` when set (every benchmark), else ``default``."""
    v = os.environ.get("HARMODT_BENCH_ROUNDS")
    return max(1, int(v)) if v else default


def devices() -> list:
    """The devices a device-parametrized benchmark runs on: cpu, and cuda (marker ``cuda``,
    skipped without CUDA by bench/conftest.py)."""
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---- training data and trainers -----------------------------------------------------------------


def synthetic_datasets(tasks, episodes=4, length=500, seed=0):
    """Random trajectories with Meta-World's shapes (39-d states, 4-d actions), two prompt
    trajectories per task: what a training step's speed depends on, without generating data.
    (Self-contained: bench/baseline.py runs this function's source inside an older checkout.)"""
    import numpy as np
    from types import SimpleNamespace

    rng = np.random.default_rng(seed)

    def traj():
        return SimpleNamespace(observations=rng.normal(size=(length, 39)).astype(np.float32),
                               actions=rng.uniform(-1, 1, size=(length, 4)).astype(np.float32),
                               rewards=rng.uniform(0, 10, size=length).astype(np.float32),
                               dones=np.eye(1, length, length - 1, dtype=bool)[0], successes=None)

    return {t: SimpleNamespace(name=t, trajectories=[traj() for _ in range(episodes)],
                               prompts=[traj() for _ in range(2)])
            for t in tasks}


def make_trainer(method: str = "harmodt-f", device: str = "cpu", fused: bool = True, precision: str = "fp32",
                 tasks=TASKS, **kw):
    """A ``harmodt.train.Trainer`` at the paper's size on synthetic data (``validate``d config); its
    step eager unless ``cuda_graph`` says otherwise (the benchmarks name the graphed step)."""
    from harmodt.config import TrainConfig, validate
    from harmodt.train import Trainer

    kw.setdefault("cuda_graph", "off")
    cfg = validate(TrainConfig(tasks=",".join(tasks), method=method, progress=False, eval_episodes=0, device=device,
                               fused=fused, precision=precision, **kw))
    return Trainer(cfg, synthetic_datasets(tasks))


def model_and_masks(n_tasks: int, device, model_cfg=None):
    """A random HarmoDT-F model (the paper's size unless ``model_cfg``) and ERK masks at S = 0.2."""
    from harmodt.config import ModelConfig
    from harmodt.masks import TaskMasks
    from harmodt.methods import build_model

    torch.manual_seed(0)
    model = build_model(model_cfg or ModelConfig(), n_tasks, "harmodt-f").to(device).eval()
    shapes = {n: tuple(w.shape) for n, w in model.masked_weights().items()}
    masks = TaskMasks.erk(shapes, n_tasks, 0.2, torch.Generator().manual_seed(0), device=device)
    return model, masks


def step_runner(tr, device=None) -> Callable[[int], float]:
    """A variant for :func:`interleave`: ``run(n)`` does n training steps, returns ms per step."""
    device = device or tr.device

    def run(n: int) -> float:
        sync(device)
        t = time.perf_counter()
        for _ in range(n):
            tr.train_step(tr.sample_tasks())
        sync(device)
        return (time.perf_counter() - t) / n * 1e3

    return run


def call_runner(fn: Callable[[], object], device) -> Callable[[int], float]:
    """A variant for :func:`interleave`: ``run(n)`` calls ``fn`` n times, returns ms per call."""

    def run(n: int) -> float:
        sync(device)
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        return (time.perf_counter() - t) / n * 1e3

    return run


class Timed:
    """A variant for :func:`interleave`: ``run(n)`` calls ``fn`` n times and returns wall ms per
    call; it also appends the GPU ms per call between two CUDA events on the current stream to
    ``gpu_ms`` (on a CPU the wall ms: ``clock`` is "wall")."""

    def __init__(self, fn: Callable[[], object], device):
        self.fn, self.device = fn, torch.device(device)
        self.clock = "cuda-events" if self.device.type == "cuda" else "wall"
        self.gpu_ms: list[float] = []

    def reset(self) -> None:
        self.gpu_ms.clear()

    def __call__(self, n: int) -> float:
        cuda = self.device.type == "cuda"
        sync(self.device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t = time.perf_counter()
        for _ in range(n):
            self.fn()
        if cuda:
            end.record()
        sync(self.device)
        wall = (time.perf_counter() - t) / n * 1e3
        self.gpu_ms.append(start.elapsed_time(end) / n if cuda else wall)
        return wall


def kernel_time(fn: Callable[[], object], device, calls: int = 10) -> dict:
    """The device's own time per call of ``fn``: on CUDA the sum of the kernels' durations that
    ``torch.profiler`` records over ``calls`` calls (``clock`` "cuda-kernels", ``launches`` per
    call); on a CPU the wall time (``clock`` "wall", ``launches`` None)."""
    device = torch.device(device)
    if device.type != "cuda":
        sync(device)
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        return {"ms": (time.perf_counter() - t) / calls * 1e3, "launches": None, "clock": "wall", "calls": calls}
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    return {"ms": sum(e.self_device_time_total for e in kernels) / 1e3 / calls,
            "launches": sum(e.count for e in kernels) / calls, "clock": "cuda-kernels", "calls": calls}


def gpu_times(variants: dict) -> dict[str, list[float]]:
    """The per-round GPU ms of the :class:`Timed` variants (the wall ms stay in ``interleave``'s result)."""
    return {k: list(v.gpu_ms) for k, v in variants.items() if isinstance(v, Timed)}


def gpu_figures(what: str, variants: dict, kernel: dict | None = None) -> list[dict]:
    """Rows of each :class:`Timed` variant's GPU time (CUDA events; wall on a CPU) and, where
    measured, its kernel time (profiler), labelled "``what``, <variant>, <clock>"."""
    rows = []
    for k, v in variants.items():
        if isinstance(v, Timed) and v.gpu_ms:
            rows.append(time_figure(f"{what}, {k}, GPU time ({v.clock})", {k: v.gpu_ms}, k))
        if kernel and k in kernel:
            rows.append(figure(f"{what}, {k}, kernel time ({kernel[k]['clock']})", kernel[k]["ms"], "ms"))
    return rows


def interleave(benchmark, variants: dict[str, Callable[[int], float]], n_rounds: int, calls: int = 1,
               warmup: int = 2) -> dict[str, list[float]]:
    """ms per call of every variant, one entry per round. Each variant is first run ``warmup``
    times untimed; then every round runs each variant for ``calls`` calls: the first variant
    (the primary) is the one pytest-benchmark times, the others run in its untimed ``setup``
    just before, in an order that rotates from round to round."""
    names = list(variants)
    for name in names:
        if warmup:
            variants[name](warmup)
        if isinstance(variants[name], Timed):
            variants[name].reset()  # the warm-up is not a round
    times = {k: [] for k in names}
    others = names[1:]
    state = {"round": 0}

    def setup():
        r = state["round"]
        for k in others[r % max(len(others), 1):] + others[: r % max(len(others), 1)]:
            times[k].append(variants[k](calls))
        state["round"] += 1

    def target():
        times[names[0]].append(variants[names[0]](calls))

    benchmark.pedantic(target, setup=setup, rounds=n_rounds, warmup_rounds=0, iterations=1)
    return times


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def paired_ratio(times: dict, num: str, den: str) -> float:
    """Median over rounds of ``num / den`` (neighbouring measurements share the machine's state)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


# ---- the results registry -----------------------------------------------------------------------

RESULTS: list[dict] = []  # one entry per benchmark that ran; bench/conftest.py writes them at the end


def _target_text(target, unit: str) -> str:
    op, value = target
    sym = {"<=": "≤", ">=": "≥", "<": "<", ">": ">"}[op]
    return f"{sym} {value:g}{'' if unit in ('x', '%') else ' '}{unit}"


def _met(value: float, target) -> bool:
    op, thr = target
    return {"<=": value <= thr, ">=": value >= thr, "<": value < thr, ">": value > thr}[op]


def figure(label: str, value: float, unit: str, *, target=None, lo=None, hi=None, baseline=None) -> dict:
    """One row of the results table: ``value`` (a median, with ``lo``/``hi`` its min and max over
    rounds when it is a time), ``target`` an (op, threshold) pair in ``unit`` (reported, never
    asserted), ``baseline`` the same figure of the previous version when measured."""
    row = {"label": label, "value": value, "unit": unit, "min": lo, "max": hi, "baseline": baseline}
    if target is not None:
        row["target"] = _target_text(target, unit)
        row["met"] = bool(_met(value, target))
    return row


def time_figure(label: str, times: dict, key: str, *, target=None, baseline_key=None, unit="ms") -> dict:
    """A figure from the per-round times of variant ``key`` (median, min, max); ``baseline_key``:
    the variant that is the previous version's same figure, when it ran."""
    s = stats(times[key])
    base = statistics.median(times[baseline_key]) if baseline_key and baseline_key in times else None
    return figure(label, s["median"], unit, target=target, lo=s["min"], hi=s["max"], baseline=base)


def record(benchmark, what: str, device, times: dict | None = None, figures: list | None = None,
           derived: dict | None = None, info: dict | None = None, unit: str = "ms") -> dict:
    """Register one benchmark's figures for the results file and pytest-benchmark's extra_info,
    and print them (visible with ``-s``)."""
    entry = {"name": benchmark.name, "what": what, "device": str(device), "unit": unit,
             "variants": {k: stats(v) for k, v in (times or {}).items() if v},
             "derived": derived or {}, "figures": figures or [], "info": info or {}}
    RESULTS.append(entry)
    benchmark.extra_info.update({"variants": entry["variants"], "derived": entry["derived"], "info": entry["info"]})
    lines = [f"\n{benchmark.name}: {what}"]
    for k, s in entry["variants"].items():
        lines.append(f"  {k}: median {s['median']:.3f} {unit} "
                     f"(min {s['min']:.3f}, max {s['max']:.3f}, {s['n']} rounds)")
    for f in entry["figures"]:
        target = f"  target {f['target']} ({'met' if f['met'] else 'not met'})" if "target" in f else ""
        previous = f"  previous version {f['baseline']:.4g}" if f.get("baseline") is not None else ""
        lines.append(f"  {f['label']}: {f['value']:.4g} {f['unit']}{target}{previous}")
    print("\n".join(lines))
    return entry


# ---- the machine --------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(gpu: bool) -> dict:
    """A description of this machine; ``name`` (a file-name slug) is the GPU's name when ``gpu``,
    else the CPU model and its core count."""
    cores = os.cpu_count() or 1
    cpu = cpu_model()
    d = {"cpu": cpu, "cores": cores, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
         "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        d["triton"] = triton.__version__
    except Exception:  # pragma: no cover - depends on the install
        d["triton"] = None
    name = f"{cpu} {cores} cores"
    if gpu and torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
        d["gpu_count"] = torch.cuda.device_count()
        d["cuda"] = torch.version.cuda
        name = d["gpu"]
    d["name"] = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return d
