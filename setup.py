"""Install harmodt and its kernel package; the native CPU ops (kernels/csrc) are built by CMake.

    pip install --no-build-isolation -e .      # or: pip install --no-build-isolation .

``--no-build-isolation``: the build compiles against the torch already installed (the pinned CPU
wheel); an isolated build environment would download another torch (a multi-GB CUDA build).
CMake comes from PATH or the ``cmake`` PyPI package; the build needs a C++17 compiler and the
torch headers, nothing else (no OpenMP). The library lands in
``kernels/harmodt_kernels/_lib/libharmodt_kernels.so``; set ``HARMODT_SKIP_NATIVE=1`` to install
without it (macOS, ARM Linux, no compiler: the ops then run on the PyTorch reference under
backend="auto").

Two packages: ``harmodt/`` and ``kernels/harmodt_kernels/`` (its C++ sources in ``kernels/csrc/``).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
LIB_NAME = "libharmodt_kernels.so"


class CMakeExtension(Extension):
    """A shared library built by the top-level CMakeLists.txt (no sources for setuptools)."""

    def __init__(self, name):
        super().__init__(name, sources=[])


def _find_cmake():
    cmake = shutil.which("cmake")
    if cmake:
        return cmake
    try:
        import cmake as cmake_pkg  # the `cmake` PyPI package
    except ImportError:
        sys.exit("building the native kernels needs cmake >= 3.18: install it (`pip install cmake`) "
                 "or set HARMODT_SKIP_NATIVE=1")
    return str(Path(cmake_pkg.CMAKE_BIN_DIR) / "cmake")


class CMakeBuild(build_ext):
    def get_ext_filename(self, ext_name):
        # A plain library name (loaded with torch.ops.load_library), not a CPython extension.
        return os.path.join(*ext_name.split(".")[:-1], LIB_NAME)

    def build_extension(self, ext):
        try:
            import torch
        except ImportError:
            sys.exit("building the native kernels needs torch importable at build time: install the "
                     "pinned torch first and use `pip install --no-build-isolation ...`")
        dest = Path(self.get_ext_fullpath(ext.name)).resolve()
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Editable installs copy the library from a temporary build dir into the source tree.
        package = ext.name.rpartition(".")[0]
        (ROOT / self.get_finalized_command("build_py").get_package_dir(package)).mkdir(parents=True, exist_ok=True)
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}"
        cmake = _find_cmake()
        subprocess.run(
            [cmake, "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
             f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DHARMODT_OUTPUT_DIR={dest.parent}"],
            check=True,
        )
        subprocess.run([cmake, "--build", str(build_dir), "-j", str(os.cpu_count() or 1)], check=True)
        if not dest.is_file():
            sys.exit(f"CMake finished but {dest} is missing")


ext_modules = [] if os.environ.get("HARMODT_SKIP_NATIVE") == "1" else [CMakeExtension("harmodt_kernels._lib.harmodt_kernels")]

setup(
    name="harmodt",
    version="0.1.0",
    description="HarmoDT: Harmony Multi-Task Decision Transformer (ICML 2024), fast and faithful",
    packages=[*find_packages(include=["harmodt", "harmodt.*"]), *find_packages("kernels")],
    package_dir={"harmodt_kernels": "kernels/harmodt_kernels"},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "metaworld>=3.1,<3.2",
        "gymnasium>=1.0,<2",
        "mujoco>=3.0",
        "tqdm>=4.60",
        "tensorboard>=2.10",
        "matplotlib>=3.5",
        "scipy>=1.10",  # the study's statistics (harmodt/study/stats.py)
    ],
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
    extras_require={"triton": ["triton>=3.2"], "test": ["pytest>=8", "pytest-benchmark>=4"],
                    "minari": ["minari>=0.5.4,<0.6", "h5py>=3.8"], "slurm": ["submitit>=1.5.4,<1.6"]},
)
