"""The study's statistics: Student's t-interval over seeds; the paired difference of two arms with the
seed as the unit (a paired t over the per-seed mean differences, with the (seed, task) bootstrap as a
secondary interval); Holm's correction for a table of such differences; and the Jaccard similarity
and classical MDS of task masks."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

BOOTSTRAP_SEED = 20240721
BOOTSTRAP_SAMPLES = 10_000


def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the t-interval of the mean of ``values``; one value gives (v, nan, nan)."""
    v = np.asarray(values, dtype=float)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, float("nan"), float("nan")
    half = float(sps.t.ppf(0.5 + level / 2, len(v) - 1)) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return mean, mean - half, mean + half


def paired_bootstrap(diffs, level: float = 0.95, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean of paired differences
    (one per (seed, task) pair), resampling the pairs with replacement."""
    d = np.asarray(diffs, dtype=float).reshape(-1)
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(samples, len(d)))].mean(1)
    a = (1 - level) / 2
    return float(d.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def paired_t(diffs, level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, low, high, p): the paired t-interval and two-sided p-value of the mean of ``diffs``, one
    difference per replicate. One replicate gives NaN bounds and p; equal differences give a zero-width
    interval with p = 0 (p = 1 when they are all 0)."""
    d = np.asarray(diffs, dtype=float).reshape(-1)
    mean = float(d.mean())
    if len(d) < 2:
        return mean, float("nan"), float("nan"), float("nan")
    if np.ptp(d) <= 1e-12 * max(1.0, float(np.abs(d).max())):  # equal up to rounding: no spread to estimate
        return mean, mean, mean, (1.0 if mean == 0 else 0.0)
    res = sps.ttest_1samp(d, 0.0)
    ci = res.confidence_interval(level)
    return mean, float(ci.low), float(ci.high), float(res.pvalue)


SEED_LEVEL_METHOD = "paired t over the per-seed mean differences (seeds are the replicates)"


def paired_difference(success: dict, reference: dict, tasks, reference_name: str) -> dict | None:
    """Success of one arm minus that of ``reference_name``, paired by seed. ``success`` and ``reference``
    map seed -> task -> success. The interval and p-value treat the seed as the unit: each shared seed
    gives one difference (its mean over ``tasks``), and a paired t over those is the primary result
    (``ci_low``/``ci_high``/``p_value``). The percentile bootstrap over the (seed, task) pairs, which
    treats every pair as independent, is kept as a labelled secondary interval (``pairs_bootstrap``).
    None when no seed is shared."""
    seeds = [s for s in success if s in reference]
    if not seeds:
        return None
    per_seed = {s: float(np.mean([success[s][t] - reference[s][t] for t in tasks])) for s in seeds}
    mean, lo, hi, p = paired_t(list(per_seed.values()))
    pairs = [success[s][t] - reference[s][t] for s in seeds for t in tasks]
    _, blo, bhi = paired_bootstrap(pairs)
    return {"reference": reference_name, "mean_diff": mean, "ci_low": lo, "ci_high": hi, "p_value": p,
            "seeds": len(seeds), "per_seed": {str(s): v for s, v in per_seed.items()}, "interval": SEED_LEVEL_METHOD,
            "pairs": len(pairs), "pairs_bootstrap": {"ci_low": blo, "ci_high": bhi}}


def excludes_zero(p: dict | None) -> bool:
    """Whether a paired difference's seed-level interval excludes 0 (False without an interval)."""
    return p is not None and (p["ci_low"] > 0 or p["ci_high"] < 0)


def holm(pvalues: dict, alpha: float = 0.05) -> dict:
    """Holm's step-down correction: ``{key: rejected}`` for a family of p-values ``{key: p}``. The
    k-th smallest of m p-values is compared with alpha / (m - k + 1) and the procedure stops at the
    first that is not below it; NaN p-values count in m and are never rejected."""
    order = sorted(pvalues, key=lambda k: (math.isnan(pvalues[k]), pvalues[k]))
    m = len(order)
    out = {k: False for k in order}
    for i, k in enumerate(order):
        if math.isnan(pvalues[k]) or pvalues[k] > alpha / (m - i):
            break
        out[k] = True
    return out


def jaccard_matrix(masks: np.ndarray) -> np.ndarray:
    """``[T, T]`` Jaccard similarity |A & B| / |A | B| of the rows of a boolean ``[T, P]`` matrix."""
    m = np.asarray(masks, dtype=np.float64)
    inter = m @ m.T
    size = m.sum(1)
    union = size[:, None] + size[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def classical_mds(dist: np.ndarray, dims: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Classical (Torgerson) MDS: the ``[n, dims]`` coordinates whose distances best match ``dist``
    (double-centred squared distances, top eigenvectors scaled by the square roots of their eigenvalues),
    and the share of the positive eigenvalues' sum each of the ``dims`` axes explains."""
    d2 = np.asarray(dist, dtype=np.float64) ** 2
    n = len(d2)
    j = np.eye(n) - np.ones((n, n)) / n
    b = -0.5 * j @ d2 @ j
    vals, vecs = np.linalg.eigh(b)
    order = np.argsort(vals)[::-1][:dims]
    kept = np.clip(vals[order], 0.0, None)
    coords = vecs[:, order] * np.sqrt(kept)
    total = vals[vals > 0].sum()
    explained = kept / total if total > 0 else np.zeros_like(kept)
    if coords.shape[1] < dims:
        coords = np.pad(coords, ((0, 0), (0, dims - coords.shape[1])))
        explained = np.pad(explained, (0, dims - len(explained)))
    return coords, explained


def fmt(x, nd: int = 3) -> str:
    """A number for a report table with ``nd`` decimals; "–" for a missing or NaN value."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"
