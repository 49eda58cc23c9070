"""Telling tasks apart from what a prompt-conditioned model sees (harmodt/study/identify.py runs
it on a data set): each episode's feature vectors (its prompt window, its first observation, both),
normalised as the model sees them, and the two classifiers, held out by k-fold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data.batches import STATE_NORMS, PromptDTBatcher, episode_segments, first_states

CLASSIFIERS = ("nearest-centroid", "logistic")
# (view, prompt segment): what a classifier reads; the first observation does not depend on the segment
VIEWS = (("first", None), ("prompt", "last"), ("both", "last"), ("prompt", "random"), ("both", "random"))
SEGMENTS = tuple(dict.fromkeys(seg for _, seg in VIEWS if seg))  # the prompt cuts the views read
TESTS = ("heldout", "prompt_episodes")


class IdentifyError(ValueError):
    """Bad data, runs or options of the identification analysis; printed as one line by the CLI."""


@dataclass
class IdentifyConfig:
    prompt_len: int = 5  # K*, as --prompt-len
    rtg_scale: float = 1000.0  # as --rtg-scale
    max_ep_len: int = 500  # timesteps are divided by it
    folds: int = 5  # k of the k-fold over each task's training episodes
    seed: int = 0  # fold assignment and random prompt windows
    l2: float = 1e-3  # logistic regression: L2 penalty on the weights, per mean cross-entropy
    max_iter: int = 300  # logistic regression: L-BFGS iterations


# ---- features --------------------------------------------------------------------------------
def _window_vectors(seg: dict, max_ep_len: int) -> torch.Tensor:
    """Flattened prompt windows: states, actions, returns-to-go and timesteps / max_ep_len. (n, K*(S+A+2))"""
    n = seg["states"].shape[0]
    return torch.cat([seg["states"].reshape(n, -1), seg["actions"].reshape(n, -1), seg["rtg"].reshape(n, -1),
                      seg["timesteps"].reshape(n, -1).float() / max_ep_len], dim=1)


def episode_features(datasets: dict, tasks: list[str], cfg: IdentifyConfig, state_norm: str) -> dict:
    """``{"train" | "prompts": {(view, segment): float64 (n_episodes, F)}}`` and the task label of each
    row (``"train_labels"``, ``"prompt_labels"``), every task's episodes in order, normalised with
    the batcher's ``state_norm`` statistics."""
    batcher = PromptDTBatcher(datasets, tasks, context_len=1, prompt_len=cfg.prompt_len, rtg_scale=cfg.rtg_scale,
                              max_ep_len=cfg.max_ep_len, seed=cfg.seed, state_norm=state_norm)
    gen = torch.Generator().manual_seed(cfg.seed)
    out = {}
    for part, label_key, flats in (("train", "train_labels", batcher.data),
                                   ("prompts", "prompt_labels", batcher.prompts)):
        feats, labels = {v: [] for v in VIEWS}, []
        for tid, flat in enumerate(flats):
            first = first_states(flat)
            windows = {s: _window_vectors(episode_segments(flat, cfg.prompt_len, s, gen), cfg.max_ep_len)
                       for s in SEGMENTS}
            for view, seg in VIEWS:
                x = (first if view == "first" else windows[seg] if view == "prompt"
                     else torch.cat([windows[seg], first], 1))
                feats[(view, seg)].append(x.double())
            labels.append(torch.full((len(flat.lengths),), tid, dtype=torch.int64))
        out[part] = {v: torch.cat(f).numpy() for v, f in feats.items()}
        out[label_key] = torch.cat(labels).numpy()
    return out


# ---- classifiers -----------------------------------------------------------------------------
def nearest_centroid(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int) -> np.ndarray:
    """The class of the nearest class mean (Euclidean) for each test row."""
    centroids = np.stack([x_train[y_train == c].mean(0) for c in range(n_classes)])  # (C, F)
    d = ((x_test[:, None, :] - centroids[None]) ** 2).sum(-1)  # (n, C)
    return d.argmin(1)


def logistic_regression(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int,
                        l2: float = 1e-3, max_iter: int = 300) -> np.ndarray:
    """Multinomial logistic regression (softmax layer, L2 on the weights) fitted with L-BFGS on
    vectors standardised by the training rows' mean and std (constant columns left at 0); the most
    probable class of each test row. Deterministic: float64, zero start."""
    mu, sd = x_train.mean(0), x_train.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    xtr = torch.from_numpy((x_train - mu) / sd)
    xte = torch.from_numpy((x_test - mu) / sd)
    ytr = torch.from_numpy(y_train)
    w = torch.zeros(xtr.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, ytr) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (xte @ w + b).argmax(1).numpy()


def classify(name: str, x_train, y_train, x_test, n_classes: int, cfg: IdentifyConfig) -> np.ndarray:
    if name == "nearest-centroid":
        return nearest_centroid(x_train, y_train, x_test, n_classes)
    return logistic_regression(x_train, y_train, x_test, n_classes, cfg.l2, cfg.max_iter)


def fold_of(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each row's fold: within each class, a seeded permutation of its rows dealt round-robin over
    ``folds`` folds, so every fold holds every class (given at least ``folds`` rows each)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        fold[rows[rng.permutation(len(rows))]] = np.arange(len(rows)) % folds
    return fold


def heldout_predictions(x: np.ndarray, y: np.ndarray, n_classes: int, classifier: str,
                        cfg: IdentifyConfig) -> np.ndarray:
    """Every row's predicted class from a classifier fitted on the other folds (:func:`fold_of`)."""
    fold = fold_of(y, cfg.folds, cfg.seed)
    pred = np.empty_like(y)
    for f in range(cfg.folds):
        test = fold == f
        pred[test] = classify(classifier, x[~test], y[~test], x[test], n_classes, cfg)
    return pred


# ---- scores ----------------------------------------------------------------------------------
def per_task_scores(y: np.ndarray, pred: np.ndarray, tasks: list[str]) -> dict:
    """Per task: accuracy over its rows, and the task its rows were most often mistaken for (None
    when never)."""
    out = {}
    for c, t in enumerate(tasks):
        p = pred[y == c]
        wrong = p[p != c]
        out[t] = {"accuracy": float(np.mean(p == c)) if len(p) else float("nan"),
                  "confused_with": tasks[int(np.bincount(wrong).argmax())] if len(wrong) else None}
    return out


def spearman(a: list[float], b: list[float]) -> dict:
    """Spearman's rho and its two-sided p (scipy); None for either where one side is constant."""
    from scipy.stats import spearmanr

    if len(set(a)) < 2 or len(set(b)) < 2:
        return {"rho": None, "p": None, "n": len(a)}
    r = spearmanr(a, b)
    return {"rho": float(r.statistic), "p": float(r.pvalue), "n": len(a)}
