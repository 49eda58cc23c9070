"""Training-step benchmarks at the paper's model size (Table 6: 6 layers, 8 heads, width 256,
K 20, K* 5, batch 8; 4.72 M masked weights), run with ``pytest bench/ --benchmark-only``.

Each benchmark times its variants side by side in one process, interleaved round by round so
machine noise hits them alike, and records every median and ratio in ``extra_info``:

* masked (HarmoDT) step, with and without ``--fused``, vs plain dense (Prompt-DT) step: masking
  overhead, target < 5 %;
* fp32 step (target <= 120 ms) and ``--precision bf16`` step (target <= 60 ms);
* ``--fused`` (kernels.masked_linear, auto backend) vs the reference path (ratio target >= 1.0);
* the block GEMMs on oneDNN (the default) vs on MKL; the bf16 step's GEMMs on the AVX512-BF16
  kernel with fused epilogues (the default) vs oneDNN's;
* each block as one autograd node (the default) vs the per-op blocks;
* the masking of W and dW inside those nodes (the default) vs separate passes over all matrices;
* end to end: ``python -m harmodt.train`` steps per second with and without ``--fused``;
* the GEMM floor: the exact GEMMs of one fp32 and one bf16 step replayed alone next to whole steps
  (what the step targets leave for everything else).
"""

from __future__ import annotations

import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _synthetic import datasets  # noqa: E402
from harmodt.config import TrainConfig, validate  # noqa: E402
from harmodt.train import Trainer  # noqa: E402

TASKS = ["reach-v3", "push-v3", "door-open-v3", "drawer-open-v3", "window-open-v3"]
ROUNDS = int(os.environ.get("HARMODT_BENCH_ROUNDS", "5"))
STEPS_PER_ROUND = 8


def make_trainer(method: str, **kw) -> Trainer:
    cfg = validate(TrainConfig(tasks=",".join(TASKS), method=method, progress=False, eval_episodes=0, **kw))
    return Trainer(cfg, datasets(TASKS, episodes=4, length=500))


ANCHOR_GFLOPS = 170.0  # fp32 GEMM rate of the machine the targets were set on (shared/notes/performance-anchors.md)


def gemm_gflops(reps: int = 20) -> float:
    """fp32 GEMM rate right now (600x256 @ 256x1024, the paper model's fc layer at batch 8): this
    machine kind's speed drifts by up to 40 % with its neighbours' load, so every benchmark
    measures it between its rounds and reports step times scaled to the anchor's 170 GFLOP/s."""
    x, w = torch.randn(600, 256), torch.randn(1024, 256)
    x @ w.T
    t = time.perf_counter()
    for _ in range(reps):
        x @ w.T
    return 2 * 600 * 256 * 1024 * reps / (time.perf_counter() - t) / 1e9


# The anchor's own measurements (shared/notes/performance-anchors.md, the FLOP floors): a
# 2048^3 matmul runs at about 170 GFLOP/s in fp32 and 416 in bf16 on the machine the step targets
# were set on.
ANCHOR_RATES = {"fp32": ANCHOR_GFLOPS, "bf16": 416.0}


@functools.lru_cache(maxsize=None)
def _anchor_operands(dtype: str) -> tuple:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2048, 2048, generator=g), torch.randn(2048, 2048, generator=g)
    return (a, b) if dtype == "fp32" else (a.bfloat16(), b.bfloat16())


def anchor_gflops(dtype: str) -> float:
    """The anchor's own measurement repeated right now: a 2048^3 ``torch.mm`` in fp32 (MKL) or bf16
    (oneDNN). A step of that precision is scaled by it to the anchor's speed
    (``*_ms_at_anchor_rate``). It differs from :func:`gemm_gflops` in shape and, for bf16, in unit:
    on a Zen 4 machine that read the anchor's 170 and 416 at 2048^3, MKL read 193-201 GFLOP/s at
    the fc shape, so scaling by that probe put every step ~15 % above its time at the anchor's
    speed, and bf16 steps (bf16-GEMM-bound) drift with the bf16 rate, not the fp32 one."""
    a, b = _anchor_operands(dtype)
    reps = 3 if dtype == "fp32" else 6
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * 2048**3 * reps / (time.perf_counter() - t) / 1e9


