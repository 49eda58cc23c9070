"""Offline data: generation from Meta-World v3 scripted experts, loading (ours, the original
layout and Minari datasets), export to Minari, and Prompt-DT batches."""

from .formats import DataError, TaskData, Trajectory
from .generator import generate
from .load import detect_layout, load_dataset

__all__ = ["DataError", "TaskData", "Trajectory", "detect_layout", "generate", "load_dataset"]
