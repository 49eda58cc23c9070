"""The methods ``--method`` names, one :class:`Method` entry each: what the method is (masked or
dense, masks learned or fixed, the importance term of its mask update, how it combines task
gradients, how it is conditioned on the task) and how reports and figures show it.

The trainer, the model, the config checks and the study read the entry; nothing else compares
method names. A new method is one :func:`register` call with its own functions (a gradient
combination rule, say), e.g. ``register(Method("mean-grad", "Mean-grad", "tab:olive",
combine=lambda grads, c, generator: grads.mean(0)))``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .baselines.cagrad import cagrad_direction
from .baselines.pcgrad import pcgrad_direction
from .masks import IMPORTANCE

MASKS = ("none", "fixed", "learned")
IMPORTANCES = tuple(IMPORTANCE)  # the importance terms of Eq. 8 (harmodt.masks)
CONDITIONINGS = ("auto", "prompt", "task-state", "task-embedding")
# An earlier name of a --conditioning value, still read from configs and checkpoints.
CONDITIONING_ALIASES = {"task-id": "task-embedding"}


@dataclass(frozen=True)
class Method:
    """One trainable method.

    ``masks``: "none" (one dense model), "fixed" (each task trains through its ERK-drawn mask,
    never changed) or "learned" (Algorithm 2 updates the masks every ``t_m`` steps, ranking weights
    by agreement and ``importance``: "fisher" or "magnitude", Eq. 8). ``combine``: None, the step
    takes the gradient of the batch's loss (Algorithm 1); else the step takes each task's gradient
    on its own rows and combines the ``[T, P]`` rows into one ``[P]`` direction with
    ``combine(grads, c, generator)`` (gradient surgery; ``c``: ``--cagrad-c``, ``generator``: the
    data stream's). ``conditioning``: what ``--conditioning auto`` is, "prompt" (a trajectory
    prompt, Prompt-DT) or "task-state" (the one-hot task ID beside the state, the paper's MTDT).
    ``label`` and ``color`` (a matplotlib colour): how reports and figures show it.
    """
    name: str
    label: str
    color: str
    masks: str = "none"
    importance: str | None = None
    combine: Callable | None = None
    conditioning: str = "prompt"

    def __post_init__(self):
        if self.masks not in MASKS:
            raise ValueError(f"method {self.name!r}: masks must be one of {', '.join(MASKS)}, got {self.masks!r}")
        if (self.importance is not None) != (self.masks == "learned") or self.importance not in (None, *IMPORTANCES):
            raise ValueError(f"method {self.name!r}: learned masks need an importance ({', '.join(IMPORTANCES)}), other masks none")
        if self.conditioning not in ("prompt", "task-state", "task-embedding"):
            raise ValueError(f"method {self.name!r}: conditioning must be prompt, task-state or task-embedding")
        if self.combine is not None and self.masks != "none":
            raise ValueError(f"method {self.name!r}: a gradient-combination rule runs on the dense model (masks none)")

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
register(Method("harmodt-m", "HarmoDT-M", "tab:purple", masks="learned", importance="magnitude"))
register(Method("harmodt-f", "HarmoDT-F", "tab:red", masks="learned", importance="fisher"))
register(Method("pcgrad", "PCGrad", "tab:green", combine=pcgrad_direction))
register(Method("cagrad", "CAGrad", "tab:cyan", combine=cagrad_direction))

# The dense prompted baseline the study's tables compare other arms with.
REFERENCE = "prompt-dt"


def resolve_conditioning(method: str, conditioning: str = "auto") -> str:
    """The concrete conditioning of ``method`` under ``--conditioning`` (:meth:`Method.resolve_conditioning`)."""
    return METHODS[method].resolve_conditioning(conditioning)