# Cross-core round trips above this (ns) mean the two threads sit on different CCDs of the host
# (no shared L3): ~60-130 ns measured on one CCD, ~300-1500 on two (bench/README.md, "The slow state").
TWO_CCD_NS = 200.0


def core_round_trip_ns() -> float:
    """The threads' cache-line round trip right now (kernels.cpu.core_round_trip_ns; the least of
    three probes of 1000 trips, ~1 ms in all); NaN without the native library or a second thread."""
    from kernels import cpu

    if cpu.unavailable_reason() is not None:
        return float("nan")
    return min(cpu.core_round_trip_ns(1000) for _ in range(3))


def _precision(tr) -> str:
    """A benchmark variant's precision (a Trainer, or a wrapper holding one as ``.tr``)."""
    return getattr(tr, "tr", tr).cfg.precision


def _anchor_probes(dtypes) -> dict:
    return {d: anchor_gflops(d) for d in sorted(set(dtypes))}


def interleaved(variants: dict[str, Trainer], rounds: int | None = None) -> dict:
    """ms per training step of each variant, measured in alternating rounds (with GEMM-rate probes
    before each round: the fc-shape fp32 one, and the anchor's 2048^3 one of each precision the
    variants use, and the threads' round trip). Returns {"ms": {name: median}, "rounds": {name: [ms
    per round]}, "gemm_gflops": median fc probe, "precision": {name: "fp32"|"bf16"}, "anchor_gflops":
    {precision: median}, "round_trip_ns": [per round]}."""
    times = {k: [] for k in variants}
    precision = {k: _precision(tr) for k, tr in variants.items()}
    probes, anchor, trips = [], [], []
    for tr in variants.values():
        for _ in range(3):
            tr.train_step(tr.sample_tasks())
    for _ in range(rounds or ROUNDS):
        probes.append(gemm_gflops())
        anchor.append(_anchor_probes(precision.values()))
        trips.append(core_round_trip_ns())
        for name, tr in variants.items():
            t = time.perf_counter()
            for _ in range(STEPS_PER_ROUND):
                tr.train_step(tr.sample_tasks())
            times[name].append((time.perf_counter() - t) / STEPS_PER_ROUND * 1e3)
    return {"ms": {k: statistics.median(v) for k, v in times.items()}, "rounds": times, "gemm_gflops": statistics.median(probes),
            "precision": precision, "anchor_gflops": {d: statistics.median(a[d] for a in anchor) for d in anchor[0]},
            "round_trip_ns": trips, "anchor_rounds": anchor}


def paired_ratio(res: dict, num: str, den: str) -> float:
    """Median over rounds of num/den: neighbouring measurements share the machine's state."""
    return statistics.median(a / b for a, b in zip(res["rounds"][num], res["rounds"][den]))


