"""Mask updaters: Algorithm 2 as a method runs it, built by the method's entry (harmodt.methods) on
the run's :class:`harmodt.training_state.TrainingState`. An updater has ``due(step)`` (asked by the
training loop before each step), ``__call__()`` (the update at the state's step; returns the metric line's entries)
``last_harmony`` (the last harmony score, which a checkpoint keeps) and ``movement()`` (how far
the masks moved from their ERK draw, and the schedule's bound on it: results.json's
``mask_movement``); a new schedule is a subclass that changes ``due`` or ``alpha``.

- :class:`HarmonyProbe` (methods whose masks do not learn: the dense ones and HarmoDT-R): every
  ``t_m`` steps, every task's gradients and their harmony score (Definition 3.2), logged; the
  masks stay as they are.
- :class:`Algorithm2` (HarmoDT-M/F): the same gradients, then each task masks the alpha_t
  active weights of lowest harmony H_i = A_i + lambda I_i and recovers the alpha_t masked weights
  of highest g_i * ghat (Eqs. 8-10, ``TaskMasks.update`` and the run's ``harmony_select`` op),
  alpha_t by the cosine schedule of Eq. 12.

The task gradients are gathered as ``--mask-grads``, ``--recovery-grad`` and
``--mask-grads-passes`` say (harmodt.mask_grads; ``auto``: batched on CUDA for ``paper``, else
per task): with torchrun, task i on rank i mod W, the zero-filled rows summed over
the ranks, and the ranks' masks and weights compared after every update.
"""

from __future__ import annotations

import torch

from .mask_grads import task_gradients
from .masks import alpha_schedule, alpha_total, harmony_score
from .training_state import TrainingState


class HarmonyProbe:
    """Every ``--update-every`` steps (never at step 0): the task gradients and their harmony score;
    the masks unchanged. ``last_harmony``: the last score (a checkpoint keeps it)."""

    def __init__(self, state: TrainingState):
        self.tr = state
        m = state.cfg.masks
        self.every = m.update_every
        self.last_harmony = None
        auto = "batched" if state.device.type == "cuda" and m.mask_grads == "paper" else "per-task"
        self.passes = auto if m.mask_grads_passes == "auto" else m.mask_grads_passes
        masks = state.task_masks  # binary (TaskMasks) or None; the ERK draw: what movement() compares with
        self.initial = None if masks is None else masks.snapshot()
        self.initial_active = None if masks is None else [round(masks.density(i) * masks.numel_per_task)
                                                          for i in range(masks.n_tasks)]

    def flips_bound(self) -> int:
        """The most weights a task's mask can switch off over the run: none, the masks do not learn."""
        return 0

    def movement(self) -> dict | None:
        """How far the masks moved (None without masks): per task, the fraction of its active
        weights that were not active in its ERK draw, and the most it can be: :meth:`flips_bound`
        weights switched on, and no more than the task's initially masked ones, over its initial
        active weights (at sparsity S the second alone caps it at S / (1 - S))."""
        tr = self.tr
        if tr.task_masks is None:
            return None
        changed = tr.task_masks.changed_fraction(self.initial)
        bound = self.flips_bound()
        return {"changed_fraction": dict(zip(tr.tasks, changed)), "changed_fraction_mean": sum(changed) / len(changed),
                "changed_fraction_min": min(changed), "changed_fraction_max": max(changed), "flips_bound": bound,
                "flips_bound_fraction": dict(zip(tr.tasks, [min(bound, tr.task_masks.numel_per_task - a) / max(a, 1)
                                                             for a in self.initial_active]))}

    def due(self, step: int) -> bool:
        """Whether the update runs before training step ``step``."""
        return step > 0 and step % self.every == 0

    def task_gradients(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[T, P]`` gradients of every task on one fresh batch each: gbar_i = grad L_i(theta*M_i) * M_i
        (Eq. 4) and g_i (Alg. 2: grad L_i(theta) by default; None without masks), in the state's
        ``weights`` order (harmodt.mask_grads). With several ranks, task i is computed on rank i
        mod W (on a batch of its data stream) and the zero-filled rows are summed over the ranks."""
        tr, m = self.tr, self.tr.cfg.masks
        batches = ((i, tr.batcher.sample([i], tr.cfg.batch_size)) for i in tr.dist.shard(range(len(tr.tasks))))
        masked, dense = task_gradients(tr.model, tr.weights, tr.task_masks, tr.backends.masked_linear, batches,
                                       len(tr.tasks), mask_grads=m.mask_grads, recovery_grad=m.recovery_grad,
                                       grad_clip=tr.cfg.grad_clip, passes=self.passes)
        tr.dist.all_reduce_sum_(masked)
        if dense is not None:
            tr.dist.all_reduce_sum_(dense)
        return masked, dense

    def update(self, masked: torch.Tensor, dense: torch.Tensor | None) -> dict:
        """Change the masks from the task gradients; returns what the metric line adds (nothing here)."""
        return {}

    def __call__(self) -> dict:
        """The update at the state's step: the task gradients, their harmony score, then
        :meth:`update`. Returns the metric line's entries."""
        tr = self.tr
        masked, dense = self.task_gradients()
        info = {"harmony_score": harmony_score(masked)}
        self.last_harmony = info["harmony_score"]
        info.update(self.update(masked, dense))
        tr.dist.check_identical({"masks": [] if tr.task_masks is None else [tr.task_masks.snapshot()],
                                 "weights": list(tr.model.state_dict().values())})
        return info


class Algorithm2(HarmonyProbe):
    """HarmoDT's mask update with importance ``importance`` ("fisher": gbar_i^2, HarmoDT-F;
    "magnitude": |theta|, HarmoDT-M) and ``--lam``, ``--lam-on``, ``--eta-min``/``--eta-max``."""

    def __init__(self, state: TrainingState, importance: str):
        super().__init__(state)
        self.importance = importance

    def flips_bound(self) -> int:
        """alpha_t of Eq. 12 summed over the run's mask updates (harmodt.masks.alpha_total)."""
        m = self.tr.cfg.masks
        return alpha_total(self.tr.cfg.steps, self.every, m.eta_min, m.eta_max)

    def alpha(self, step: int) -> int:
        """alpha_t of Eq. 12: the weights each task masks and recovers at ``step``."""
        m = self.tr.cfg.masks
        return alpha_schedule(step, self.tr.cfg.steps, m.eta_min, m.eta_max)

    def update(self, masked: torch.Tensor, dense: torch.Tensor) -> dict:
        tr, m = self.tr, self.tr.cfg.masks
        k = self.alpha(tr.step)
        params = torch.cat([w.detach().reshape(-1) for w in tr.weights.values()])
        changed = tr.task_masks.update(masked, dense, params, k, m.lam, self.importance, m.lam_on,
                                       select=tr.backends.harmony_select)
        return {"alpha": k, "masked_per_task": changed["masked"], "density": tr.task_masks.density(),
                "mask_changed_fraction": tr.task_masks.changed_fraction(self.initial)}
