"""Install harmodt and kernels; the native CPU ops (kernels/csrc) are built by CMake."""

from setuptools import find_packages, setup

setup(
    name="harmodt",
    version="0.1.0",
    description="HarmoDT: Harmony Multi-Task Decision Transformer (ICML 2024), fast and faithful",
    packages=find_packages(include=["harmodt", "harmodt.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "metaworld>=3.1,<3.2",
        "gymnasium>=1.0,<2",
        "mujoco>=3.0",
        "tqdm>=4.60",
        "tensorboard>=2.10",
    ],
    extras_require={"triton": ["triton>=3.2"], "test": ["pytest>=8", "pytest-benchmark>=4"]},
)
