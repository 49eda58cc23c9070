"""The native library built without ``-march=native`` (the build one would ship to other machines
of the architecture, ``HARMODT_NATIVE_ARCH=OFF``) passes the same kernel tests as the build for
this machine: the ops' loops are plain C++ that the compiler vectorizes or not, and
harmony_select's bit-for-bit equality with the reference must hold either way (-ffp-contract=off).

The library is built from outside, by the project's one build (CMakeLists.txt, the CMake run
setup.py makes), into a temporary folder, and loaded through ``HARMODT_KERNELS_LIB``.

Slow (a CMake build of kernels/csrc, about a minute on two cores, then the kernel tests):
``python -m pytest -m slow tests/test_portable_build.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _cmake() -> str:
    found = shutil.which("cmake")
    if found:
        return found
    cmake = pytest.importorskip("cmake", reason="cmake is neither on PATH nor installed from PyPI")
    return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")


@pytest.mark.slow
def test_library_built_without_march_native_passes_the_kernel_tests(tmp_path):
    build, out = tmp_path / "build", tmp_path / "lib"
    cmake = _cmake()
    subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                    f"-DHARMODT_OUTPUT_DIR={out}", "-DHARMODT_NATIVE_ARCH=OFF"], check=True, capture_output=True)
    subprocess.run([cmake, "--build", str(build), "-j", str(os.cpu_count() or 1)], check=True, capture_output=True)
    lib = out / "libharmodt_kernels.so"
    cache = (build / "CMakeCache.txt").read_text()
    assert "HARMODT_NATIVE_ARCH:BOOL=OFF" in cache
    compile_flags = [p.read_text() for p in build.rglob("*") if p.name in ("flags.make", "build.ninja")]
    assert compile_flags and not any("-march=native" in text for text in compile_flags)
    env = dict(os.environ, HARMODT_KERNELS_LIB=str(lib))
    env.pop("HARMODT_SKIP_NATIVE", None)
    probe = subprocess.run([sys.executable, "-c", "import harmodt_kernels; from harmodt_kernels.cpu import NativeLibrary; lib = NativeLibrary(); "
                            "print(lib.path, lib.unavailable, harmodt_kernels.resolve_backend('auto', 'cpu'))"],
                           env=env, capture_output=True, text=True, cwd=ROOT)
    assert probe.stdout.split() == [str(lib), "None", "cpu"], probe.stdout + probe.stderr  # that build is the one loaded
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_kernels_cpu.py", "tests/test_kernels_cpu_ops.py"],
                         env=env, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
