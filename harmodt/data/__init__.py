"""Offline data: generation from Meta-World v3 scripted experts, loading (ours, the original
layout and Minari datasets), export to Minari, and Prompt-DT batches."""

from .formats import DataError, TaskData, Trajectory, detect_layout, load_dataset

# Imported here, not on first use: importing the submodule later would rebind the package's
# ``generate`` attribute to the module. Meta-World itself loads only when an env is built.
from .generate import generate

__all__ = ["DataError", "TaskData", "Trajectory", "detect_layout", "generate", "load_dataset"]
