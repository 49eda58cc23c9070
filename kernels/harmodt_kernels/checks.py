"""The pieces of the ops' argument checks (each op's own checks live in its module, ``ops/``):
shapes, dtypes, devices and layouts, each failure a :class:`KernelArgumentError` naming the
argument, what it must be and what it is.

Nothing here reads a tensor's values (task ids in range are checked by each backend where it
can do so without a host synchronisation), so ``torch.compile`` traces the checks away.
"""

from __future__ import annotations

import torch

FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class KernelArgumentError(ValueError):
    """A bad argument to a kernel op (shape, dtype, device, layout or value), named in the message."""


def dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def shape_list(t: torch.Tensor) -> list:
    return list(t.shape)


def tensor(op: str, name: str, t, dtypes: tuple, devices: tuple | None) -> None:
    """``t`` is a tensor of one of ``dtypes`` on a device of type in ``devices`` (None: any)."""
    if not isinstance(t, torch.Tensor):
        raise KernelArgumentError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise KernelArgumentError(f"{op}: {name} must be {' or '.join(dtype_name(d) for d in dtypes)}, "
                                  f"got {dtype_name(t.dtype)}")
    if devices is not None and t.device.type not in devices:
        raise KernelArgumentError(f"{op}: {name} must be a {' or '.join(d.upper() for d in devices)} tensor for this "
                                  f"backend, got one on {t.device}")


def shape(op: str, name: str, t: torch.Tensor, want: tuple, what: str = "") -> None:
    if tuple(t.shape) != tuple(want):
        raise KernelArgumentError(f"{op}: {name} must be {list(want)}{what}, got {shape_list(t)}")


def same_device(op: str, named: dict) -> None:
    devs = {t.device for t in named.values() if t is not None}
    if len(devs) > 1:
        raise KernelArgumentError(f"{op}: all tensors must be on one device, got "
                                  + ", ".join(f"{n} on {t.device}" for n, t in named.items() if t is not None))
