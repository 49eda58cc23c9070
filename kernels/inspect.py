"""`python -m kernels.inspect [--arch sm_90a|sm_80]`: compile every Triton kernel ahead of time
for a GPU target with Triton's own compiler (no GPU needed) and report, per kernel and config,
registers, shared memory, local memory (spills) and tensor-core instruction counts read from the
cubin with the ``cuobjdump`` that ships in Triton's wheel.

Configs are the ones the launchers pick for the paper's model (width 256; masked matrices
256->768, 256->256, 256->1024, 1024->256) and the selection kernel's block.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHES = {"sm_90a": 90, "sm_80": 80}
PTR_F32 = ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "dy_ptr", "dx_ptr", "dw_ptr", "tg_ptr", "mg_ptr", "g_ptr", "ghat_ptr", "p_ptr")
PTR_I32 = ("m_ptr", "order_ptr", "tiles_ptr")
PTR_I64 = ("hkey_ptr", "rkey_ptr")


def _signature(fn, constexprs: dict) -> dict:
    sig = {}
    for a in fn.arg_names:
        if a in constexprs:
            sig[a] = "constexpr"
        elif a in PTR_F32:
            sig[a] = "*fp32"
        elif a in PTR_I32:
            sig[a] = "*i32"
        elif a in PTR_I64:
            sig[a] = "*i64"
        elif a == "lam":
            sig[a] = "fp32"
        else:
            sig[a] = "i32"
    return sig


def kernel_configs() -> list[tuple[str, object, dict]]:
    """(label, jit function, constexprs) for every kernel and the configs the launchers use."""
    os.environ.pop("TRITON_INTERPRET", None)  # compile real kernels, not interpreter wrappers
    from . import triton_harmony_select as hs
    from . import triton_masked_linear as ml

    out = []
    for n, k in ((768, 256), (256, 256), (1024, 256), (256, 1024)):
        bm, bn, bk = 64, (128 if n >= 512 else 64), (64 if k >= 256 else 32)
        tag = f"N={n} K={k} BM={bm} BN={bn} BK={bk}"
        out.append((f"masked_linear fwd  {tag}", ml._fwd_kernel, {"HAS_BIAS": True, "PRECISION": "tf32", "BM": bm, "BN": bn, "BK": bk}))
        out.append((f"masked_linear dX   {tag}", ml._dx_kernel, {"PRECISION": "tf32", "BM": bm, "BN": bn, "BK": bk}))
        out.append((f"masked_linear dW   {tag}", ml._dw_kernel, {"HAS_TG": False, "PRECISION": "tf32", "BM": bm, "BN": bn, "BK": bk}))
    for kc in (128,):
        out.append((f"harmony_select candidates BLOCK={hs.BLOCK} KC={kc} fisher", hs._candidates_kernel,
                    {"FISHER": True, "BLOCK": hs.BLOCK, "KC": kc}))
    return out


def _cuobjdump() -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"{path}: Triton's wheel has no cuobjdump")
    return path


def compile_and_read(label, fn, constexprs, capability: int, workdir: Path) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=_signature(fn, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32))
    cubin = workdir / (re.sub(r"[^A-Za-z0-9]+", "_", label) + ".cubin")
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


def inspect(arch: str = "sm_90a") -> list[dict]:
    if arch not in ARCHES:
        raise ValueError(f"--arch must be one of {', '.join(ARCHES)}, got {arch!r}")
    import warnings

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    with tempfile.TemporaryDirectory() as d:
        return [compile_and_read(label, fn, c, ARCHES[arch], Path(d)) for label, fn, c in kernel_configs()]


def format_table(rows: list[dict], arch: str) -> str:
    head = f"{'kernel (' + arch + ')':<58} {'regs':>5} {'smem(B)':>8} {'local(B)':>8} {'HGMMA':>6} {'HMMA':>5} {'warps':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        smem = max(r["static_shared"], r["dynamic_shared"])
        lines.append(f"{r['kernel']:<58} {r['registers']:>5} {smem:>8} {r['local']:>8} {r['hgmma']:>6} {r['hmma']:>5} {r['num_warps']:>5}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_90a", choices=sorted(ARCHES))
    args = p.parse_args(argv)
    try:
        rows = inspect(args.arch)
    except (RuntimeError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows, args.arch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