def record(benchmark, res: dict) -> None:
    benchmark.extra_info.update({f"{k}_ms": round(v, 2) for k, v in res["ms"].items()})
    benchmark.extra_info["gemm_gflops"] = round(res["gemm_gflops"], 1)
    scale = res["gemm_gflops"] / ANCHOR_GFLOPS
    benchmark.extra_info.update({f"{k}_ms_at_anchor_speed": round(v * scale, 2) for k, v in res["ms"].items()})
    print(f"\n{benchmark.name}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in res["ms"].items())
          + f" (GEMM probe {res['gemm_gflops']:.0f} GFLOP/s; at the anchor's {ANCHOR_GFLOPS:.0f}: "
          + ", ".join(f"{k} {v * scale:.1f} ms" for k, v in res["ms"].items()) + ")")
    if "anchor_gflops" in res:  # each step scaled by the 2048^3 rate of its own precision
        at = {k: v * res["anchor_gflops"][res["precision"][k]] / ANCHOR_RATES[res["precision"][k]] for k, v in res["ms"].items()}
        benchmark.extra_info.update({f"anchor_gflops_{d}": round(g, 1) for d, g in res["anchor_gflops"].items()})
        benchmark.extra_info.update({f"{k}_ms_at_anchor_rate": round(v, 2) for k, v in at.items()})
        print("  at the anchor's 2048^3 rate of each step's precision ("
              + ", ".join(f"{d}: probe {g:.0f}, anchor {ANCHOR_RATES[d]:.0f} GFLOP/s" for d, g in res["anchor_gflops"].items()) + "): "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in at.items()))
    trips = res.get("round_trip_ns", [])
    if trips and not any(t != t for t in trips):  # (NaN: no native library or one thread)
        benchmark.extra_info["round_trip_ns_rounds"] = [round(t) for t in trips]
        two = [t >= TWO_CCD_NS for t in trips]
        print(f"  threads' round trip {min(trips):.0f}-{max(trips):.0f} ns: {sum(two)} of {len(trips)} rounds on two CCDs"
              + (" (the slow state: expect steps ~10-20 % slower there)" if any(two) else ""))
        for ccd, pick in (("one_ccd", [not x for x in two]), ("two_ccds", two)):
            if not any(pick):
                continue
            for k in res["ms"]:  # each variant's median over the rounds of one placement, raw and at the anchor's rate
                prec = res["precision"][k]
                raw = [v for v, p in zip(res["rounds"][k], pick) if p]
                at_rate = [v * a[prec] / ANCHOR_RATES[prec] for v, a, p in zip(res["rounds"][k], res["anchor_rounds"], pick) if p]
                benchmark.extra_info[f"{k}_ms_{ccd}"] = round(statistics.median(raw), 2)
                benchmark.extra_info[f"{k}_ms_at_anchor_rate_{ccd}"] = round(statistics.median(at_rate), 2)
                print(f"    {k} on {ccd.replace('_', ' ')} ({len(raw)} rounds): {statistics.median(raw):.1f} ms, "
                      f"{statistics.median(at_rate):.1f} at the anchor's rate")


def test_masking_overhead_fp32(benchmark):
    """HarmoDT-F step over a dense Prompt-DT step of the same model, with ``--fused`` (native
    masking on packed bits: the fast path) and without (``torch.where`` on bool masks)."""
    res = interleaved({"dense": make_trainer("prompt-dt"), "masked_fused": make_trainer("harmodt-f", fused=True),
                       "masked_plain": make_trainer("harmodt-f")}, rounds=max(ROUNDS, 9))
    record(benchmark, res)
    for name in ("masked_fused", "masked_plain"):
        overhead = paired_ratio(res, name, "dense") - 1.0
        benchmark.extra_info[f"masking_overhead_{name.split('_')[1]}"] = round(overhead, 4)
        print(f"masking overhead, {name} (median of per-round ratios): {100 * overhead:.1f} %")
    benchmark.extra_info["targets"] = "overhead < 5% (fused), masked fp32 step <= 120 ms"
    tr = make_trainer("harmodt-f", fused=True)
    benchmark.pedantic(lambda: tr.train_step(tr.sample_tasks()), rounds=10, warmup_rounds=2)


