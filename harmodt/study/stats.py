"""The study's statistics: Student's t-interval over seeds, the paired bootstrap over (seed, task)
pairs and the paired difference of two arms built on it, and the Jaccard similarity and classical
MDS of task masks."""

from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_SEED = 20240721
BOOTSTRAP_SAMPLES = 10_000


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction 1 / (1 + d1 / (1 + d2 / (1 + ...))) of the regularized incomplete beta
    function, evaluated with the modified Lentz method; it converges fast for ``x < (a + 1) / (a + b + 2)``.
    d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m)),  d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))."""
    tiny = 1e-300

    def step(coef: float, c: float, d: float) -> tuple[float, float]:
        d = 1.0 + coef * d
        c = 1.0 + coef / c
        return (c if abs(c) > tiny else tiny), 1.0 / (d if abs(d) > tiny else tiny)

    c, d = 1.0, 1.0 / (1.0 - (a + b) * x / (a + 1))  # 1 / (1 + d1): x < (a + 1) / (a + b + 2) keeps it finite
    h = d
    for m in range(1, 1000):
        c, d = step(m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)), c, d)
        h *= c * d
        c, d = step(-(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)), c, d)
        h *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom: 1 - I_{df/(df+x^2)}(df/2, 1/2) / 2 for x >= 0."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + x * x))
    return 1.0 - tail if x >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t distribution: bisection on :func:`t_cdf` to double precision."""
    if df < 1:
        raise ValueError("df must be at least 1")
    if not 0.0 < p < 1.0:
        raise ValueError("p must be in (0, 1)")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-13 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the t-interval of the mean of ``values``; one value gives (v, nan, nan)."""
    v = np.asarray(values, dtype=float)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, float("nan"), float("nan")
    half = t_quantile(0.5 + level / 2, len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return mean, mean - half, mean + half


def paired_bootstrap(diffs, level: float = 0.95, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean of paired differences
    (one per (seed, task) pair), resampling the pairs with replacement."""
    d = np.asarray(diffs, dtype=float).reshape(-1)
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(samples, len(d)))].mean(1)
    a = (1 - level) / 2
    return float(d.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def paired_difference(success: dict, reference: dict, tasks, reference_name: str) -> dict | None:
    """Success of one arm minus that of ``reference_name``, paired over the (seed, task) pairs both
    have, with its percentile bootstrap interval. ``success`` and ``reference`` map seed -> task ->
    success; None when no pair is shared."""
    diffs = [by_task[t] - reference[s][t] for s, by_task in success.items() if s in reference for t in tasks]
    if not diffs:
        return None
    d, lo, hi = paired_bootstrap(diffs)
    return {"reference": reference_name, "mean_diff": d, "ci_low": lo, "ci_high": hi, "pairs": len(diffs)}


def jaccard_matrix(masks: np.ndarray) -> np.ndarray:
    """``[T, T]`` Jaccard similarity |A & B| / |A | B| of the rows of a boolean ``[T, P]`` matrix."""
    m = np.asarray(masks, dtype=np.float64)
    inter = m @ m.T
    size = m.sum(1)
    union = size[:, None] + size[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def classical_mds(dist: np.ndarray, dims: int = 2) -> np.ndarray:
    """Classical (Torgerson) MDS: the ``[n, dims]`` coordinates whose distances best match ``dist``
    (double-centred squared distances, top eigenvectors scaled by the square roots of their eigenvalues)."""
    d2 = np.asarray(dist, dtype=np.float64) ** 2
    n = len(d2)
    j = np.eye(n) - np.ones((n, n)) / n
    b = -0.5 * j @ d2 @ j
    vals, vecs = np.linalg.eigh(b)
    order = np.argsort(vals)[::-1][:dims]
    coords = vecs[:, order] * np.sqrt(np.clip(vals[order], 0.0, None))
    if coords.shape[1] < dims:
        coords = np.pad(coords, ((0, 0), (0, dims - coords.shape[1])))
    return coords


def fmt(x, nd: int = 3) -> str:
    """A number for a report table with ``nd`` decimals; "–" for a missing or NaN value."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"
