"""The maths of the linear datamodeling score (Park et al. 2023, "TRAK", section 2.2).

Protocol: draw ``n_subsets`` random subsets of the training set, each holding exactly
``round(fraction * n_train)`` records (seeded); train one model per subset, **every one with
the same training seed**, so that the only difference between two subset models is their
data; measure each query on each subset model. A method's prediction for subset ``S`` and
query ``i`` is ``sum_{j in S} scores[i, j]``. The LDS of query ``i`` is the Spearman rank
correlation, over subsets, between that prediction and the *negative* query loss of the
subset model (a positive score means record ``j`` lowered the loss, so subsets with a larger
sum of scores should have a lower loss). The LDS is the mean over queries; its 95% interval
is a percentile bootstrap over queries.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from harmtrace.errors import ConfigError, InputDataError

__all__ = ["bootstrap_ci", "lds", "lds_per_query", "predicted_effects", "sample_subsets"]


def sample_subsets(n_train: int, n_subsets: int, *, fraction: float, seed: int) -> np.ndarray:
    """Boolean masks ``(n_subsets, n_train)``; row ``s`` is True for the records kept.

    Every row keeps exactly ``round(fraction * n_train)`` records (at least 1, at most
    ``n_train - 1``), drawn without replacement by a generator seeded with ``seed``.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"fraction must be in (0, 1), got {fraction}")
    if n_subsets < 2 or n_train < 2:
        raise ConfigError(f"need n_subsets >= 2 and n_train >= 2, got {n_subsets}, {n_train}")
    keep = min(max(int(round(fraction * n_train)), 1), n_train - 1)
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for s in range(n_subsets):
        masks[s, rng.choice(n_train, size=keep, replace=False)] = True
    return masks


def predicted_effects(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``(n_query, n_subsets)``: entry ``[i, s]`` is the sum of ``scores[i, j]`` over the
    records ``j`` kept in subset ``s``. ``scores`` is ``(n_query, n_train)``."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != masks.shape[1]:
        raise InputDataError(f"scores must be (n_query, {masks.shape[1]}), got "
                             f"{scores.shape}; transpose a peer's (n_train, n_query) output")
    return scores @ masks.T.astype(np.float64)


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``a`` with the same row of ``b``; NaN where a row
    is constant (no ranking to correlate)."""
    ra = rankdata(a, axis=1)
    rb = rankdata(b, axis=1)
    ra = ra - ra.mean(axis=1, keepdims=True)
    rb = rb - rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(axis=1) / np.where(denom > 0, denom, 1.0),
                        np.nan)


def lds_per_query(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """LDS of each query ``(n_query,)``.

    ``losses[s, i]`` ``(n_subsets, n_query)`` is query ``i``'s loss under the model trained on
    subset ``s``. The correlation is taken with ``-losses`` (see the module docstring).
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.shape != (masks.shape[0], scores.shape[0]):
        raise InputDataError(f"losses must be (n_subsets, n_query) = "
                             f"{(masks.shape[0], scores.shape[0])}, got {losses.shape}")
    return _spearman_rows(predicted_effects(scores, masks), -losses.T)


def lds(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> float:
    """Mean LDS over queries (queries with a constant prediction are left out)."""
    return float(np.nanmean(lds_per_query(scores, masks, losses)))


def bootstrap_ci(values: np.ndarray, *, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaN entries dropped)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, values.size, size=(n_boot, values.size))
    means = values[draws].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return (float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail)))
