"""``masked_adamw_``: its argument checks and its op on one backend (:class:`MaskedAdamWOp`: the
checks, then the backend's ``"masked_adamw"`` ``(params, grads, exp_avgs, exp_avg_sqs, masks,
steps, lr, beta1, beta2, eps, weight_decay, grad_scale, workspace)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import reference
from ..backends import Backend
from ..checks import KernelArgumentError, dtype_name, same_device, shape, shape_list, tensor
from ..reference import num_words


def learning_rate(op: str, lr, device) -> None:
    """A learning rate: a float, or a float64 0-dim tensor on the parameters' device."""
    if isinstance(lr, torch.Tensor):
        if lr.dtype != torch.float64 or lr.dim() != 0 or (device is not None and lr.device != device):
            raise KernelArgumentError(f"{op}: a learning-rate tensor must be float64 0-dim on {device}, got "
                                      f"{dtype_name(lr.dtype)} {shape_list(lr)} on {lr.device}")
    elif not isinstance(lr, (int, float)):
        raise KernelArgumentError(f"{op}: lr must be a float or a float64 0-dim tensor, got {type(lr).__name__}")


def check(params, grads, exp_avgs, exp_avg_sqs, masks, steps, grad_scale, *, dtypes: tuple, devices: tuple | None,
          max_numel: int | None) -> None:
    """The arguments of ``masked_adamw_`` (see :func:`harmodt_kernels.masked_adamw_`)."""
    op = "masked_adamw_"
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "masks": masks,
             "steps": steps}
    if len({len(v) for v in lists.values()}) != 1:
        raise KernelArgumentError(f"{op}: params, grads, exp_avgs, exp_avg_sqs, masks and "
                                  "steps must have one length, got "
                                  + ", ".join(f"{k}: {len(v)}" for k, v in lists.items()))
    for i, p in enumerate(params):
        tensor(op, f"params[{i}]", p, dtypes, devices)
        tensor(op, f"grads[{i}]", grads[i], dtypes, devices)
        for name in ("exp_avgs", "exp_avg_sqs"):
            tensor(op, f"{name}[{i}]", lists[name][i], (p.dtype,), devices)
        for name in ("grads", "exp_avgs", "exp_avg_sqs"):
            shape(op, f"{name}[{i}]", lists[name][i], p.shape, " (params[i]'s shape)")
        for name in ("params", "exp_avgs", "exp_avg_sqs"):
            if not lists[name][i].is_contiguous():
                raise KernelArgumentError(f"{op}: {name}[{i}] must be contiguous (it is written in place)")
        tensor(op, f"steps[{i}]", steps[i], (torch.float32,), devices)
        shape(op, f"steps[{i}]", steps[i], (), " (a 0-dim step count)")
        if max_numel is not None and p.numel() > max_numel:
            raise KernelArgumentError(f"{op}: params[{i}] has {p.numel()} elements, more than "
                                      f"this backend's {max_numel}")
        m = masks[i]
        if m is not None:
            if p.dim() == 0:
                raise KernelArgumentError(f"{op}: masks[{i}]: a masked parameter must be at "
                                          f"least 1-D, params[{i}] is 0-D")
            tensor(op, f"masks[{i}]", m, (torch.int32, torch.bool), devices)
            if m.dtype == torch.bool:
                shape(op, f"masks[{i}]", m, p.shape, " (a bool mask of params[i]'s shape)")
            else:
                shape(op, f"masks[{i}]", m, (*p.shape[:-1], num_words(p.shape[-1])),
                      " (packed words of params[i]'s last dimension)")
                if not m.is_contiguous():
                    raise KernelArgumentError(f"{op}: masks[{i}] must be contiguous")
        same_device(op, {"params[i]": p, "grads[i]": grads[i], "exp_avgs[i]": exp_avgs[i],
                         "exp_avg_sqs[i]": exp_avg_sqs[i],
                         "masks[i]": m, "steps[i]": steps[i]})
    if not torch.compiler.is_compiling():  # (storage addresses: an eager-only check)
        seen: dict = {}
        for i, s in enumerate(steps):
            j = seen.setdefault(s.data_ptr(), i)
            if j != i:
                raise KernelArgumentError(f"{op}: steps[{i}] shares its storage with steps[{j}] (each "
                                          "parameter needs its own count)")
    if isinstance(grad_scale, torch.Tensor):
        if grad_scale.numel() != 1 or not grad_scale.is_floating_point():
            raise KernelArgumentError(f"{op}: grad_scale must be a float or a one-element float tensor, got "
                                      f"{dtype_name(grad_scale.dtype)} {shape_list(grad_scale)}")
        if params and grad_scale.device != params[0].device:
            raise KernelArgumentError(f"{op}: grad_scale must be on the params' device "
                                      f"{params[0].device}, got {grad_scale.device}")
    elif not isinstance(grad_scale, (int, float)):
        raise KernelArgumentError(f"{op}: grad_scale must be a float or a one-element float tensor, got "
                                  f"{type(grad_scale).__name__}")


def on_reference(params, grads, exp_avgs, exp_avg_sqs, masks, steps, lr, beta1, beta2, eps, weight_decay, grad_scale,
                 workspace):
    """The reference's AdamW in the backends' calling convention (it keeps nothing in ``workspace``)."""
    reference.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, masks, steps, lr=lr, beta1=beta1, beta2=beta2,
                            eps=eps, weight_decay=weight_decay, grad_scale=grad_scale)


@dataclass(frozen=True)
class MaskedAdamWOp:
    """One masked AdamW step in place on one backend; see :func:`masked_adamw_`. ``workspace``: a
    dict the caller keeps between steps (an optimizer's), where a backend may keep launch data
    (the Triton one keeps its parameter tables there); None keeps nothing."""

    backend: Backend
    checked: set = field(default_factory=set, compare=False, repr=False)  # configurations whose checks passed

    @property
    def takes_bool_masks(self) -> bool:
        return self.backend.bool_masks

    def __call__(self, params, grads, exp_avgs, exp_avg_sqs, masks, steps, *, lr, beta1, beta2, eps, weight_decay,
                 grad_scale=1.0, workspace: dict | None = None) -> None:
        if not params:
            return
        b = self.backend
        check(params, grads, exp_avgs, exp_avg_sqs, masks, steps, grad_scale, dtypes=b.adamw_dtypes, devices=b.devices,
              max_numel=b.max_numel)
        learning_rate("masked_adamw_", lr, getattr(params[0], "device", None))
        if not b.bool_masks:
            masks = [m if m is None or m.dtype == torch.int32 else reference.pack_masks(m) for m in masks]
        b.impls["masked_adamw"](list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(masks), list(steps),
                                lr if isinstance(lr, torch.Tensor) else float(lr), float(beta1),
                                float(beta2), float(eps), float(weight_decay), grad_scale, workspace)
