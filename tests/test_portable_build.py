"""The native library built without ``-march=native`` (the build one would ship to other machines
of the architecture, ``HARMODT_NATIVE_ARCH=OFF``) passes the same kernel tests as the build for
this machine: the ops' loops are plain C++ that the compiler vectorizes or not, and
harmony_select's bit-for-bit equality with the reference must hold either way (-ffp-contract=off).

Slow (a CMake build of kernels/csrc, about a minute on two cores, then the kernel tests):
``python -m pytest -m slow tests/test_portable_build.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import cpu

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_library_built_without_march_native_passes_the_kernel_tests(tmp_path):
    lib = cpu.build(build_dir=tmp_path / "build", output_dir=tmp_path / "lib", native_arch=False)
    cache = (tmp_path / "build" / "CMakeCache.txt").read_text()
    assert "HARMODT_NATIVE_ARCH:BOOL=OFF" in cache
    compile_flags = [p.read_text() for p in (tmp_path / "build").rglob("*") if p.name in ("flags.make", "build.ninja")]
    assert compile_flags and not any("-march=native" in text for text in compile_flags)
    env = dict(os.environ, HARMODT_KERNELS_LIB=str(lib))
    env.pop("HARMODT_SKIP_NATIVE", None)
    probe = subprocess.run([sys.executable, "-c", "from kernels import cpu; print(cpu.library_path(), cpu.unavailable_reason())"],
                           env=env, capture_output=True, text=True, cwd=ROOT)
    assert probe.stdout.split() == [str(lib), "None"], probe.stdout + probe.stderr  # that build is the one loaded
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_kernels_cpu.py"],
                         env=env, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
