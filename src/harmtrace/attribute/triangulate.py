"""Agreement between attribution methods: do they point at the same records and sources?

Attribution estimates are noisy and method-dependent, so a ranking one method alone produces
is a hypothesis. This module compares, for each pair of methods, the **mean score over
queries** of every train record (scores ``(n_query, n_train)`` in harmtrace's sign: positive
means the record made the query's harmful tokens more likely):

* Spearman's rho and Kendall's tau-b between the two methods' mean scores (scipy);
* the overlap of their top-``k`` records: Jaccard ``|A & B| / |A | B|`` and share
  ``|A & B| / k``;
* the same rank correlations between the methods' **source** scores (the mean of a source's
  records' mean scores, as :func:`harmtrace.attribute.rollup.rollup_sources` computes), and
  whether both put the same source first.

Each comparison carries a reliability hint from :class:`AgreementThresholds`: "methods agree"
when Spearman's rho >= 0.5 **and** the top-k share >= 0.5 (for sources: rho >= 0.5 and the
same top source), otherwise "methods disagree: treat the ranking as a hypothesis, verify by
retraining". The thresholds are conventions (0.5 is a moderate rank correlation, half of
the top records in common), not significance tests; change them through the dataclass.

Ties in the top-k are broken by :func:`harmtrace.attribute.rollup.top_k`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import kendalltau, spearmanr

from harmtrace.attribute.rollup import top_k
from harmtrace.errors import ConfigError

__all__ = [
    "AGREE",
    "DISAGREE",
    "AgreementThresholds",
    "PairAgreement",
    "SourceAgreement",
    "method_agreement",
    "overall_hint",
    "record_support",
    "source_agreement",
]

AGREE = "methods agree"
DISAGREE = "methods disagree: treat the ranking as a hypothesis, verify by retraining"


@dataclass(frozen=True)
class AgreementThresholds:
    """When two methods count as agreeing.

    spearman:
        Least Spearman rho of mean record (or source) scores, in [-1, 1] (default 0.5).
    topk_share:
        Least share of the top-k records in common, in [0, 1] (default 0.5).
    """

    spearman: float = 0.5
    topk_share: float = 0.5

    def __post_init__(self) -> None:
        if not -1.0 <= self.spearman <= 1.0:
            raise ConfigError(f"AgreementThresholds.spearman must be in [-1, 1], got "
                              f"{self.spearman}")
        if not 0.0 <= self.topk_share <= 1.0:
            raise ConfigError(f"AgreementThresholds.topk_share must be in [0, 1], got "
                              f"{self.topk_share}")


@dataclass(frozen=True)
class PairAgreement:
    """Agreement of methods ``a`` and ``b`` on train records (see the module docstring)."""

    a: str
    b: str
    spearman: float
    kendall: float
    topk_jaccard: float
    topk_share: float
    k: int
    hint: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SourceAgreement:
    """Agreement of methods ``a`` and ``b`` on the order of sources."""

    a: str
    b: str
    spearman: float
    kendall: float
    top_source_a: str
    top_source_b: str
    hint: str

    def as_dict(self) -> dict:
        return asdict(self)


def _mean_scores(name: str, scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[None, :]
    if scores.ndim != 2:
        raise ConfigError(f"scores of method {name!r} must be (n_query, n_train) or "
                          f"(n_train,), got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ConfigError(f"scores of method {name!r} contain non-finite values")
    return scores.mean(axis=0)


def _checked_means(all_scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if len(all_scores) < 2:
        raise ConfigError(f"agreement needs scores of at least two methods, got "
                          f"{list(all_scores)}")
    means = {name: _mean_scores(name, s) for name, s in all_scores.items()}
    sizes = {name: len(m) for name, m in means.items()}
    if len(set(sizes.values())) != 1:
        raise ConfigError(f"methods scored different numbers of train records: {sizes}")
    return means


def _rank_correlations(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    # a constant ranking has no defined correlation; report 0 (no evidence of agreement)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0, 0.0
    return float(spearmanr(x, y).statistic), float(kendalltau(x, y).statistic)


def method_agreement(all_scores: Mapping[str, np.ndarray], *, k: int,
                     thresholds: AgreementThresholds | None = None) -> list[PairAgreement]:
    """Agreement on train records for each pair of methods, in the order given.

    ``all_scores[name]`` is that method's ``(n_query, n_train)`` score matrix (or the
    ``(n_train,)`` mean scores). ``k`` (1 <= k <= n_train) sets the top-k compared.
    """
    thresholds = thresholds or AgreementThresholds()
    means = _checked_means(all_scores)
    n_train = len(next(iter(means.values())))
    if not 1 <= k <= n_train:
        raise ConfigError(f"k must be in [1, {n_train}] (the number of train records), got {k}")
    tops = {name: set(top_k(m[None, :], k).tolist()) for name, m in means.items()}
    names = list(means)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            rho, tau = _rank_correlations(means[a], means[b])
            common = len(tops[a] & tops[b])
            share = common / k
            agree = rho >= thresholds.spearman and share >= thresholds.topk_share
            rows.append(PairAgreement(a=a, b=b, spearman=rho, kendall=tau,
                                      topk_jaccard=common / len(tops[a] | tops[b]),
                                      topk_share=share, k=k, hint=AGREE if agree else DISAGREE))
    return rows


def source_agreement(all_scores: Mapping[str, np.ndarray], sources: Sequence[str], *,
                     thresholds: AgreementThresholds | None = None) -> list[SourceAgreement]:
    """Agreement on the order of sources for each pair of methods.

    ``sources[j]`` is train record ``j``'s source. A source's score is the mean of its
    records' mean scores. Methods agree when the source scores' Spearman rho reaches the
    threshold and both rank the same source first (ties to the alphabetically first).
    """
    thresholds = thresholds or AgreementThresholds()
    means = _checked_means(all_scores)
    labels = np.asarray(sources)
    if len(labels) != len(next(iter(means.values()))):
        raise ConfigError(f"sources has {len(labels)} entries for "
                          f"{len(next(iter(means.values())))} train records")
    names = sorted(set(labels.tolist()))
    member = np.stack([labels == n for n in names]).astype(np.float64)  # (S, n_train)
    member /= member.sum(axis=1, keepdims=True)
    per_source = {m: member @ v for m, v in means.items()}  # (S,) each
    first = {m: names[int(np.argmax(v))] for m, v in per_source.items()}
    methods = list(means)
    rows = []
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            rho, tau = _rank_correlations(per_source[a], per_source[b])
            agree = rho >= thresholds.spearman and first[a] == first[b]
            rows.append(SourceAgreement(a=a, b=b, spearman=rho, kendall=tau,
                                        top_source_a=first[a], top_source_b=first[b],
                                        hint=AGREE if agree else DISAGREE))
    return rows


def record_support(all_scores: Mapping[str, np.ndarray], *, k: int) -> dict[int, list[str]]:
    """For each record in any method's top-k, the methods that put it there (in the order
    given); a record that only one method ranks high is the weakest lead."""
    means = _checked_means(all_scores)
    support: dict[int, list[str]] = {}
    for name, m in means.items():
        for j in top_k(m[None, :], k).tolist():
            support.setdefault(int(j), []).append(name)
    return dict(sorted(support.items(), key=lambda item: (-len(item[1]), item[0])))


def overall_hint(pairs: Sequence[PairAgreement | SourceAgreement]) -> str:
    """:data:`AGREE` when every pair agrees, else :data:`DISAGREE`."""
    if not pairs:
        raise ConfigError("overall_hint needs at least one pairwise comparison")
    return AGREE if all(p.hint == AGREE for p in pairs) else DISAGREE
