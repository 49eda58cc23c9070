"""Process-level speed settings for training and evaluation."""

from __future__ import annotations

import ctypes
import sys
from contextlib import contextmanager

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory(enabled: bool = True) -> bool:
    """Ask glibc's malloc to keep freed blocks instead of returning them to the OS.

    PyTorch's CPU allocator calls malloc/free for every activation and gradient; blocks above
    glibc's mmap threshold are unmapped on free and page-faulted in again on the next step,
    which costs ~15 % of a paper-size training step here. Raising the mmap threshold to its
    maximum (32 MiB) and the trim threshold keeps them in the heap for reuse. Returns whether it
    applied (glibc only; elsewhere a no-op).
    """
    if not enabled or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)
    ok &= libc.mallopt(M_TRIM_THRESHOLD, 1024 * 1024 * 1024)
    ok &= libc.mallopt(M_TOP_PAD, 64 * 1024 * 1024)
    return bool(ok)


def return_freed_memory() -> bool:
    """Hand the heap's free blocks back to the OS (glibc's ``malloc_trim``). For the end of a phase
    that freed much more than a training step uses, such as an evaluation chunk's simulators
    (about 21 MB per Meta-World env): under :func:`keep_freed_memory` the process would keep that
    memory, and interleaved with later allocations it is not all reused, so resident memory would
    grow chunk after chunk. Returns whether memory was released (glibc only; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def bf16_matmul_note() -> str | None:
    """A one-line note for ``--precision bf16`` on a CPU without bf16 matrix instructions
    (AVX512-BF16 or AMX), None where it has them. There ATen's bf16 GEMMs emulate bf16 with fp32
    arithmetic and conversions, so a bf16 step is many times slower than an fp32 one (13x measured
    on a 2-core AMD EPYC without AVX-512). For CPU runs only: a GPU computes bf16 itself."""
    import torch

    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return None
    return (f"[harmodt] note: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no bf16 matrix instructions "
            "(AVX512-BF16 or AMX): --precision bf16 emulates its GEMMs, many times slower than --precision fp32 "
            "(13x per training step measured on an AMD EPYC without AVX-512); use fp32 here")


@contextmanager
def float32_matmuls(precision: str, device):
    """fp32 matmuls as ``--precision`` says, inside: TF32 products for ``tf32`` on a CUDA ``device``
    (``torch.set_float32_matmul_precision("high")``, which ``F.linear``, cuBLAS and the Triton
    masked linear follow; storage stays fp32); exact fp32 (``"highest"``) otherwise, ``tf32`` on a
    CPU included. The previous setting is restored on exit."""
    import torch

    before = torch.get_float32_matmul_precision()
    tf32 = precision == "tf32" and torch.device(device).type == "cuda"
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
