"""What every op shares: the cache of configurations whose checks passed, and the seed as the
backends take it.

The launch path costs about what an ATen op's does. The checks depend only on shapes, dtypes,
devices and host-side flags, so an op runs them once per configuration and keeps the ones that
passed in its own ``checked`` set, keyed on exactly those (a later call with the same key skips
them; a call whose arguments are not tensors fails to make a key and gets the checks, which name
the bad argument). A backend whose op checks every argument itself in its kernel (the native
``cpu`` backend's ``masked_linear``, in C++) is called straight away, and only a call it refuses
takes the checks, which then name the bad argument. Under ``torch.compile`` the checks run every
time and trace away. Autocast's casts and its disabling context are entered only while autocast
is on. Per call there remains the seed's range check (a host value that changes every step).
"""

from __future__ import annotations

import torch


MAX_CHECKED = 4096  # configurations an op remembers as checked (beyond it the set starts afresh)


def tensor_key(t) -> tuple | None:
    """(shape, dtype, device) of a tensor, None for None; AttributeError for anything else."""
    return None if t is None else (t.shape, t.dtype, t.device)


def remember(checked: set, key) -> None:
    if len(checked) >= MAX_CHECKED:
        checked.clear()
    checked.add(key)


def seed_arg(seed):
    """A seed as the backends take it: an int, or the int64 0-dim tensor that holds it on the
    device (a captured step's; read there, never on the host)."""
    return seed if isinstance(seed, torch.Tensor) else int(seed)
