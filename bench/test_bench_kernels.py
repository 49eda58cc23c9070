"""Native CPU kernels (kernels/cpu.py, kernels/csrc) vs the plain-PyTorch reference, at the paper's
model size (width 256; masked matrices qkv 256->768, attn-proj 256->256, fc 256->1024, mlp-proj
1024->256; 4.72 M masked weights in 6 layers). Run with::

    python -m pytest bench/test_bench_kernels.py --benchmark-only -p no:randomly

Each benchmark times the fused op with pytest-benchmark and, interleaved round by round with it,
the reference; ``extra_info`` holds both medians, the time ratio and the peak extra memory of
each, and `bench/conftest.py` prints a fused-vs-reference table at the end of the session.

Peak extra memory: every op runs in a fresh subprocess (this file, ``--probe``) with
``MALLOC_MMAP_THRESHOLD_`` fixed so freed large blocks go back to the OS. After a small warm-up
call the peak-RSS counter is reset (``echo 5 > /proc/self/clear_refs``), the op runs once, and
``VmHWM - VmRSS(before)`` is the peak extra resident memory; ``workspace`` subtracts the bytes of
the returned output (inherent to both variants), leaving what the op allocated besides it.

Targets: (1) mixed-task evaluation forward, 50 tasks x 10 episodes x 60 tokens = 30000 rows:
fused >= 1.5x faster and >= 20x less workspace; (3) mask-update selection for 50 tasks over
P = 4.72 M: >= 5x faster and >= 10x less workspace.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kernels import cpu  # noqa: E402
from kernels import reference as ref  # noqa: E402

ROUNDS = int(os.environ.get("HARMODT_BENCH_ROUNDS", "5"))
LAYERS = {"qkv": (256, 768), "attn_proj": (256, 256), "fc": (256, 1024), "mlp_proj": (1024, 256)}
P_MODEL = 6 * sum(k * n for k, n in LAYERS.values())  # 4,718,592 masked weights
EVAL_TASKS, EVAL_EPISODES, EVAL_TOKENS = 50, 10, 60  # history K=20 -> 60 tokens per row of x
SPARSITY = 0.2  # paper: S = 0.2
ETA_MAX = 100  # paper: eta_max = 100 weights changed per mask update
LAMBDA = 10.0  # paper: lambda = 10

if cpu.unavailable_reason() is not None:
    raise RuntimeError(f"bench needs the native CPU kernels: {cpu.unavailable_reason()}")


# ------------------------------------------------------------------------------------------------
# inputs (deterministic, rebuilt identically inside the memory probes)


def masked_linear_inputs(k: int, n: int, layout: str, requires_grad: bool = False):
    g = torch.Generator().manual_seed(k * 7 + n)
    if layout == "train":  # one training batch: 8 x 75 tokens of one task
        r, t_count = 8 * 75, EVAL_TASKS
        ids = torch.full((r,), 3, dtype=torch.int64)
    else:
        r, t_count = EVAL_TASKS * EVAL_EPISODES * EVAL_TOKENS, EVAL_TASKS
        if layout == "sorted":  # episodes of a task side by side
            ids = torch.arange(t_count).repeat_interleave(EVAL_EPISODES * EVAL_TOKENS)
        elif layout == "shuffled":  # episodes in random task order: runs of 60 rows
            ep = torch.randperm(t_count * EVAL_EPISODES, generator=g)
            ids = (ep // EVAL_EPISODES).repeat_interleave(EVAL_TOKENS)
        else:
            raise ValueError(layout)
    x = torch.randn(r, k, generator=g).requires_grad_(requires_grad)
    w = (torch.randn(n, k, generator=g) * 0.05).requires_grad_(requires_grad)
    b = torch.randn(n, generator=g).requires_grad_(requires_grad)
    masks = ref.pack_masks(torch.rand(t_count, n, k, generator=g) >= SPARSITY)
    return x, w, b, masks, ids


def harmony_inputs(t_count: int, p: int, importance: str):
    g = torch.Generator().manual_seed(t_count + p)
    masks = torch.empty(t_count, ref.num_words(p), dtype=torch.int32)
    masked_grads = torch.empty(t_count, p)
    for i in range(t_count):  # row by row: no [T, P] bool temporaries
        active = torch.rand(p, generator=g) >= SPARSITY
        masks[i] = ref.pack_masks(active)
        masked_grads[i] = torch.randn(p, generator=g) * active  # gbar_i is 0 on masked weights
    grads = torch.randn(t_count, p, generator=g)
    params = torch.randn(p, generator=g) * 0.05
    return masked_grads, grads, params, masks, ETA_MAX, LAMBDA, importance


IMPLS = {
    "masked_linear": {"fused": cpu.masked_linear, "reference": ref.masked_linear},
    "harmony_select": {"fused": cpu.harmony_select, "reference": ref.harmony_select},
}


def _fwd(op, impl, args):
    fn = IMPLS[op][impl]
    if op == "masked_linear":
        with torch.no_grad():
            return fn(*args)
    return fn(*args)


def _fwd_bwd(impl, args):
    x, w, b, masks, ids = args
    y = IMPLS["masked_linear"][impl](x, w, b, masks, ids)
    y.backward(torch.ones_like(y))
    return y


# ------------------------------------------------------------------------------------------------
# peak extra memory, measured in a fresh process


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _probe_main(spec: dict) -> dict:
    op, impl = spec["op"], spec["impl"]
    if op in ("masked_linear", "masked_linear_train"):
        args = masked_linear_inputs(spec["k"], spec["n"], spec["layout"], requires_grad=op == "masked_linear_train")
        small = masked_linear_inputs(33, 33, "train", requires_grad=op == "masked_linear_train")
        small = (small[0][:64].detach().clone().requires_grad_(small[0].requires_grad), *small[1:4], small[4][:64])
    else:
        args = harmony_inputs(spec["t"], spec["p"], spec["importance"])
        small = harmony_inputs(spec["t"], 4097, spec["importance"])
    run = (lambda a: _fwd_bwd(impl, a)) if op == "masked_linear_train" else (lambda a: _fwd(op, impl, a))
    run(small)  # warm-up: library, thread pools, code paths
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status("VmRSS")
    out = run(args)
    peak = _status("VmHWM")
    out_bytes = out.numel() * out.element_size()
    if op == "masked_linear_train":  # the gradients are outputs too
        out_bytes += sum(t.grad.numel() * t.grad.element_size() for t in args[:3])
    return {"peak_extra": peak - base, "output": out_bytes, "workspace": max(peak - base - out_bytes, 0)}


def probe_memory(**spec) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--probe", json.dumps(spec)],
        env=env, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# timing


def interleaved(variants: dict, rounds: int) -> dict[str, float]:
    """Median ms of each variant, measured in alternating rounds after one warm-up call each."""
    times = {k: [] for k in variants}
    for fn in variants.values():
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def record(benchmark, results, name, ms, mem, targets):
    info = {
        "fused_ms": round(ms["fused"], 2),
        "reference_ms": round(ms["reference"], 2),
        "speedup": round(ms["reference"] / ms["fused"], 2),
        "fused_peak_extra_MiB": round(mem["fused"]["peak_extra"] / 2**20, 2),
        "reference_peak_extra_MiB": round(mem["reference"]["peak_extra"] / 2**20, 2),
        "output_MiB": round(mem["fused"]["output"] / 2**20, 2),
        "fused_workspace_MiB": round(mem["fused"]["workspace"] / 2**20, 2),
        "reference_workspace_MiB": round(mem["reference"]["workspace"] / 2**20, 2),
        "workspace_ratio": round(mem["reference"]["workspace"] / max(mem["fused"]["workspace"], 1), 1),
        "targets": targets,
    }
    benchmark.extra_info.update(info)
    results.append({"name": name, **info})


@pytest.mark.parametrize(
    "layer,layout",
    [("fc", "sorted"), ("fc", "shuffled"), ("qkv", "sorted"), ("attn_proj", "sorted"), ("mlp_proj", "sorted")],
)
def test_bench_eval_forward(benchmark, kernel_results, layer, layout):
    """Benchmark 1: mixed-task forward of 30000 rows (50 tasks x 10 episodes x 60 tokens)."""
    k, n = LAYERS[layer]
    mem = {impl: probe_memory(op="masked_linear", impl=impl, k=k, n=n, layout=layout) for impl in ("fused", "reference")}
    args = masked_linear_inputs(k, n, layout)
    ms = interleaved({impl: (lambda i=impl: _fwd("masked_linear", i, args)) for impl in ("fused", "reference")},
                     rounds=max(ROUNDS // 2, 1))
    benchmark.pedantic(lambda: _fwd("masked_linear", "fused", args), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    record(benchmark, kernel_results, f"1 eval fwd {layer} {k}->{n} {layout}", ms, mem, ">=1.5x faster, >=20x less workspace")


@pytest.mark.parametrize("layer", ["fc", "mlp_proj"])
def test_bench_train_forward_backward(benchmark, kernel_results, layer):
    """One training batch (8 x 75 tokens of one task) forward + backward through one layer."""
    k, n = LAYERS[layer]
    mem = {impl: probe_memory(op="masked_linear_train", impl=impl, k=k, n=n, layout="train")
           for impl in ("fused", "reference")}
    args = masked_linear_inputs(k, n, "train", requires_grad=True)

    def step(impl):
        for t in args[:3]:
            t.grad = None
        _fwd_bwd(impl, args)

    ms = interleaved({impl: (lambda i=impl: step(i)) for impl in ("fused", "reference")}, rounds=ROUNDS * 4)
    benchmark.pedantic(lambda: step("fused"), rounds=ROUNDS * 4, iterations=1, warmup_rounds=1)
    record(benchmark, kernel_results, f"train fwd+bwd {layer} {k}->{n} (600 rows, 1 task)", ms, mem, "faster than reference")


def _gemm_engine_benchmark(benchmark, dtype: torch.dtype, engines: dict) -> None:
    """The model's block GEMMs at one training batch (592 rows: 8 x 74 tokens), each layer's
    forward (x W^T), dx (dy W) and dW (dy^T x) in ``dtype``, on ``kernels.cpu.gemm`` engines
    (``engines``: {engine: label}, the default first), interleaved."""
    m = 592
    cases = {}
    for layer, (k, n) in LAYERS.items():
        g = torch.Generator().manual_seed(k + n)
        x, w, dy = (torch.randn(m, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype),
                    torch.randn(m, n, generator=g).to(dtype))
        cases.update({f"{layer} fwd": (x, w.t()), f"{layer} dx": (dy, w), f"{layer} dW": (dy.t(), x)})
    first = next(iter(engines))
    total = {e: 0.0 for e in engines}
    flop = 0.0
    for name, (a, b) in cases.items():
        reps = 10
        ms = interleaved({e: (lambda e=e: [cpu.gemm(a, b, engine=e) for _ in range(reps)]) for e in engines}, rounds=ROUNDS * 2)
        ms = {e: v / reps for e, v in ms.items()}
        gf = 2 * a.shape[0] * a.shape[1] * b.shape[1] / 1e9
        flop += gf
        for e in total:
            total[e] += ms[e] * 6  # six layers
        benchmark.extra_info[name] = {**{f"{e}_ms": round(v, 3) for e, v in ms.items()},
                                      **{f"{e}_gflops": round(gf / v * 1e3, 1) for e, v in ms.items()}}
        print(f"{name:>16}: " + ", ".join(f"{engines[e]} {v:.3f} ms ({gf / v * 1e3:.0f} GFLOP/s)" for e, v in ms.items()))
    benchmark.extra_info.update({f"six_layers_{e}_ms": round(v, 2) for e, v in total.items()})
    others = [e for e in engines if e != first]
    benchmark.extra_info["speedup"] = round(total[others[0]] / total[first], 3)  # over the next engine listed
    for e in others[1:]:
        benchmark.extra_info[f"speedup_over_{e}"] = round(total[e] / total[first], 3)
    print(f"all block GEMMs of a step at full rows (6 layers, {6 * flop:.1f} GFLOP, {dtype}): {engines[first]} {total[first]:.1f} ms, "
          + ", ".join(f"{engines[e]} {total[e]:.1f} ms ({total[e] / total[first]:.2f}x)" for e in others))
    a, b = cases["fc fwd"]
    benchmark.pedantic(lambda: cpu.gemm(a, b), rounds=ROUNDS * 4, iterations=1, warmup_rounds=1)


def test_bench_gemm_engines(benchmark):
    """fp32: the default engine against the others: with AVX-512, this library's kernel against
    oneDNN's matmul and MKL's sgemm (``engine`` ``native``, ``onednn``, ``blas``); else oneDNN's
    matmul against MKL's sgemm. (Alone and hot, with no epilogue or mask: the native kernel's gain
    in a step comes from what it fuses, ``bench/test_bench_train.py::test_step_gemm_engine``.)"""
    if not cpu.onednn_gemm_available():
        pytest.skip("oneDNN's matmul does not run here (no at::native::mkldnn_matmul in this build, or it refuses this CPU: "
                    "PyTorch 2.13 asks for AVX-512 BW/VL/DQ): the fp32 GEMMs already run on MKL or the AVX2 kernel")
    engines = {"onednn": "oneDNN", "blas": "MKL"}
    if cpu.f32_native_by_default():
        engines = {"native": "AVX-512 kernel", **engines}
    _gemm_engine_benchmark(benchmark, torch.float32, engines)


def test_bench_bf16_gemm_engines(benchmark):
    """bf16: this library's AVX512-BF16 kernel (the default) against ``torch.mm``, which runs
    oneDNN's bf16 GEMM (``engine`` ``native``, ``blas``)."""
    if not cpu.bf16_gemm_available():
        pytest.skip("no AVX512-BF16 in this build or CPU: the native bf16 GEMM is not built")
    _gemm_engine_benchmark(benchmark, torch.bfloat16, {"native": "AVX512-BF16 kernel", "blas": "oneDNN (torch.mm)"})