def test_step_bf16(benchmark):
    """The ``--precision bf16`` HarmoDT-F ``--fused`` step, first as training runs it (one model and
    optimizer in the process, anchor probes between rounds). Then fp32 and bf16 steps interleaved
    with the bf16 step on the per-op blocks (autocast casting per op) instead of the block nodes
    running their GEMMs in bf16: the ratios. (Three trainers in turn evict each other's weights and
    optimizer state from the caches between rounds; on a Zen 4 machine that put the same bf16 step
    ~2.5 % above its time alone, 58.4 vs 57.0 ms.)"""
    alone = interleaved({"bf16_alone": make_trainer("harmodt-f", fused=True, precision="bf16")}, rounds=max(ROUNDS, 7))
    gc.collect()
    res = interleaved({"fp32": make_trainer("harmodt-f", fused=True), "bf16": make_trainer("harmodt-f", fused=True, precision="bf16"),
                       "bf16_per_op_blocks": _WithModelSetting(make_trainer("harmodt-f", fused=True, precision="bf16"), "_FUSED_BLOCK", False)})
    record(benchmark, alone)
    benchmark.extra_info["bf16_alone_anchor_gflops_bf16"] = benchmark.extra_info.pop("anchor_gflops_bf16")  # (record(res) writes its own)
    benchmark.extra_info["bf16_alone_gemm_gflops"] = benchmark.extra_info.pop("gemm_gflops")
    if "round_trip_ns_rounds" in benchmark.extra_info:
        benchmark.extra_info["bf16_alone_round_trip_ns_rounds"] = benchmark.extra_info.pop("round_trip_ns_rounds")
    record(benchmark, res)
    speedup = paired_ratio(res, "bf16_per_op_blocks", "bf16")
    benchmark.extra_info["speedup_bf16_block_nodes_over_per_op"] = round(speedup, 3)
    print(f"bf16 step with block nodes vs per-op blocks (median of per-round ratios): {speedup:.3f}x")
    benchmark.extra_info["targets"] = "bf16 step <= 60 ms"
    tr = make_trainer("harmodt-f", fused=True, precision="bf16")
    benchmark.pedantic(lambda: tr.train_step(tr.sample_tasks()), rounds=10, warmup_rounds=2)


def test_fused_vs_reference_step(benchmark):
    res = interleaved({"reference": make_trainer("harmodt-f"), "fused": make_trainer("harmodt-f", fused=True)})
    record(benchmark, res)
    benchmark.extra_info["speedup_fused_over_reference"] = round(1.0 / paired_ratio(res, "fused", "reference"), 3)
    benchmark.extra_info["targets"] = "fused/reference speed ratio >= 1.0"
    tr = make_trainer("harmodt-f", fused=True)
    benchmark.pedantic(lambda: tr.train_step(tr.sample_tasks()), rounds=10, warmup_rounds=2)


class _WithModelSetting:
    """A trainer that steps with one ``harmodt.model`` module switch set to ``value`` (restored
    after each step), so two variants of the same code path can be interleaved in one process."""

    def __init__(self, tr: Trainer, name: str, value):
        self.tr, self.name, self.value = tr, name, value

    def sample_tasks(self):
        return self.tr.sample_tasks()

    def train_step(self, task_ids):
        import harmodt.model as model_module

        old = getattr(model_module, self.name)
        setattr(model_module, self.name, self.value)
        try:
            return self.tr.train_step(task_ids)
        finally:
            setattr(model_module, self.name, old)


def _switch_benchmark(benchmark, default: str, other: str, setting: str, value, what: str, precision: str = "fp32") -> None:
    """The HarmoDT-F ``--fused`` step as shipped (``default``) against the same step with one
    ``harmodt.model`` switch set (``other``), interleaved; records the speed-up of the default."""
    res = interleaved({default: make_trainer("harmodt-f", fused=True, precision=precision),
                       other: _WithModelSetting(make_trainer("harmodt-f", fused=True, precision=precision), setting, value)},
                      rounds=max(ROUNDS, 7))
    record(benchmark, res)
    speedup = paired_ratio(res, other, default)
    benchmark.extra_info[f"speedup_{default}_over_{other}"] = round(speedup, 3)
    print(f"{what} (median of per-round ratios): {speedup:.3f}x")
    tr = make_trainer("harmodt-f", fused=True, precision=precision)
    benchmark.pedantic(lambda: tr.train_step(tr.sample_tasks()), rounds=10, warmup_rounds=2)


