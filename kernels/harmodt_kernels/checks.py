"""Argument checks of the public ops, shared by every backend: shapes, dtypes, devices and layouts,
each failure a :class:`KernelArgumentError` naming the argument, what it must be and what it is.

Nothing here reads a tensor's values (task ids in range are checked by each backend where it
can do so without a host synchronisation), so ``torch.compile`` traces the checks away.
"""

from __future__ import annotations

import torch

from .reference import num_words

FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class KernelArgumentError(ValueError):
    """A bad argument to a kernel op (shape, dtype, device, layout or value), named in the message."""


def _dtype(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _shape(t: torch.Tensor) -> list:
    return list(t.shape)


def tensor(op: str, name: str, t, dtypes: tuple, devices: tuple | None) -> None:
    """``t`` is a tensor of one of ``dtypes`` on a device of type in ``devices`` (None: any)."""
    if not isinstance(t, torch.Tensor):
        raise KernelArgumentError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise KernelArgumentError(f"{op}: {name} must be {' or '.join(_dtype(d) for d in dtypes)}, got {_dtype(t.dtype)}")
    if devices is not None and t.device.type not in devices:
        raise KernelArgumentError(f"{op}: {name} must be a {' or '.join(d.upper() for d in devices)} tensor for this backend, "
                                  f"got one on {t.device}")


def shape(op: str, name: str, t: torch.Tensor, want: tuple, what: str = "") -> None:
    if tuple(t.shape) != tuple(want):
        raise KernelArgumentError(f"{op}: {name} must be {list(want)}{what}, got {_shape(t)}")


def same_device(op: str, named: dict) -> None:
    devs = {t.device for t in named.values() if t is not None}
    if len(devs) > 1:
        raise KernelArgumentError(f"{op}: all tensors must be on one device, got "
                                  + ", ".join(f"{n} on {t.device}" for n, t in named.items() if t is not None))


def masked_linear(x, weight, bias, masks, task_ids, task_grads, segments, *, dtypes: tuple, devices: tuple | None,
                  bool_masks: bool) -> None:
    """The arguments of ``masked_linear`` (see :func:`harmodt_kernels.masked_linear`)."""
    op = "masked_linear"
    tensor(op, "x", x, dtypes, devices)
    if x.dim() != 2:
        raise KernelArgumentError(f"{op}: x must be [R, K], got {_shape(x)}")
    r, k = x.shape
    tensor(op, "weight", weight, (x.dtype,), devices)
    if weight.dim() != 2 or weight.shape[1] != k:
        raise KernelArgumentError(f"{op}: weight must be [N, {k}] to match x {_shape(x)}, got {_shape(weight)}")
    n = weight.shape[0]
    if bias is not None:
        tensor(op, "bias", bias, (x.dtype,), devices)
        shape(op, "bias", bias, (n,))
    tensor(op, "masks", masks, (torch.int32, torch.bool) if bool_masks else (torch.int32,), devices)
    cols = k if masks.dtype == torch.bool else num_words(k)
    if masks.dim() != 3 or tuple(masks.shape[1:]) != (n, cols) or masks.shape[0] == 0:
        kind = f"bool [T, {n}, {k}] or packed" if bool_masks else "packed"
        raise KernelArgumentError(f"{op}: masks must be {kind} [T, {n}, {num_words(k)}] (T >= 1) for weight {_shape(weight)}, "
                                  f"got {_dtype(masks.dtype)} {_shape(masks)}")
    tensor(op, "task_ids", task_ids, (torch.int64,), devices)
    if tuple(task_ids.shape) not in ((r,), (1,)):
        raise KernelArgumentError(f"{op}: task_ids must be [{r}] (one task per row of x) or [1] (one task for all rows), "
                                  f"got {_shape(task_ids)}")
    if task_grads is not None:
        tensor(op, "task_grads", task_grads, (torch.float32,), devices)
        shape(op, "task_grads", task_grads, (masks.shape[0], n, k), " (tasks, weight rows, weight columns)")
        if not task_grads.is_contiguous():
            raise KernelArgumentError(f"{op}: task_grads must be contiguous (it is accumulated in place)")
    same_device(op, {"x": x, "weight": weight, "bias": bias, "masks": masks, "task_ids": task_ids, "task_grads": task_grads})
    if segments is not None and sum(c for _, c in segments) != r:
        raise KernelArgumentError(f"{op}: segments {tuple(segments)} cover {sum(c for _, c in segments)} rows, x has {r}")


def dropout(op: str, p, seed) -> None:
    """A counter-based dropout's rate and seed (see :func:`harmodt_kernels.dropout`): an int in
    ``[0, 2^63)``, or an int64 0-dim tensor holding one (its value is not read)."""
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise KernelArgumentError(f"{op}: dropout p must be a float in [0, 1), got {p!r}")
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.dim() != 0:
            raise KernelArgumentError(f"{op}: a seed tensor must be int64 0-dim, got {_dtype(seed.dtype)} {_shape(seed)}")
    elif not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise KernelArgumentError(f"{op}: seed must be an int in [0, 2**63) or an int64 0-dim tensor, got {seed!r}")


def learning_rate(op: str, lr, device) -> None:
    """A learning rate: a float, or a float64 0-dim tensor on the parameters' device."""
    if isinstance(lr, torch.Tensor):
        if lr.dtype != torch.float64 or lr.dim() != 0 or (device is not None and lr.device != device):
            raise KernelArgumentError(f"{op}: a learning-rate tensor must be float64 0-dim on {device}, got "
                                      f"{_dtype(lr.dtype)} {_shape(lr)} on {lr.device}")
    elif not isinstance(lr, (int, float)):
        raise KernelArgumentError(f"{op}: lr must be a float or a float64 0-dim tensor, got {type(lr).__name__}")


def masked_adamw(params, grads, exp_avgs, exp_avg_sqs, masks, steps, grad_scale, *, dtypes: tuple, devices: tuple | None,
                 max_numel: int | None) -> None:
    """The arguments of ``masked_adamw_`` (see :func:`harmodt_kernels.masked_adamw_`)."""
    op = "masked_adamw_"
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "masks": masks, "steps": steps}
    if len({len(v) for v in lists.values()}) != 1:
        raise KernelArgumentError(f"{op}: params, grads, exp_avgs, exp_avg_sqs, masks and steps must have one length, got "
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
            raise KernelArgumentError(f"{op}: params[{i}] has {p.numel()} elements, more than this backend's {max_numel}")
        m = masks[i]
        if m is not None:
            if p.dim() == 0:
                raise KernelArgumentError(f"{op}: masks[{i}]: a masked parameter must be at least 1-D, params[{i}] is 0-D")
            tensor(op, f"masks[{i}]", m, (torch.int32, torch.bool), devices)
            if m.dtype == torch.bool:
                shape(op, f"masks[{i}]", m, p.shape, " (a bool mask of params[i]'s shape)")
            else:
                shape(op, f"masks[{i}]", m, (*p.shape[:-1], num_words(p.shape[-1])), " (packed words of params[i]'s last dimension)")
                if not m.is_contiguous():
                    raise KernelArgumentError(f"{op}: masks[{i}] must be contiguous")
        same_device(op, {"params[i]": p, "grads[i]": grads[i], "exp_avgs[i]": exp_avgs[i], "exp_avg_sqs[i]": exp_avg_sqs[i],
                         "masks[i]": m, "steps[i]": steps[i]})
    if not torch.compiler.is_compiling():  # (storage addresses: an eager-only check)
        seen: dict = {}
        for i, s in enumerate(steps):
            j = seen.setdefault(s.data_ptr(), i)
            if j != i:
                raise KernelArgumentError(f"{op}: steps[{i}] shares its storage with steps[{j}] (each parameter needs its own count)")
    if isinstance(grad_scale, torch.Tensor):
        if grad_scale.numel() != 1 or not grad_scale.is_floating_point():
            raise KernelArgumentError(f"{op}: grad_scale must be a float or a one-element float tensor, got "
                                      f"{_dtype(grad_scale.dtype)} {_shape(grad_scale)}")
        if params and grad_scale.device != params[0].device:
            raise KernelArgumentError(f"{op}: grad_scale must be on the params' device {params[0].device}, got {grad_scale.device}")
    elif not isinstance(grad_scale, (int, float)):
        raise KernelArgumentError(f"{op}: grad_scale must be a float or a one-element float tensor, got {type(grad_scale).__name__}")


def harmony_select(harmony, recovery, masks, *, devices: tuple | None, max_numel: int | None) -> None:
    """The arguments of ``harmony_select`` (see :func:`harmodt_kernels.harmony_select`)."""
    op = "harmony_select"
    tensor(op, "harmony", harmony, (torch.float32,), devices)
    if harmony.dim() != 2:
        raise KernelArgumentError(f"{op}: harmony must be [T, P], got {_shape(harmony)}")
    t, p = harmony.shape
    tensor(op, "recovery", recovery, (torch.float32,), devices)
    shape(op, "recovery", recovery, (t, p), " like harmony")
    tensor(op, "masks", masks, (torch.int32,), devices)
    shape(op, "masks", masks, (t, num_words(p)), " (packed)")
    same_device(op, {"harmony": harmony, "recovery": recovery, "masks": masks})
    if max_numel is not None and p > max_numel:
        raise KernelArgumentError(f"{op}: P={p} weights are more than this backend's {max_numel}")
