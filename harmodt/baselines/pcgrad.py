"""PCGrad (Yu et al., NeurIPS 2020, "Gradient Surgery for Multi-Task Learning").

Each task gradient g_i is projected, one other task at a time in a random order, onto the normal
plane of every original g_j it conflicts with (g_i' . g_j < 0):
``g_i' <- g_i' - (g_i' . g_j / |g_j|^2) g_j``; the result is the sum of the projected g_i'.

Every g_i' stays a combination of the original gradients, ``g_i' = sum_k C[i, k] g_k``, so the
projections run on the ``[T, T]`` coefficients and the Gram matrix ``G = g g^T``: two passes over
the ``[T, P]`` gradients (G, then the final combination) instead of T^2 dot products of length P,
and no host synchronisation (the conflict test is a ``where``, not a branch).
"""

from __future__ import annotations

import torch


def random_orders(n_tasks: int, generator: torch.Generator) -> torch.Tensor:
    """``[T, T-1]`` int64: row i lists the other tasks in a random order (drawn from ``generator``)."""
    orders = torch.empty(n_tasks, max(n_tasks - 1, 0), dtype=torch.int64)
    for i in range(n_tasks):
        perm = torch.randperm(n_tasks - 1, generator=generator)  # (T-1,) over the others
        orders[i] = perm + (perm >= i).long()  # skip i itself
    return orders


def pcgrad(grads: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """The sum of the PCGrad-projected task gradients, ``[P]``.

    ``grads``: ``[T, P]`` task gradients; ``orders``: ``[T, T-1]``, row i the order in which g_i is
    projected against the others (:func:`random_orders`). Projections are always against the
    original g_j. A zero g_j is never projected against (its inner products are 0, no conflict).
    """
    t = grads.shape[0]
    gram = grads @ grads.T  # (T, T)
    coef = torch.eye(t, dtype=gram.dtype, device=gram.device)  # g_i' = coef[i] @ grads
    zero = torch.zeros((), dtype=gram.dtype, device=gram.device)
    for i in range(t):
        for j in orders[i].tolist():
            dot = coef[i] @ gram[:, j]  # g_i' . g_j
            coef[i, j] = coef[i, j] - torch.where(dot < 0, dot / gram[j, j], zero)
    return coef.sum(0) @ grads  # (P,)


def pcgrad_direction(grads: torch.Tensor, options, generator: torch.Generator) -> torch.Tensor:
    """PCGrad's update direction ``[P]`` at the mean task gradient's scale (the scale of Prompt-DT's
    batch-mean loss): the sum of the projected gradients divided by T (without conflicts: the mean
    gradient), the projection orders drawn from ``generator``; ``options`` (it has none) is not used."""
    return pcgrad(grads, random_orders(grads.shape[0], generator)) / grads.shape[0]
