"""The methods ``--method`` names, one :class:`Method` entry each: what the method is (masked or
dense, masks learned or fixed, the importance term of its mask update, how it combines task
gradients, how it is conditioned on the task, hyper-parameters of its own), what it builds on a
trainer (its model, its masks, its step rule and its mask updater) and how reports and figures
show it.

The trainer, the config checks and the study read the entry; nothing else compares method names.
A new method is one :func:`register` call with its own functions: a gradient-combination rule
with a hyper-parameter, say, ``register(Method("scaled-mean", "Scaled mean", "tab:olive",
combine=lambda grads, options, generator: options.scale * grads.mean(0), options=ScaleOptions))``
where ``ScaleOptions`` is a dataclass whose field ``scale`` becomes the flag ``--scale``; or its
own step rule or mask schedule (``step_rule=``, ``mask_updater=``: a class built on the training
state, harmodt.training_state.TrainingState, such as a subclass of harmodt.steps.MaskedStep or
harmodt.mask_update.Algorithm2); or its own kind of masks (``mask_kind=``: a class with the
methods of harmodt.mask_kinds.MaskKind, which training, resuming and evaluation use). A step rule's
``step()`` is what ``--cuda-graph`` captures (harmodt.graphed_step); one it cannot capture trains
eager, or is refused under ``--cuda-graph on``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .baselines.cagrad import CAGradOptions, cagrad_direction
from .baselines.pcgrad import pcgrad_direction
from .domains import check_fields
from .mask_kinds import MaskKind, SharedMasks
from .mask_update import Algorithm2, HarmonyProbe
from .masks import IMPORTANCE, TaskMasks
from .model import CONDITIONINGS, PROMPTED, PromptDT
from .steps import MaskedStep, PlainStep, SurgeryStep
from .training_state import TrainingState

MASKS = ("none", "fixed", "shared", "learned")
IMPORTANCES = tuple(IMPORTANCE)  # the importance terms of Eq. 8 (harmodt.masks)
# An earlier name of a --conditioning value, still read from configs and checkpoints.
CONDITIONING_ALIASES = {"task-id": "task-embedding"}


@dataclass(frozen=True)
class Method:
    """One trainable method.

    ``masks``: "none" (one dense model), "fixed" (each task trains through its ERK-drawn mask,
    never changed), "shared" (one ERK-drawn mask, the same for every task, never changed:
    sparsity without task identity) or "learned" (Algorithm 2 updates the masks every ``t_m`` steps, ranking weights
    by agreement and ``importance``: "fisher" or "magnitude", Eq. 8). ``combine``: None, the step
    takes the gradient of the batch's loss (Algorithm 1); else the step takes each task's gradient
    on its own rows and combines the ``[T, P]`` rows into one ``[P]`` direction with
    ``combine(grads, options, generator)`` (gradient surgery; ``options``: the method's options,
    ``generator``: the data stream's). ``options``: None, or a dataclass of the method's own
    hyper-parameters: each field is a training flag (``cagrad_c`` is ``--cagrad-c``; its
    ``metadata["help"]`` the help text) and the run's values are ``config.method_options``;
    ``__post_init__`` may raise ValueError naming the flag. ``conditioning``: what
    ``--conditioning auto`` is, "prompt" (a trajectory prompt, Prompt-DT) or "task-state" (the
    one-hot task ID beside the state, the paper's MTDT). ``step_rule`` and ``mask_updater``: None,
    the ones of its kind (:meth:`build_step_rule`, :meth:`build_mask_updater`); else a callable of
    the training state that builds its own (HarmonyProbe, the default of masks that do not learn,
    reads binary masks: a kind of other masks brings its updater). ``mask_kind``: the class of its
    masks (harmodt.mask_kinds.MaskKind); None: the kind of ``masks``, :class:`TaskMasks` or for
    "shared" :class:`SharedMasks`. ``label`` and ``color`` (a matplotlib colour): how reports and
    figures show it.
    """
    name: str
    label: str
    color: str
    masks: str = "none"
    importance: str | None = None
    combine: Callable | None = None
    conditioning: str = "prompt"
    options: type | None = None
    step_rule: Callable | None = None
    mask_updater: Callable | None = None
    mask_kind: type | None = None

    def __post_init__(self):
        if self.masks not in MASKS:
            raise ValueError(f"method {self.name!r}: masks must be one of {', '.join(MASKS)}, got {self.masks!r}")
        if (self.importance is not None) != (self.masks == "learned") or self.importance not in (None, *IMPORTANCES):
            raise ValueError(f"method {self.name!r}: learned masks need an importance ({', '.join(IMPORTANCES)}), "
                             "other masks none")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"method {self.name!r}: conditioning must be one of {', '.join(CONDITIONINGS)}")
        if self.combine is not None and self.masks != "none":
            raise ValueError(f"method {self.name!r}: a gradient-combination rule runs on the dense model (masks none)")
        if self.options is not None and not dataclasses.is_dataclass(self.options):
            raise ValueError(f"method {self.name!r}: options must be a dataclass of its hyper-parameters")
        if self.mask_kind is not None and not self.masked:
            raise ValueError(f"method {self.name!r}: a mask kind needs masks (fixed, shared or learned), not none")
        if self.mask_kind is None and self.masked:
            object.__setattr__(self, "mask_kind", SharedMasks if self.masks == "shared" else TaskMasks)

    @property
    def masked(self) -> bool:
        """Each task trains through its own mask."""
        return self.masks != "none"

    @property
    def learns_masks(self) -> bool:
        return self.masks == "learned"

    @property
    def per_task_gradients(self) -> bool:
        """A step computes every task's gradient on its own rows and combines them (:attr:`combine`)."""
        return self.combine is not None

    def resolve_conditioning(self, conditioning: str = "auto") -> str:
        """The concrete conditioning of ``--conditioning``: "auto" is the method's own; an earlier
        name of a value (``task-id``) is today's."""
        if conditioning == "auto":
            return self.conditioning
        return CONDITIONING_ALIASES.get(conditioning, conditioning)

    def draws_prompts(self, conditioning: str = "auto") -> bool:
        """Whether its data stream draws prompts (a prompted method does, whatever ``--conditioning`` says)."""
        return self.conditioning in PROMPTED or self.resolve_conditioning(conditioning) in PROMPTED

    def check_options(self, given: dict) -> dict:
        """The method's options with ``given`` ({field: value}) over their defaults, as a plain
        dict; ValueError naming the flag of a value it does not take."""
        fields = {f.name for f in dataclasses.fields(self.options)} if self.options is not None else set()
        stray = [k for k in given if k not in fields]
        if stray:
            flags = ", ".join("--" + k.replace("_", "-") for k in stray)
            raise ValueError(f"{flags} does not apply to --method {self.name}")
        if self.options is None:
            return {}
        options = self.options(**given)
        # each field's declared domain
        if (bad := check_fields(options, lambda key: "--" + key.replace("_", "-"))) is not None:
            raise ValueError(bad)
        return dataclasses.asdict(options)

    def build_model(self, cfg, n_tasks: int, conditioning: str = "auto") -> PromptDT:
        """Its model (``cfg``: a harmodt.config.ModelConfig) with ``conditioning``."""
        return PromptDT(cfg, n_tasks, self.resolve_conditioning(conditioning))

    def build_masks(self, weights: dict, n_tasks: int, masks_cfg, seed: int, device: torch.device) -> MaskKind | None:
        """Its initial masks of kind :attr:`mask_kind` for the model's masked ``weights`` (name ->
        matrix; ``masks_cfg``: a harmodt.config.MaskConfig), None for a dense method."""
        return None if self.mask_kind is None else self.mask_kind.build(weights, n_tasks, masks_cfg, seed, device)

    def build_step_rule(self, state: TrainingState):
        """Its training step on ``state`` (harmodt.steps): its own ``step_rule``, else gradient
        surgery with ``combine`` and its options, the masked step, or the plain step."""
        if self.step_rule is not None:
            return self.step_rule(state)
        if self.combine is not None:
            return SurgeryStep(state, self.combine, self.read_options(state.cfg))
        return MaskedStep(state) if self.masked else PlainStep(state)

    def build_mask_updater(self, state: TrainingState):
        """Its Algorithm 2 on ``state`` (harmodt.mask_update): its own ``mask_updater``, else for
        learned masks the update with its importance, for the others the harmony-score probe."""
        if self.mask_updater is not None:
            return self.mask_updater(state)
        return Algorithm2(state, self.importance) if self.learns_masks else HarmonyProbe(state)

    def read_options(self, cfg):
        """The options of a run's config ``cfg`` (an instance of :attr:`options`, None without)."""
        return None if self.options is None else self.options(**cfg.method_options)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the table (its name becomes a ``--method`` value)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


register(Method("mtdt", "MTDT", "tab:gray", conditioning="task-state"))
register(Method("prompt-dt", "Prompt-DT", "tab:blue"))
register(Method("harmodt-r", "HarmoDT-R", "tab:orange", masks="fixed"))
register(Method("harmodt-s", "HarmoDT-S", "tab:brown", masks="shared"))
register(Method("harmodt-m", "HarmoDT-M", "tab:purple", masks="learned", importance="magnitude"))
register(Method("harmodt-f", "HarmoDT-F", "tab:red", masks="learned", importance="fisher"))
register(Method("pcgrad", "PCGrad", "tab:green", combine=pcgrad_direction))
register(Method("cagrad", "CAGrad", "tab:cyan", combine=cagrad_direction, options=CAGradOptions))

# The dense prompted baseline the study's tables compare other arms with.
REFERENCE = "prompt-dt"


def build_model(cfg, n_tasks: int, method: str, conditioning: str = "auto") -> PromptDT:
    """The model of ``method`` with ``conditioning`` (:meth:`Method.build_model`)."""
    return METHODS[method].build_model(cfg, n_tasks, conditioning)
