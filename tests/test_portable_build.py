"""The native ops built without AVX-512 (baseline x86-64): every op's portable fallback loops,
which machines without AVX-512 run (and this one never does otherwise), against the reference
through the same kernel, model, optimizer and training tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kernels import cpu

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_built_without_avx512_pass_the_kernel_and_training_tests(tmp_path):
    lib = cpu.build(build_dir=tmp_path / "build", output_dir=tmp_path / "lib", native_arch=False)
    cache = (tmp_path / "build" / "CMakeCache.txt").read_text()
    assert "HARMODT_NATIVE_ARCH:BOOL=OFF" in cache
    env = dict(os.environ, HARMODT_KERNELS_LIB=str(lib))
    probe = subprocess.run([sys.executable, "-c", "from kernels import cpu; print(cpu.library_path(), cpu.unavailable_reason())"],
                           env=env, capture_output=True, text=True, cwd=ROOT)
    assert probe.stdout.split() == [str(lib), "None"], probe.stdout + probe.stderr  # the portable build is the one loaded
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_kernels_cpu.py",
                          "tests/test_optim.py", "tests/test_model.py", "tests/test_train.py", "-k", "not resume"],
                         env=env, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
