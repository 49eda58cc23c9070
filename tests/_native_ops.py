"""The native CPU backend's ops, for the test modules that check them (tests/test_kernels_cpu*.py).

The library must exist: `pip install --no-build-isolation -e .` (or the cmake commands in
harmodt_kernels/cpu.py) builds it; if it is missing the importing module fails loudly. Only a run
that sets HARMODT_SKIP_NATIVE=1 on purpose (the install path without the native build) skips it.
"""

import os

import pytest

import harmodt_kernels


def native_ops() -> harmodt_kernels.KernelOps:
    """``backend_ops("cpu")``: the argument checks, then the native library, as every caller gets them."""
    if os.environ.get("HARMODT_SKIP_NATIVE") == "1":
        pytest.skip("HARMODT_SKIP_NATIVE=1: this run checks the install without the native library", allow_module_level=True)
    if harmodt_kernels.backend_reason("cpu", "cpu") is not None:
        raise RuntimeError(f"native CPU kernels unavailable: {harmodt_kernels.backend_reason('cpu', 'cpu')}; build them with "
                           "`pip install --no-build-isolation -e .`")
    return harmodt_kernels.backend_ops("cpu")
