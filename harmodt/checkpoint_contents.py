"""What a training checkpoint must hold to be scored: checked before any of it is used.

Its config passes the checks every training run's settings pass (``config.validate``: the field
domains of harmodt/domains.py and the relations between settings); its weights and evaluation
info (state statistics, prompts) are finite; a masked method's checkpoint holds its masks; the
return scaling fits float32 (the policy's return-to-go is a float32 tensor).
"""

from __future__ import annotations

import math

import numpy as np
import torch

FLOAT32_MAX = float(np.finfo(np.float32).max)


class CheckpointContentError(ValueError):
    """A checkpoint whose contents do not hold what they claim; printed as one line."""


def _finite_float32(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))
            and abs(float(x)) <= FLOAT32_MAX)


def _finite_tensors(tree) -> bool:
    """Whether every floating-point tensor in the dicts and lists of ``tree`` is finite."""
    if isinstance(tree, torch.Tensor):
        return not tree.is_floating_point() or bool(torch.isfinite(tree).all())
    if isinstance(tree, dict):
        return all(_finite_tensors(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(_finite_tensors(v) for v in tree)
    return True


def check_return_scale(target_return: float, rtg_scale: float, where: str) -> None:
    """The initial return-to-go ``target_return / rtg_scale`` and its parts are finite float32 numbers."""
    for name, x in (("target_return", target_return), ("rtg_scale", rtg_scale)):
        if not _finite_float32(x):
            raise CheckpointContentError(f"{where}: {name} {x!r} is not a finite float32 number")
    if rtg_scale <= 0:
        raise CheckpointContentError(f"{where}: rtg_scale must be > 0, got {rtg_scale!r}")
    if not _finite_float32(target_return / rtg_scale):
        raise CheckpointContentError(f"{where}: target_return / rtg_scale ({target_return!r} / "
                                     f"{rtg_scale!r}) overflows float32")


def check_checkpoint(ck: dict, path, target_return: float | None = None) -> dict:
    """The config of checkpoint ``ck`` (read from ``path``) as a dict, once every check of the module
    docstring passed (:class:`CheckpointContentError`, one line naming ``path``, otherwise). ``target_return``:
    the one the evaluation uses instead of the checkpoint's, checked with it."""
    from .config import ConfigError, config_from_dict, upgrade_saved_config, validate
    from .methods import METHODS

    if not isinstance(ck.get("config"), dict):
        raise CheckpointContentError(f"{path}: its config is not a group of settings")
    try:
        cfg = validate(config_from_dict(ck["config"]))
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointContentError(f"{path}: its config is not one training accepts ({exc})") from None
    info = ck.get("eval_info")
    if not isinstance(info, dict):
        raise CheckpointContentError(f"{path}: its eval_info is not a group of entries")
    tasks = info.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise CheckpointContentError(f"{path}: eval_info.tasks must be a list of task names")
    for key in ("state_mean", "state_std"):
        stats = info.get(key)
        missing = [t for t in tasks if not isinstance(stats, dict) or not isinstance(stats.get(t), torch.Tensor)]
        if missing:
            raise CheckpointContentError(f"{path}: eval_info.{key} has no tensor for {missing[0]}")
        bad = [t for t in tasks if stats[t].shape != (cfg.model.state_dim,) or not bool(torch.isfinite(stats[t]).all())]
        if bad:
            raise CheckpointContentError(f"{path}: eval_info.{key} of {bad[0]} must be {cfg.model.state_dim} finite "
                                         f"numbers, got shape {list(stats[bad[0]].shape)}")
    if not _finite_tensors(info.get("prompts", {})):
        raise CheckpointContentError(f"{path}: eval_info.prompts hold NaN or inf")
    check_return_scale(info.get("target_return", 4500.0), info.get("rtg_scale", 1000.0), f"{path}: eval_info")
    if target_return is not None:
        check_return_scale(target_return, info["rtg_scale"], f"--target-return with {path}")
    if not isinstance(ck.get("model"), dict) or not _finite_tensors(ck["model"]):
        raise CheckpointContentError(f"{path}: its weights hold NaN or inf (or are missing)")
    if METHODS[cfg.method].masked and not ck.get("masks"):
        raise CheckpointContentError(f"{path}: --method {cfg.method} trains through per-task masks, "
                                     "but the checkpoint holds none")
    return upgrade_saved_config(ck["config"])
