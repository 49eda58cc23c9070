"""Check and print that the lowered processor features of CI's second test pass took effect.

.ci/run runs the numerics-sensitive tests a second time as an AVX2 machine without AVX-512 (an AMD
Zen 3, an older Intel Xeon) would run them:

    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 OPENBLAS_CORETYPE=Haswell

and HARMODT_KERNELS_LIB naming the native ops built with -march=x86-64-v3 (AVX2, FMA). Each
setting is read back, by the library it is meant for:

* ATen's kernels: torch.backends.cpu.get_cpu_capability() must be "AVX2".
* OpenBLAS (numpy's and scipy's bundled copies): threadpoolctl must report architecture "Haswell".
* oneDNN: a convolution through it (aten.mkldnn_convolution) run with ONEDNN_VERBOSE=1 names the
  ISA oneDNN dispatches to and the implementation it picked; they must not be AVX-512 ones.
* MKL (statically linked into torch): no API names the code path, and MKL_VERBOSE does not on AMD
  processors. The bits of a fixed SGEMM are compared with those of two other processes: one without
  the setting, and one with MKL_CBWR=AVX2 (MKL's AVX2 code path, pinned). Equal to the second means
  MKL runs its AVX2 path; if it equals the first too, MKL ran that path anyway (what it does on AMD
  processors), and the setting cannot be seen to take effect, nor needs to. Reported, not enforced.
* The native ops: HARMODT_KERNELS_LIB must name a library that kernels loads.

Exits non-zero with one line if ATen's capability, OpenBLAS's architecture, oneDNN's ISA or the
native library is not what the pass needs; it prints one line per setting otherwise.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

LOWERED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "OPENBLAS_CORETYPE": "Haswell"}

_SGEMM = """
import hashlib, torch
g = torch.Generator().manual_seed(0)
a, b = torch.randn(96, 2048, generator=g), torch.randn(2048, 80, generator=g)
print(hashlib.sha1((a @ b).numpy().tobytes()).hexdigest()[:16])
"""

_ONEDNN = """
import torch
x, w = torch.randn(1, 3, 16, 16), torch.randn(8, 3, 3, 3)
torch.ops.aten.mkldnn_convolution(x, w, None, [0, 0], [1, 1], [1, 1], 1)
"""


def _python(code: str, **env: str | None) -> str:
    e = {k: v for k, v in {**os.environ, **env}.items() if v is not None}  # None: unset
    r = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=300)
    if r.returncode:
        sys.exit(f"lowered features: a check's subprocess failed: {r.stderr.strip().splitlines()[-1:]}")
    return r.stdout


def main() -> int:
    missing = [f"{k}={v}" for k, v in LOWERED.items() if os.environ.get(k) != v]
    if missing:
        sys.exit(f"lowered features: not set in the environment: {' '.join(missing)}")

    import threadpoolctl
    import torch

    import harmodt_kernels

    failures = []
    cap = torch.backends.cpu.get_cpu_capability()
    print(f"ATen CPU capability: {cap}")
    if cap != "AVX2":
        failures.append(f"ATen's CPU capability is {cap}, not AVX2 (ATEN_CPU_CAPABILITY=avx2)")

    import numpy  # noqa: F401  (loads numpy's OpenBLAS)
    import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS)
    blas = [i for i in threadpoolctl.threadpool_info() if i.get("internal_api") == "openblas"]
    for i in blas:
        print(f"OpenBLAS {i['version']} ({os.path.basename(i['filepath'])}): architecture {i['architecture']}")
    if not blas:
        failures.append("threadpoolctl finds no OpenBLAS (numpy's) to check OPENBLAS_CORETYPE on")
    failures += [f"OpenBLAS {os.path.basename(i['filepath'])} runs {i['architecture']}, "
                 "not Haswell (OPENBLAS_CORETYPE=Haswell)"
                 for i in blas if i["architecture"] != "Haswell"]

    verbose = _python(_ONEDNN, ONEDNN_VERBOSE="1").splitlines()
    isa = next((line.split("isa:", 1)[1] for line in verbose if ",info,cpu,isa:" in line), None)
    impl = next((line.split(",")[6] for line in verbose if ",exec,cpu,convolution," in line), None)
    print(f"oneDNN: ISA {isa}; convolution implementation {impl}")
    if isa is None or impl is None:
        failures.append("oneDNN printed no ISA or no convolution with ONEDNN_VERBOSE=1")
    elif "AVX-512" in isa or "avx512" in impl:
        failures.append(f"oneDNN runs {isa!r} ({impl}), not AVX2 (ONEDNN_MAX_CPU_ISA=AVX2)")

    here = _python(_SGEMM).strip()
    unset = _python(_SGEMM, MKL_ENABLE_INSTRUCTIONS=None).strip()
    avx2 = _python(_SGEMM, MKL_ENABLE_INSTRUCTIONS=None, MKL_CBWR="AVX2").strip()
    if here != unset:
        how = "took effect: its bits differ from those without MKL_ENABLE_INSTRUCTIONS"
    elif here == avx2:
        how = ("AVX2 code path (bits equal to MKL_CBWR=AVX2's) with or without MKL_ENABLE_INSTRUCTIONS: "
               "the setting cannot be seen to take effect on this processor, nor needs to")
    else:
        how = "cannot be verified: the same bits without MKL_ENABLE_INSTRUCTIONS, other bits than MKL_CBWR=AVX2's"
    print(f"MKL SGEMM: {how} (sha1 {here} here, {unset} unset, {avx2} MKL_CBWR=AVX2)")

    lib = os.environ.get("HARMODT_KERNELS_LIB")
    state = "cpu" in harmodt_kernels.available_backends("cpu")
    print(f"native ops: {lib or 'kernels/harmodt_kernels/_lib (HARMODT_KERNELS_LIB unset)'}: "
          f"{'loaded' if state else 'NOT loaded'}")
    if not state:
        failures.append(f"the native ops did not load from {lib or 'kernels/harmodt_kernels/_lib'}")

    if failures:
        sys.exit("lowered features: " + "; ".join(failures))
    print("lowered features: in effect")
    return 0


if __name__ == "__main__":
    sys.exit(main())