def test_bench_harmony_select(benchmark, kernel_results):
    """Benchmark 3: mask-update selection for 50 tasks over P = 4.72 M (k = 100, lambda = 10)."""
    t_count, importance = EVAL_TASKS, "magnitude"
    mem = {impl: probe_memory(op="harmony_select", impl=impl, t=t_count, p=P_MODEL, importance=importance)
           for impl in ("fused", "reference")}
    args = harmony_inputs(t_count, P_MODEL, importance)
    # the reference takes about a minute per call here: one timed round of it
    fused_ms = []
    for _ in range(max(ROUNDS // 2, 2)):
        t = time.perf_counter()
        out = cpu.harmony_select(*args)
        fused_ms.append((time.perf_counter() - t) * 1e3)
    t = time.perf_counter()
    expect = ref.harmony_select(*args)
    ref_ms = (time.perf_counter() - t) * 1e3
    assert torch.equal(out, expect), "fused harmony_select disagrees with the reference"
    benchmark.pedantic(lambda: cpu.harmony_select(*args), rounds=max(ROUNDS // 2, 2), iterations=1)
    ms = {"fused": statistics.median(fused_ms), "reference": ref_ms}
    record(benchmark, kernel_results, f"3 harmony_select T={t_count} P={P_MODEL} {importance}", ms, mem,
           ">=5x faster, >=10x less workspace")


def test_bench_pack_unpack(benchmark, kernel_results):
    """Packing / unpacking the masks of 50 tasks over the 4.72 M masked weights."""
    g = torch.Generator().manual_seed(1)
    bmask = torch.rand(EVAL_TASKS, P_MODEL, generator=g) >= SPARSITY
    words = ref.pack_masks(bmask)
    ms = interleaved(
        {"fused": lambda: (cpu.pack_masks(bmask), cpu.unpack_masks(words, P_MODEL)),
         "reference": lambda: (ref.pack_masks(bmask), ref.unpack_masks(words, P_MODEL))},
        rounds=ROUNDS,
    )
    benchmark.pedantic(lambda: (cpu.pack_masks(bmask), cpu.unpack_masks(words, P_MODEL)), rounds=ROUNDS, iterations=1)
    info = {"fused_ms": round(ms["fused"], 2), "reference_ms": round(ms["reference"], 2),
            "speedup": round(ms["reference"] / ms["fused"], 2)}
    benchmark.extra_info.update(info)
    kernel_results.append({"name": f"pack+unpack T={EVAL_TASKS} P={P_MODEL}", **info})


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--probe":
    torch.set_num_threads(int(os.environ.get("HARMODT_BENCH_THREADS", torch.get_num_threads())))
    print(json.dumps(_probe_main(json.loads(sys.argv[2]))))
