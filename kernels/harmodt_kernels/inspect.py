"""`python -m harmodt_kernels.inspect [--arch sm_90a|sm_80|all] [--json] [--only TEXT]`: compile every Triton kernel
ahead of time for a GPU target with Triton's own compiler (no GPU needed) and report, per kernel and
config, registers, shared memory, local memory (spills) and tensor-core instruction counts
(HGMMA on sm_90a, HMMA on sm_80) read from the cubin with the ``cuobjdump`` in Triton's wheel.

Each kernel is compiled the way the launcher would launch it for the paper's model (width 256,
batch 8 x 75 tokens = 600 rows, 5 tasks; masked matrices 256->768 qkv, 256->256 proj, 256->1024
fc, 1024->256 mlp_proj): the same constexprs, and the JIT's own specialisation of the arguments
(an integer equal to 1 becomes a constant, integers and pointers divisible by 16 are marked so).
The masked-linear kernels are autotuned (harmodt_kernels/triton_tiles.py): every tile config the
autotuner may pick on the target's family (sm_80 for --arch sm_80, sm_90 for sm_90a) is compiled,
for fp32 and bf16; every layer's N and K are multiples of 16, so the tile alone decides the code.
fp32 GEMMs are shown with tf32 products (what runs when ``torch.get_float32_matmul_precision()``
is "high"); under "highest" they use fp32 FMAs instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHES = {"sm_90a": 90, "sm_80": 80}
ROWS, TASKS = 600, 5  # 8 sequences x 75 tokens; MT5
LAYERS = {"qkv": (768, 256), "proj": (256, 256), "fc": (1024, 256), "mlp_proj": (256, 1024)}  # name: (N, K)


def _specialise(fn, ptrs: dict, ints: dict, floats: tuple, constexprs: dict):
    """(signature, constexprs, attrs) as Triton's JIT would make them for these arguments:
    ``ptrs`` maps pointer arguments to element types (all 16-byte aligned), ``ints`` gives
    integer arguments example values, ``floats`` names fp32 scalars."""
    sig, const, attrs = {}, dict(constexprs), {}
    for i, a in enumerate(fn.arg_names):
        if a in constexprs:
            sig[a] = "constexpr"
        elif a in ptrs:
            sig[a] = "*" + ptrs[a]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif a in ints:
            v = ints[a]
            if v == 1:
                sig[a], const[a] = "constexpr", 1
            else:
                sig[a] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif a in floats:
            sig[a] = "fp32"
        else:
            raise ValueError(f"{fn.__name__}: no example value for argument {a!r}")
    return sig, const, attrs


def _masked_linear_configs(capability: int) -> list:
    """Every tile the autotuner may pick on ``capability``'s target family (harmodt_kernels/triton_tiles.py),
    for fp32 (tf32 products) and bf16: the forward with one task (with the ReLU + dropout epilogue)
    and with mixed tasks, dX and dW (with task gradients) with one task."""
    from . import triton_masked_linear as ml
    from .reference import num_words
    from .triton_tiles import tile_configs

    out = []
    n, k = LAYERS["qkv"]  # the tiles, not the layer, decide the code: every layer's N and K are multiples of 16
    w = num_words(k)
    common = {"R": ROWS, "N": n, "K": k, "W": w, "T": TASKS, "stride_mt": n * w, "stride_mn": w}
    fwd_ints = {**common, "stride_xm": k, "stride_xk": 1, "stride_wn": k, "stride_wk": 1, "stride_ym": n,
                "stride_yn": 1,
                "seed_lo": 12345, "seed_hi": 6789, "thr": 429496729}
    dx_ints = {**common, "stride_dym": n, "stride_dyn": 1, "stride_wn": k, "stride_wk": 1, "stride_dxm": k,
               "stride_dxk": 1}
    dw_ints = {**common, "stride_dym": n, "stride_dyn": 1, "stride_xm": k, "stride_xk": 1, "stride_dwn": k,
               "stride_dwk": 1,
               "stride_tgt": n * k, "stride_tgn": k, "stride_tgk": 1}
    for dtype, tdt, prec, size in (("fp32", "fp32", "tf32", 4), ("bf16", "bf16", "ieee", 2)):
        io = {"x_ptr": tdt, "w_ptr": tdt, "b_ptr": tdt, "y_ptr": tdt, "dy_ptr": tdt, "dx_ptr": tdt, "dw_ptr": tdt,
              "tg_ptr": "fp32", "m_ptr": "i32", "task_ptr": "i64", "counts_ptr": "i32", "order_ptr": "i64",
              "seed_ptr": "i64"}
        for kind in ("fwd", "dx", "dw"):
            for cfg in tile_configs(kind, size, capability):
                tile = cfg.kwargs
                tag = f"{dtype} {tile['BM']}x{tile['BN']}x{tile['BK']} w{cfg.num_warps} s{cfg.num_stages}"
                opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "enable_fp_fusion": True}
                if kind == "fwd":
                    for single in (True, False):
                        ids = "one task" if single else "mixed"
                        name = f"masked_linear fwd {ids} {tag}" + (", ReLU + dropout epilogue, seed in memory"
                                                                   if single else "")
                        out.append((name, ml._fwd_kernel.fn, io,
                                    fwd_ints, ("scale",), {"SINGLE": single, "HAS_BIAS": True, "RELU": single,
                                                           "DROP": single, "SEED_PTR": single,
                                                           "PRECISION": prec, "TP": 8, **tile}, opts))
                elif kind == "dx":
                    out.append((f"masked_linear dX one task {tag}", ml._dx_kernel.fn, io, dx_ints, (),
                                {"SINGLE": True, "PRECISION": prec, "TP": 8, **tile}, opts))
                else:
                    out.append((f"masked_linear dW one task, task_grads {tag}", ml._dw_kernel.fn, io, dw_ints, (),
                                {"SINGLE": True, "HAS_TG": True, "PRECISION": prec, **tile}, opts))
    return out


def kernel_configs(capability: int = 90) -> list:
    """(label, jit function, pointer types, integer examples, fp32 scalar names, constexprs,
    compile options) for every kernel and every config the launchers or the autotuner may use on
    ``capability``'s target."""
    os.environ.pop("TRITON_INTERPRET", None)  # compile real kernels, not interpreter wrappers
    import triton.language as tl

    from . import triton_dropout as dr
    from . import triton_harmony_select as hs
    from . import triton_masked_adamw as ad

    out = _masked_linear_configs(capability)
    for dtype in ("fp32", "bf16"):
        out.append((f"dropout / epilogue gradient, ReLU + dropout, {dtype} BLOCK={dr.BLOCK}", dr._epilogue_grad_kernel,
                    {"g_ptr": dtype, "out_ptr": dtype, "gin_ptr": dtype, "seed_ptr": "i64"},
                    {"n": 600 * 1024, "k0": 12345, "k1": 6789, "thr": 429496729},
                    ("scale",), {"DROP": True, "RELU": True, "SEED_PTR": dtype == "fp32", "BLOCK": dr.BLOCK},
                    {"num_warps": 4}))
    adamw_floats = ("scale", "lr", "w1", "beta2", "w2", "log2_beta1", "log2_beta2", "eps", "decay")
    for g_name, g_dtype in (("fp32", tl.float32), ("bf16", tl.bfloat16)):
        out.append((f"masked_adamw update fp32 params, {g_name} grads BLOCK={ad.BLOCK}", ad._adamw_kernel,
                    {"table_ptr": "i64", "blocks_ptr": "i64", "scale_ptr": "fp32", "lr_ptr": "fp64"}, {}, adamw_floats,
                    {"SCALE_IS_PTR": True, "LR_IS_PTR": g_name == "fp32", "P_DTYPE": tl.float32, "G_DTYPE": g_dtype,
                     "BLOCK": ad.BLOCK},
                    {"num_warps": ad.NUM_WARPS, "enable_fp_fusion": False}))
    out.append(("masked_adamw step += 1 (up to 128 params)", ad._step_kernel, {"table_ptr": "i64"}, {"n_params": 82},
                (), {"NP": 128}, {}))
    p = 4_718_592  # the paper model's masked weights: 6 x (768 + 256 + 1024 + 256) x 256
    for k in (20, 100, 1000):
        kc = hs.candidates_per_block(k, hs.BLOCK)
        out.append((f"harmony_select candidates k={k} BLOCK={hs.BLOCK} KC={kc}", hs._candidates_kernel,
                    {"h_ptr": "fp32", "r_ptr": "fp32", "m_ptr": "i32", "hkey_ptr": "i64", "rkey_ptr": "i64"},
                    {"P": p, "W": p // 32, "stride_h": p, "stride_r": p, "stride_m": p // 32,
                     "n_blocks": p // hs.BLOCK}, (),
                    {"BLOCK": hs.BLOCK, "KC": kc}, {}))
    return out


def _cuobjdump() -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"{path}: Triton's wheel has no cuobjdump")
    return path


