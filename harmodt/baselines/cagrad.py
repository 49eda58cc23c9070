"""CAGrad (Liu et al., NeurIPS 2021, "Conflict-Averse Gradient Descent for Multi-task Learning").

The update d maximizes the worst task's improvement min_i g_i . d over the ball of radius
c |g0| around the mean gradient g0. Its dual is a problem over the T-simplex,

    min_w  F(w) = g_w . g0 + c |g0| |g_w|,    g_w = sum_i w_i g_i,

after which ``d = g0 + (c |g0| / |g_w|) g_w``. F needs only the ``[T, T]`` Gram matrix G = g g^T
(g_w . g0 = w^T G 1/T, |g_w|^2 = w^T G w), so the dual is solved on the host in float64 by
accelerated projected gradient descent: deterministic, and cheap (about 1 ms for T <= 8) next to
the backward passes that produced the gradients. d is then divided by 1 + c^2 (``rescale``), as the
official code does by default (its Meta-World code included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..domains import at_least


def project_simplex(v: np.ndarray) -> np.ndarray:
    """The Euclidean projection of ``v`` (T,) onto {w >= 0, sum w = 1}."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    k = np.arange(1, len(v) + 1)
    rho = np.nonzero(u - css / k > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1), 0.0)


def dual_objective(w: np.ndarray, gram: np.ndarray, c: float) -> float:
    """F(w) = g_w . g0 + c |g0| |g_w| from the Gram matrix ``gram`` (T, T)."""
    g0_norm = math.sqrt(max(gram.mean(), 0.0))
    return float(w @ gram.mean(1) + c * g0_norm * math.sqrt(max(w @ gram @ w, 0.0)))


def cagrad_weights(gram: np.ndarray, c: float, max_iter: int = 500, tol: float = 1e-12) -> np.ndarray:
    """The simplex weights w (T,) minimizing CAGrad's dual F for the Gram matrix ``gram`` (T, T).

    Accelerated projected gradient descent (monotone FISTA with a backtracking step) from the
    uniform weights, on F / |g0|^2 (so the scale of the gradients does not matter), until a
    projected step moves the weights less than ``tol`` (L1) or after ``max_iter`` steps.
    With g0 = 0 the uniform weights are returned.
    """
    gram = np.asarray(gram, dtype=np.float64)
    t = gram.shape[0]
    w = np.full(t, 1.0 / t)
    g0_sq = gram.mean()
    if t == 1 or not g0_sq > 0:
        return w
    a = gram / g0_sq  # (T, T), normalized: |g0| = 1
    b = a.mean(1)  # (T,) g_i . g0
    eps = 1e-14  # keeps the square root differentiable at g_w = 0

    def f(x):
        return x @ b + c * math.sqrt(max(x @ a @ x, 0.0) + eps)

    def grad(x):
        return b + c * (a @ x) / math.sqrt(max(x @ a @ x, 0.0) + eps)

    y, fw, momentum, step = w, f(w), 1.0, 1.0
    for _ in range(max_iter):
        fy, gy = f(y), grad(y)
        while True:  # backtrack until the quadratic model at y bounds F at the projected step z
            z = project_simplex(y - step * gy)
            d = z - y
            fz = f(z)
            if fz <= fy + gy @ d + (d @ d) / (2 * step) or step < 1e-30:
                break
            step *= 0.5
        nxt = (1 + math.sqrt(1 + 4 * momentum * momentum)) / 2
        x, fx = (z, fz) if fz <= fw else (w, fw)  # monotone: keep the best point
        y = x + ((momentum - 1) / nxt) * (x - w) + (momentum / nxt) * (z - x)
        w, fw, momentum, step = x, fx, nxt, step * 1.5
        if np.abs(d).sum() < tol:
            break
    return w


def cagrad(grads: torch.Tensor, c: float, rescale: bool = True) -> torch.Tensor:
    """CAGrad's update direction ``[P]`` from task gradients ``grads`` ``[T, P]`` and ``c`` >= 0.

    ``c = 0`` is the mean gradient. ``rescale``: divide by 1 + c^2 (the official code's default).
    """
    if c == 0:
        return grads.mean(0)
    t = grads.shape[0]
    gram = (grads @ grads.T).double().cpu().numpy()  # (T, T)
    w = cagrad_weights(gram, c)
    g0_norm = math.sqrt(max(gram.mean(), 0.0))
    gw_norm = math.sqrt(max(w @ gram @ w, 0.0))
    lam = c * g0_norm / gw_norm if gw_norm > 1e-12 * g0_norm else 0.0  # g_w = 0: d = g0
    coef = np.full(t, 1.0 / t) + lam * w  # d = coef @ grads
    if rescale:
        coef /= 1.0 + c * c
    return torch.as_tensor(coef, dtype=grads.dtype, device=grads.device) @ grads


@dataclass(frozen=True)
class CAGradOptions:
    """CAGrad's own hyper-parameter (each field a training flag, harmodt.methods)."""

    cagrad_c: float = field(default=0.5, metadata={"help": "c of cagrad: radius of the ball around the mean gradient, "
                                                           "in units of its norm (0 = the mean gradient)",
                                                   "domain": at_least(0, "0: the mean gradient")})


def cagrad_direction(grads: torch.Tensor, options: CAGradOptions, generator: torch.Generator) -> torch.Tensor:
    """CAGrad's update direction ``[P]`` (:func:`cagrad` with ``options.cagrad_c``, already at the
    mean gradient's scale); ``generator`` is not used."""
    return cagrad(grads, options.cagrad_c)
