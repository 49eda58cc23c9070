"""The native ops built for other instruction sets than this machine's, each run against the
reference through the same kernel, model, optimizer and training tests:

* baseline x86-64 (no AVX2, no AVX-512): every op's portable fallback loops;
* ``-march=haswell`` (AVX2 and FMA, no AVX-512): the 8-lane paths that AMD Zen 2/3 machines run,
  which a machine with AVX-512 never runs otherwise (on a machine without AVX-512 the native
  build already is this one, and the whole suite runs it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import cpu

ROOT = Path(__file__).resolve().parents[1]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


FLAGS = _cpu_flags()


def _build_and_run_tests(tmp_path, **build_args) -> None:
    lib = cpu.build(build_dir=tmp_path / "build", output_dir=tmp_path / "lib", **build_args)
    cache = (tmp_path / "build" / "CMakeCache.txt").read_text()
    if build_args.get("native_arch") is False:
        assert "HARMODT_NATIVE_ARCH:BOOL=OFF" in cache
    if build_args.get("march"):
        assert f"HARMODT_MARCH:STRING={build_args['march']}" in cache
    env = dict(os.environ, HARMODT_KERNELS_LIB=str(lib))
    probe = subprocess.run([sys.executable, "-c", "from kernels import cpu; print(cpu.library_path(), cpu.unavailable_reason())"],
                           env=env, capture_output=True, text=True, cwd=ROOT)
    assert probe.stdout.split() == [str(lib), "None"], probe.stdout + probe.stderr  # that build is the one loaded
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_kernels_cpu.py",
                          "tests/test_optim.py", "tests/test_model.py", "tests/test_train.py", "-k", "not resume"],
                         env=env, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_kernels_built_without_avx512_pass_the_kernel_and_training_tests(tmp_path):
    _build_and_run_tests(tmp_path, native_arch=False)


@pytest.mark.skipif(not {"avx2", "fma"} <= FLAGS, reason="this CPU cannot run an AVX2+FMA build")
@pytest.mark.skipif("avx512f" not in FLAGS, reason="no AVX-512 here: the native build already is the AVX2 build the whole suite runs")
def test_kernels_built_for_avx2_without_avx512_pass_the_kernel_and_training_tests(tmp_path):
    _build_and_run_tests(tmp_path, native_arch=False, march="haswell")
