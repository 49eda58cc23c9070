"""Mask kinds: what a masked method's masks are, behind one protocol that training, resuming,
evaluation, the agent and the graphed step use.

A method's table entry (harmodt.methods.Method) names its kind (``mask_kind=``); the built-in
ones are :class:`harmodt.masks.TaskMasks` (a binary ERK mask per task: HarmoDT-R/M/F) and
:class:`SharedMasks` (one ERK mask every task shares: HarmoDT-S). A new kind is a class with the
methods of :class:`MaskKind`; the masked layers and the optimizer see only the tensors it hands
them, through the ops it names (tests/test_mask_kinds.py has one with soft per-task float gates).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .masks import TaskMasks


@runtime_checkable
class MaskKind(Protocol):
    """The masks of every training task over every masked weight matrix (``weights``: the
    model's ``masked_weights()``, name -> ``[N, K]`` matrix). ``op`` below is a kernel op of the
    run (``harmodt_kernels.select_backends(...)``'s ``masked_linear`` or ``masked_adamw``)."""

    @property
    def n_tasks(self) -> int:
        """The tasks it holds masks of."""

    @classmethod
    def build(cls, weights: dict, n_tasks: int, masks_cfg, seed: int, device: torch.device) -> MaskKind:
        """A run's initial masks (``masks_cfg``: harmodt.config.MaskConfig; ``seed``: the run's)."""

    def state(self, names: list[str]) -> dict:
        """What a checkpoint keeps (tensors on the CPU and plain types), tasks in the order ``names``."""

    @classmethod
    def from_state(cls, d: dict, names: list[str] | None = None, device: torch.device | str = "cpu",
                   weights: dict | None = None) -> MaskKind:
        """The masks of :meth:`state`'s ``d`` for the tasks ``names`` in that order (None: all) on
        ``device``; ValueError naming the task or weight when they do not fit (``weights``)."""

    def to(self, device: torch.device | str) -> MaskKind:
        """A copy on ``device``."""

    def tensors(self) -> list[torch.Tensor]:
        """Its tensors themselves: what several ranks make alike in place at the start."""

    def for_op(self, op) -> dict[str, torch.Tensor]:
        """{weight name: every task's masks ``[T, ...]``}: what the masked layers read, in the
        layout :meth:`linear_op` takes (row t is task t's)."""

    def linear_op(self, op):
        """The masked-linear op the masked layers run on (harmodt.model.MaskContext), given the
        run's ``op``: called as ``op(x, weight, bias, masks[T...], task_ids, task_grads=,
        segments=, relu=, dropout_p=, seed=)``."""

    def keep(self, task_ids: list[int], op) -> dict[str, torch.Tensor] | None:
        """{weight name: what a step on ``task_ids`` may change} in the masked AdamW ``op``'s
        layout (bool or packed words), None: every weight."""

    def keep_on_device(self, masks: dict[str, torch.Tensor], task_ids: torch.Tensor,
                       out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """:meth:`keep` in a captured step (harmodt.graphed_step): ``task_ids`` an int64 device
        tensor, ``masks`` a copy of :meth:`for_op`'s, written into the fixed buffers ``out``
        (one task's ``[...]`` per weight); None: every weight."""

    def vote(self, threshold: int) -> dict[str, torch.Tensor]:
        """Eq. 13's mask of an unseen task, ``[N, K]`` per weight (non-zero: the weight acts)."""

    def rows(self, rows: list[int], vote: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """An evaluation's masks for the task rows ``rows`` (row ``n_tasks``: ``vote``), in the
        layout :meth:`linear_op` takes."""


class SharedMasks(TaskMasks):
    """One ERK mask, the same for every task (HarmoDT-S: sparsity without task identity), held
    and saved as a :class:`TaskMasks` whose rows are equal."""

    @classmethod
    def build(cls, weights: dict, n_tasks: int, masks_cfg, seed: int, device: torch.device) -> SharedMasks:
        one = TaskMasks.build(weights, 1, masks_cfg, seed, device)
        return cls({n: m.expand(n_tasks, *m.shape[1:]).contiguous() for n, m in one.masks.items()})
