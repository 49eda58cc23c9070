"""How far the study's masks may move: the bound Eq. 12 puts on a run's mask changes, and the
mask schedule of the arms whose masks learn, for summary.md."""

from __future__ import annotations

import json

from ..masks import alpha_total
from ..methods import METHODS


def mask_flips_bound_fraction(cfg: dict) -> float | None:
    """How far a run's schedule lets a task's mask move (None for a dense method, 0 for masks that do
    not learn): alpha_t of Eq. 12 summed over its mask updates (harmodt.masks.alpha_total), and no
    more than the task's initially masked weights, over its active ones (:func:`masked_and_active`
    of config.json ``cfg``); at sparsity S the cap alone is about S / (1 - S)."""
    method = METHODS.get(cfg.get("method"))
    if method is None or not method.masked:
        return None
    if not method.learns_masks:
        return 0.0
    m = cfg["masks"]
    flips = alpha_total(cfg["steps"], m["update_every"], m["eta_min"], m["eta_max"])
    weights, active = masked_and_active(cfg["model"], m["sparsity"])
    return min(flips, weights - active) / active


def masked_and_active(model_cfg: dict, sparsity: float) -> tuple[int, int]:
    """The masked weights of the model of a run's config (config.json's ``model``) and those one
    task's ERK mask keeps active (the exact draw), the model built on the meta device: nothing is
    allocated."""
    import torch

    from ..config import ModelConfig
    from ..masks import erk_densities
    from ..model import PromptDT

    with torch.device("meta"):
        model = PromptDT(ModelConfig(**model_cfg), 1)
    shapes = {n: tuple(w.shape) for n, w in model.masked_weights().items()}
    dens = erk_densities(shapes, 1.0 - sparsity)
    return sum(a * b for a, b in shapes.values()), sum(int(round(dens[n] * a * b)) for n, (a, b) in shapes.items())


def mask_schedules(runs: list[dict], n_tasks: int) -> str:
    """The mask schedule of the arms whose masks learn (t_m, eta_min, eta_max of their configs) and the
    most weights Eq. 12 lets each task switch over the run (harmodt.masks.alpha_total), also as a
    fraction of a task's active weights; "no arm's masks move" when none learns."""
    schedules: dict[tuple, list[str]] = {}
    for r in runs:
        method = METHODS.get(r["method"])
        if not r.get("config") or method is None or not method.learns_masks:
            continue
        cfg, mk = r["config"], r["config"]["masks"]
        key = (cfg["steps"], mk["update_every"], mk["eta_min"], mk["eta_max"], mk["sparsity"],
               json.dumps(cfg["model"], sort_keys=True))
        if r["variant"] not in schedules.setdefault(key, []):
            schedules[key].append(r["variant"])
    if not schedules:
        return "no arm's masks move (none learns them)"
    parts = []
    for (steps, every, eta_min, eta_max, sparsity, model), variants in schedules.items():
        bound = alpha_total(steps, every, eta_min, eta_max)
        active = masked_and_active(json.loads(model), sparsity)[1]
        parts.append(f"{', '.join(variants)}: t_m {every}, eta_min {eta_min}, eta_max {eta_max}; Eq. 12 lets a task "
                     f"switch at most {bound} weights off (and as many on) over the run, {100 * bound / active:.2f} % "
                     f"of its {active} active weights")
    return "; ".join(parts)
