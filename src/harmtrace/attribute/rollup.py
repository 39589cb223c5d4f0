"""Roll record scores up to sources, compare methods, and score against hidden labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score

__all__ = ["auprc", "records_frame", "rollup_sources", "top_k"]


def rollup_sources(
    scores: np.ndarray, sources: Sequence[str], *, k: int, n_boot: int = 1000, seed: int = 0
) -> list[dict]:
    """Mean score of each source's records, with a bootstrap interval over queries.

    ``scores`` has shape ``(n_query, n_train)``. A source's score is the mean, over its
    records, of the record's mean score over queries. The 95% interval resamples queries
    with replacement. ``share_topk`` is the share of the ``k`` highest records that come from
    the source. Sorted by score, highest first.
    """
    sources = np.asarray(sources)
    names = sorted(set(sources.tolist()))
    member = np.stack([sources == n for n in names]).astype(np.float64)  # (S, n_train)
    member /= member.sum(axis=1, keepdims=True)
    point = member @ scores.mean(axis=0)  # (S,)
    rng = np.random.default_rng(seed)
    n_query = scores.shape[0]
    per_query = scores @ member.T  # (n_query, S): each query's source means
    draws = rng.integers(0, n_query, size=(n_boot, n_query))
    boot = per_query[draws].mean(axis=1)  # (n_boot, S)
    lo, hi = np.quantile(boot, [0.025, 0.975], axis=0)
    top = top_k(scores, k)
    rows = []
    for s, name in enumerate(names):
        rows.append({"source": name, "score": float(point[s]), "ci": [float(lo[s]), float(hi[s])],
                     "share_topk": float(np.mean(sources[top] == name)),
                     "n_records": int((sources == name).sum())})
    return sorted(rows, key=lambda r: r["score"], reverse=True)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` train records with the highest mean score, best first."""
    mean = scores.mean(axis=0)
    order = np.lexsort((np.arange(len(mean)), -mean))  # ties broken by index: deterministic
    return order[:k]


def auprc(scores: np.ndarray, labels: Sequence[int]) -> float:
    """Average precision of the mean scores at finding records with label 1."""
    return float(average_precision_score(np.asarray(labels), scores.mean(axis=0)))


def records_frame(record_ids, sources, texts, all_scores: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per train record with its mean score under each method."""
    frame = pd.DataFrame({"record_id": list(record_ids), "source": list(sources),
                          "text": list(texts)})
    for name, scores in all_scores.items():
        frame[name] = scores.mean(axis=0)
    return frame
