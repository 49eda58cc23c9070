"""`python -m kernels.inspect [--arch sm_90a|sm_80|all] [--json] [--only TEXT]`: compile every Triton kernel ahead
of time for a GPU target with Triton's own compiler (no GPU needed) and report, per kernel and
config, registers, shared memory, local memory (spills) and tensor-core instruction counts
(HGMMA on sm_90a, HMMA on sm_80) read from the cubin with the ``cuobjdump`` in Triton's wheel.

Each kernel is compiled the way the launcher would launch it for the paper's model (width 256,
batch 8 x 75 tokens = 600 rows, 5 tasks; masked matrices 256->768 qkv, 256->256 proj, 256->1024
fc, 1024->256 mlp_proj): the same constexprs and tile sizes, and the JIT's own specialisation of
the arguments (an integer equal to 1 becomes a constant, integers and pointers divisible by 16
are marked so). Among those layers only the forward's output-tile width (64 for N < 512, 128 for
the wide qkv/fc layers) and the dtype change the tiles, so one forward row stands for each
(dtype, width) and lists the layers it serves, and one dX and one dW row for each dtype. fp32 GEMMs are shown with tf32 products (what runs when
``torch.get_float32_matmul_precision()`` is "high"); under "highest" they use fp32 FMAs instead.
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


def _masked_linear_configs() -> list:
    import torch

    from . import triton_masked_linear as ml
    from .reference import num_words

    out = []
    for dtype, tdt, prec in (("fp32", "fp32", "tf32"), ("bf16", "bf16", "ieee")):
        for bn in (64, 128):
            layers = [name for name, (n, _) in LAYERS.items() if (128 if n >= 512 else 64) == bn]
            n, k = LAYERS[layers[0]]
            w = num_words(k)
            common = {"R": ROWS, "N": n, "K": k, "W": w, "T": TASKS, "stride_mt": n * w, "stride_mn": w}
            tag = f"{dtype} N={n} K={k} ({'/'.join(layers)})"
            io = {"x_ptr": tdt, "w_ptr": tdt, "b_ptr": tdt, "y_ptr": tdt, "dy_ptr": tdt, "dx_ptr": tdt, "dw_ptr": tdt,
                  "tg_ptr": "fp32", "m_ptr": "i32", "task_ptr": "i64", "counts_ptr": "i32", "order_ptr": "i64", "seed_ptr": "i64"}
            fwd_ints = {**common, "stride_xm": k, "stride_xk": 1, "stride_wn": k, "stride_wk": 1, "stride_ym": n, "stride_yn": 1,
                        "seed_lo": 12345, "seed_hi": 6789, "thr": 429496729}
            dx_ints = {**common, "stride_dym": n, "stride_dyn": 1, "stride_wn": k, "stride_wk": 1, "stride_dxm": k, "stride_dxk": 1}
            dw_ints = {**common, "stride_dym": n, "stride_dyn": 1, "stride_xm": k, "stride_xk": 1, "stride_dwn": k, "stride_dwk": 1,
                       "stride_tgt": n * k, "stride_tgn": k, "stride_tgk": 1}
            torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
            cfg = {kind: ml.block_config(kind, n, torch_dtype) for kind in ("fwd", "dx", "dw")}
            tiles = {kind: dict(zip(("BM", "BN", "BK"), c[:3])) for kind, c in cfg.items()}
            opts = {kind: {"num_warps": c[3], "enable_fp_fusion": True} for kind, c in cfg.items()}
            for single in (True, False):
                ids = "one task" if single else "mixed"
                # one task: the ReLU + dropout epilogue with its seed read from device memory (a captured step's)
                out.append((f"masked_linear fwd {ids} {tag}" + (", ReLU + dropout epilogue, seed in memory" if single else ""),
                            ml._fwd_kernel, io, fwd_ints, ("scale",),
                            {"SINGLE": single, "HAS_BIAS": True, "RELU": single, "DROP": single, "SEED_PTR": single, "PRECISION": prec,
                             "TP": 8, **tiles["fwd"]}, opts["fwd"]))
            if bn == 64:  # dX and dW tiles do not depend on N
                out.append((f"masked_linear dX one task {dtype}", ml._dx_kernel, io, dx_ints, (),
                            {"SINGLE": True, "PRECISION": prec, "TP": 8, **tiles["dx"]}, opts["dx"]))
                out.append((f"masked_linear dW one task, task_grads {dtype}", ml._dw_kernel, io, dw_ints, (),
                            {"SINGLE": True, "HAS_TG": True, "PRECISION": prec, **tiles["dw"]}, opts["dw"]))
    return out


def kernel_configs() -> list:
    """(label, jit function, pointer types, integer examples, fp32 scalar names, constexprs,
    compile options) for every kernel and the configs the launchers use."""
    os.environ.pop("TRITON_INTERPRET", None)  # compile real kernels, not interpreter wrappers
    import triton.language as tl

    from . import triton_dropout as dr
    from . import triton_harmony_select as hs
    from . import triton_masked_adamw as ad

    out = _masked_linear_configs()
    for dtype in ("fp32", "bf16"):
        out.append((f"dropout / epilogue gradient, ReLU + dropout, {dtype} BLOCK={dr.BLOCK}", dr._epilogue_grad_kernel,
                    {"g_ptr": dtype, "out_ptr": dtype, "gin_ptr": dtype, "seed_ptr": "i64"},
                    {"n": 600 * 1024, "k0": 12345, "k1": 6789, "thr": 429496729},
                    ("scale",), {"DROP": True, "RELU": True, "SEED_PTR": dtype == "fp32", "BLOCK": dr.BLOCK}, {"num_warps": 4}))
    adamw_floats = ("scale", "lr", "w1", "beta2", "w2", "log2_beta1", "log2_beta2", "eps", "decay")
    for g_name, g_dtype in (("fp32", tl.float32), ("bf16", tl.bfloat16)):
        out.append((f"masked_adamw update fp32 params, {g_name} grads BLOCK={ad.BLOCK}", ad._adamw_kernel,
                    {"table_ptr": "i64", "blocks_ptr": "i64", "scale_ptr": "fp32", "lr_ptr": "fp64"}, {}, adamw_floats,
                    {"SCALE_IS_PTR": True, "LR_IS_PTR": g_name == "fp32", "P_DTYPE": tl.float32, "G_DTYPE": g_dtype, "BLOCK": ad.BLOCK},
                    {"num_warps": ad.NUM_WARPS, "enable_fp_fusion": False}))
    out.append(("masked_adamw step += 1 (up to 128 params)", ad._step_kernel, {"table_ptr": "i64"}, {"n_params": 82}, (),
                {"NP": 128}, {}))
    p = 4_718_592  # the paper model's masked weights: 6 x (768 + 256 + 1024 + 256) x 256
    for k in (20, 100, 1000):
        kc = hs.candidates_per_block(k, hs.BLOCK)
        out.append((f"harmony_select candidates k={k} BLOCK={hs.BLOCK} KC={kc}", hs._candidates_kernel,
                    {"h_ptr": "fp32", "r_ptr": "fp32", "m_ptr": "i32", "hkey_ptr": "i64", "rkey_ptr": "i64"},
                    {"P": p, "W": p // 32, "stride_h": p, "stride_r": p, "stride_m": p // 32, "n_blocks": p // hs.BLOCK}, (),
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
        return [compile_and_read(*cfg, ARCHES[arch], Path(d)) for cfg in kernel_configs() if only is None or only in cfg[0]]


def format_table(rows: list[dict], arch: str) -> str:
    head = f"{'kernel (' + arch + ')':<72} {'regs':>5} {'smem(B)':>8} {'local(B)':>8} {'HGMMA':>6} {'HMMA':>5} {'warps':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        smem = max(r["static_shared"], r["dynamic_shared"])
        lines.append(f"{r['kernel']:<72} {r['registers']:>5} {smem:>8} {r['local']:>8} {r['hgmma']:>6} {r['hmma']:>5} {r['num_warps']:>5}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.inspect", description=__doc__.split("\n\n")[0])
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