def test_step_gemm_engine(benchmark):
    """The step with its block GEMMs (forward, dx, dW) on the default fp32 engine against the next
    best: with AVX-512, this library's fp32 kernel (masks applied while it packs W, every epilogue
    in its output tiles, packed operands shared as the two-CCD state needs) against oneDNN's matmul
    with W * M buffers and separate epilogue passes; otherwise oneDNN's matmul, or on CPUs without
    AVX-512 the AVX2 fp32 kernel, against MKL's sgemm (which picks its AVX2 kernels on AMD CPUs)."""
    from kernels import cpu

    if cpu.f32_native_by_default() and cpu.onednn_gemm_available():
        _switch_benchmark(benchmark, "native", "onednn", "_GEMM_ENGINE", "onednn",
                          "step with the native AVX-512 fp32 GEMMs and fused epilogues vs oneDNN GEMMs")
    elif cpu.onednn_gemm_available():
        _switch_benchmark(benchmark, "onednn", "mkl", "_GEMM_ENGINE", "blas", "step with oneDNN GEMMs vs MKL GEMMs")
    elif cpu.f32_gemm_available():
        _switch_benchmark(benchmark, "native", "mkl", "_GEMM_ENGINE", "blas", "step with the native AVX2 fp32 GEMMs vs MKL GEMMs")
    else:
        pytest.skip("neither oneDNN's matmul nor a native fp32 GEMM runs here: the step already runs on MKL")


def test_step_bf16_gemm_engine(benchmark):
    """The ``--precision bf16`` step with its block GEMMs on this library's AVX512-BF16 kernel and
    their epilogues (bias, ReLU, dropout, residual add, gradient masking) inside them (the default
    where the CPU has AVX512-BF16) against the same step on oneDNN's bf16 GEMMs (``torch.mm``)
    with the epilogues as separate passes."""
    from kernels import cpu

    if not cpu.bf16_gemm_available():
        pytest.skip("no AVX512-BF16 in this build or CPU: the bf16 step already runs on oneDNN")
    _switch_benchmark(benchmark, "native", "onednn", "_GEMM_ENGINE", "blas",
                      "bf16 step with the AVX512-BF16 GEMMs and fused epilogues vs oneDNN GEMMs", precision="bf16")


def test_step_fused_blocks(benchmark):
    """The step with each transformer block as one autograd node (``harmodt_kernels::fused_block``,
    the default) against the per-op blocks (same ops and dropout draws, bit-identical result):
    what the per-op Python and autograd cost."""
    _switch_benchmark(benchmark, "fused_blocks", "per_op_blocks", "_FUSED_BLOCK", False,
                      "step with fused block nodes vs per-op blocks")


def test_step_masks_in_blocks(benchmark):
    """The HarmoDT step with each fused block node masking its W and dW in cache (the default
    with ``--fused``) against one pass over all masked matrices before the blocks and one over
    their gradients after them (same values, bit for bit)."""
    _switch_benchmark(benchmark, "masks_in_blocks", "separate_mask_passes", "_MASKS_IN_BLOCKS", False,
                      "step with masking in the block nodes vs separate passes")