def compile_and_read(label, fn, ptrs, ints, floats, constexprs, options, capability: int, workdir: Path) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, const, attrs = _specialise(fn, ptrs, ints, floats, constexprs)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                              target=GPUTarget("cuda", capability, 32), options=options)
    cubin = workdir / (re.sub(r"[^A-Za-z0-9]+", "_", label) + f"_{capability}.cubin")
    cubin.write_bytes(compiled.asm["cubin"])
    tool = _cuobjdump()
    res = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump -res-usage {cubin} failed: {res.stderr.strip()}")
    m = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", res.stdout)
    if not m:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output: {res.stdout!r}")
    sass = subprocess.run([str(tool), "-sass", str(cubin)], capture_output=True, text=True)
    if sass.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass {cubin} failed: {sass.stderr.strip()}")
    return {
        "kernel": label, "registers": int(m.group(1)), "static_shared": int(m.group(2)),
        "dynamic_shared": int(compiled.metadata.shared), "local": int(m.group(3)),
        "hgmma": len(re.findall(r"\bHGMMA\b", sass.stdout)), "hmma": len(re.findall(r"\bHMMA\b", sass.stdout)),
        "num_warps": int(compiled.metadata.num_warps),
    }


def inspect(arch: str = "sm_90a", only: str | None = None) -> list[dict]:
    """One row per kernel config compiled for ``arch`` (those whose label contains ``only``)."""
    if arch not in ARCHES:
        raise ValueError(f"--arch must be one of {', '.join(ARCHES)}, got {arch!r}")
    import warnings

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    with tempfile.TemporaryDirectory() as d:
        return [compile_and_read(*cfg, ARCHES[arch], Path(d)) for cfg in kernel_configs(ARCHES[arch])
                if only is None or only in cfg[0]]


def format_table(rows: list[dict], arch: str) -> str:
    head = (f"{'kernel (' + arch + ')':<72} {'regs':>5} {'smem(B)':>8} {'local(B)':>8} {'HGMMA':>6} {'HMMA':>5} "
            f"{'warps':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        smem = max(r["static_shared"], r["dynamic_shared"])
        lines.append(f"{r['kernel']:<72} {r['registers']:>5} {smem:>8} {r['local']:>8} {r['hgmma']:>6} "
                     f"{r['hmma']:>5} {r['num_warps']:>5}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodt_kernels.inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="all", choices=["all", *ARCHES])
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of tables")
    p.add_argument("--only", metavar="TEXT", help="only the kernels whose label contains TEXT")
    args = p.parse_args(argv)
    arches = list(ARCHES) if args.arch == "all" else [args.arch]
    try:
        results = {a: inspect(a, args.only) for a in arches}
    except (RuntimeError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print("\n\n".join(format_table(rows, a) for a, rows in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
