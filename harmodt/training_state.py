"""What a step rule (harmodt.steps), a mask updater (harmodt.mask_update) and the graphed step
(harmodt.graphed_step) read and change of a training run: one typed record.

:class:`harmodt.train.Trainer` is a :class:`TrainingState` that also saves, loads and evaluates;
the step rules and updaters a method builds get it as this type and read these fields alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # (types only: this module sits below everything it names)
    import harmodt_kernels

    from .data.batches import PromptDTBatcher
    from .mask_kinds import MaskKind
    from .model import PromptDT
    from .optim import MaskedAdamW


@dataclass(eq=False, repr=False)  # identity, as a trainer; no repr of every tensor
class TrainingState:
    """One training run's parts on one device.

    ``cfg``: the run's config; ``tasks``: the training tasks' names (a task id is an index here);
    ``dist``: this process's rank, which makes every collective (harmodt.run.distributed);
    ``backends``: the kernel op of each op name (``harmodt_kernels.select_backends``); ``batcher``: the
    data stream; ``forward``: what training forwards call (the model, or its ``torch.compile``);
    ``params``: the model's parameters in order; ``weights``: {name: masked weight matrix};
    ``task_masks``: the method's masks (a :class:`harmodt.mask_kinds.MaskKind`) or None (dense);
    ``opt``, ``sched``: the masked AdamW and its learning-rate schedule; ``stop``: set by
    SIGINT/SIGTERM; ``step``: steps taken; ``step_rule``: the method's step rule on this state.
    """

    cfg: Any  # harmodt.config.TrainConfig (config names the methods, which build on this state)
    tasks: list[str]
    device: torch.device
    dist: Any  # harmodt.run.distributed.Single or a rank of torchrun
    backends: harmodt_kernels.KernelOps
    batcher: PromptDTBatcher
    model: PromptDT
    forward: Callable
    params: list[torch.nn.Parameter]
    weights: dict[str, torch.nn.Parameter]
    task_masks: MaskKind | None
    opt: MaskedAdamW
    sched: torch.optim.lr_scheduler.LambdaLR
    stop: Any  # harmodt.run.signals.StopRequest (what dist reads at a step; the run harness sits above)
    step: int = 0
    step_rule: Callable | None = None

    def autocast(self):
        """The autocast of a training forward (bf16 under ``--precision bf16``)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")