def step_gemms(tr: Trainer) -> list:
    """The GEMMs one training step runs (forward and backward), in order, as (op, arguments) with
    fresh operands of the same shapes, strides and dtypes: captured with a dispatch mode, which
    sees the ops below autograd and autocast (``aten::mm``/``addmm``, and ``harmodt_kernels::gemm``,
    which ``kernels.linear`` dispatches its oneDNN GEMMs through)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
    for name in ("gemm", "gemm_epilogue"):  # the bf16 blocks' GEMMs carry their epilogues (gemm_epilogue)
        if hasattr(torch.ops, "harmodt_kernels") and hasattr(torch.ops.harmodt_kernels, name):
            ops.add(getattr(torch.ops.harmodt_kernels, name).default)
    seen = []

    class Capture(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in ops:
                seen.append((func, [(a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]))
            return func(*args, **(kwargs or {}))

    with Capture():
        tr.train_step(tr.sample_tasks())

    def operand(shape, stride, dtype):
        t = torch.empty_strided(shape, stride, dtype=dtype)
        t.copy_(torch.randn(shape))
        return t

    return [(func, [operand(*a) if isinstance(a, tuple) else a for a in args]) for func, args in seen]


def _gemm_operands(func, args) -> tuple:
    """(a, b) of a captured GEMM: mm(a, b), addmm(bias, a, b), harmodt_kernels.gemm(a, b, bias, engine),
    harmodt_kernels.gemm_epilogue(a, b, epilogue, ...)."""
    return (args[0], args[1]) if func is not torch.ops.aten.addmm.default else (args[1], args[2])


def gemm_flop(gemms: list) -> float:
    total = 0.0
    for func, args in gemms:
        a, b = _gemm_operands(func, args)
        total += 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
    return total


def replay(gemms: list) -> None:
    for func, args in gemms:
        func(*args)


def test_step_gemm_floor(benchmark):
    """What the step targets leave for everything but the GEMMs: the exact GEMMs of one fp32 and
    one bf16 training step (shapes, strides, dtypes and order captured from a real step) replayed
    alone, interleaved round by round with whole steps of the same trainers. The remainder (step
    minus its GEMMs) is attention, masking, optimizer, epilogues, layer norms and per-op cost. (The
    bf16 step's GEMMs on the AVX512-BF16 kernel carry the bias/ReLU, bias/dropout/residual and
    gradient-masking epilogues inside them: those are replayed as part of the GEMMs.)"""
    trainers = {"fp32": make_trainer("harmodt-f", fused=True), "bf16": make_trainer("harmodt-f", fused=True, precision="bf16")}
    for tr in trainers.values():
        for _ in range(3):
            tr.train_step(tr.sample_tasks())
    gemms = {k: step_gemms(tr) for k, tr in trainers.items()}
    rounds = {f"{k}_{part}": [] for k in trainers for part in ("step", "gemms")}
    probes, anchor = [], []
    for _ in range(ROUNDS):
        probes.append(gemm_gflops())
        anchor.append(_anchor_probes(trainers))
        for name, tr in trainers.items():
            replay(gemms[name])  # warm
            t = time.perf_counter()
            for _ in range(STEPS_PER_ROUND):
                replay(gemms[name])
            rounds[f"{name}_gemms"].append((time.perf_counter() - t) / STEPS_PER_ROUND * 1e3)
            t = time.perf_counter()
            for _ in range(STEPS_PER_ROUND):
                tr.train_step(tr.sample_tasks())
            rounds[f"{name}_step"].append((time.perf_counter() - t) / STEPS_PER_ROUND * 1e3)
    anchor_med = {d: statistics.median(a[d] for a in anchor) for d in trainers}
    res = {"ms": {k: statistics.median(v) for k, v in rounds.items()}, "rounds": rounds, "gemm_gflops": statistics.median(probes),
           "precision": {k: k.split("_")[0] for k in rounds}, "anchor_gflops": anchor_med}
    record(benchmark, res)
    scale = res["gemm_gflops"] / ANCHOR_GFLOPS
    for name, target in (("fp32", 120.0), ("bf16", 60.0)):
        own = anchor_med[name] / ANCHOR_RATES[name]  # the 2048^3 rate of this precision
        g, s = res["ms"][f"{name}_gemms"], res["ms"][f"{name}_step"]
        benchmark.extra_info[f"{name}_rest_ms_at_anchor_rate"] = round((s - g) * own, 2)
        benchmark.extra_info[f"{name}_rest_budget_ms_at_anchor_rate"] = round(target - g * own, 2)
        print(f"{name} at the anchor's 2048^3 {name} rate: step {s * own:.1f} ms, GEMMs {g * own:.1f} ms, the rest {(s - g) * own:.1f} ms; "
              f"the {target:.0f} ms target leaves {target - g * own:.1f} ms for the rest")
        flop = gemm_flop(gemms[name])
        g, s = res["ms"][f"{name}_gemms"], res["ms"][f"{name}_step"]
        benchmark.extra_info[f"{name}_gemm_count"] = len(gemms[name])
        benchmark.extra_info[f"{name}_gemm_gflop"] = round(flop / 1e9, 2)
        benchmark.extra_info[f"{name}_gemm_gflops_achieved"] = round(flop / g / 1e6, 1)
        benchmark.extra_info[f"{name}_rest_ms_at_anchor_speed"] = round((s - g) * scale, 2)
        benchmark.extra_info[f"{name}_rest_budget_ms"] = round(target - g * scale, 2)
        print(f"{name}: {len(gemms[name])} GEMMs, {flop / 1e9:.2f} GFLOP in {g:.1f} ms ({flop / g / 1e6:.0f} GFLOP/s); step {s:.1f} ms; "
              f"at the anchor's speed the GEMMs take {g * scale:.1f} ms, the rest {(s - g) * scale:.1f} ms, "
              f"and the {target:.0f} ms target leaves {target - g * scale:.1f} ms for the rest")
    benchmark.extra_info["targets"] = "fp32 step <= 120 ms, bf16 step <= 60 ms (this benchmark shows what the GEMMs leave)"
    benchmark.pedantic(lambda: replay(gemms["fp32"]), rounds=5, warmup_rounds=1)


def _train_cli_steps_per_s(tmp: Path, data: Path, fused: bool) -> float:
    out = tmp / ("fused" if fused else "ref")
    cmd = [sys.executable, "-m", "harmodt.train", "--tasks", ",".join(TASKS[:2]), "--data", str(data), "--method", "harmodt-f",
           "--steps", "60", "--log-every", "20", "--eval-episodes", "0", "--out", str(out), "--no-progress",
           "--update-every", "30", "--warmup-steps", "10"]
    if fused:
        cmd.append("--fused")
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sps = [r["steps_per_s"] for r in recs if "steps_per_s" in r][1:]  # skip the first (warm-up) window
    return statistics.median(sps)


def test_train_cli_end_to_end(benchmark, tmp_path):
    """`python -m harmodt.train --fused` steps/s vs the reference path, on a tiny generated data set."""
    from harmodt.data import generate

    data = tmp_path / "data"
    generate(TASKS[:2], 2, str(data), seed=0, progress=False)
    res = {"reference": [], "fused": []}
    for i in range(2):
        for fused in (False, True):
            res["fused" if fused else "reference"].append(_train_cli_steps_per_s(tmp_path / str(i), data, fused))
    sps = {k: statistics.median(v) for k, v in res.items()}
    benchmark.extra_info.update({f"{k}_steps_per_s": round(v, 2) for k, v in sps.items()})
    benchmark.extra_info["ratio_fused_over_reference"] = round(sps["fused"] / sps["reference"], 3)
    benchmark.extra_info["targets"] = "fused steps/s >= reference steps/s"
    benchmark.pedantic(lambda: None, rounds=1)
    assert sps["fused"] > 0


if __name__ == "__main__":  # quick look without pytest-benchmark
    r = interleaved({"dense": make_trainer("prompt-dt"), "masked": make_trainer("harmodt-f")})
    print(r["ms"], "overhead", paired_ratio(r, "masked", "dense") - 1.0, "GEMM GFLOP/s", r["gemm_gflops"])
    pytest.main([__file__])
