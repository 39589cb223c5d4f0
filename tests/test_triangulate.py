"""Agreement between methods: rank correlations, top-k overlap, source order, hints."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import kendalltau, spearmanr

from harmtrace.attribute.triangulate import (
    AGREE,
    DISAGREE,
    AgreementThresholds,
    method_agreement,
    overall_hint,
    record_support,
    source_agreement,
)
from harmtrace.errors import ConfigError


def _scores(seed: int, n_query: int = 4, n_train: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n_query, n_train))


def test_a_monotone_transform_agrees_perfectly():
    a = _scores(0)
    b = np.exp(a.mean(axis=0))  # same ranking of mean scores, other scale
    (pair,) = method_agreement({"graddot": a, "other": b}, k=5)
    assert pair.spearman == pytest.approx(1.0) and pair.kendall == pytest.approx(1.0)
    assert pair.topk_jaccard == 1.0 and pair.topk_share == 1.0 and pair.hint == AGREE


def test_reversed_ranking_disagrees_with_correlation_minus_one():
    a = _scores(1)
    (pair,) = method_agreement({"a": a, "b": -a}, k=5)
    assert pair.spearman == pytest.approx(-1.0) and pair.kendall == pytest.approx(-1.0)
    assert pair.topk_share == 0.0 and pair.topk_jaccard == 0.0 and pair.hint == DISAGREE


def test_statistics_equal_scipy_and_set_overlap_by_hand():
    a, b = _scores(2), _scores(3)
    (pair,) = method_agreement({"a": a, "b": b}, k=10)
    ma, mb = a.mean(axis=0), b.mean(axis=0)
    assert pair.spearman == pytest.approx(spearmanr(ma, mb).statistic)
    assert pair.kendall == pytest.approx(kendalltau(ma, mb).statistic)
    top_a, top_b = set(np.argsort(-ma)[:10]), set(np.argsort(-mb)[:10])
    assert pair.topk_share == len(top_a & top_b) / 10
    assert pair.topk_jaccard == len(top_a & top_b) / len(top_a | top_b)


def test_one_pair_per_method_pair_and_overall_hint():
    a = _scores(4)
    pairs = method_agreement({"a": a, "b": 2 * a, "c": -a}, k=3)
    assert [(p.a, p.b) for p in pairs] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert overall_hint(pairs[:1]) == AGREE and overall_hint(pairs) == DISAGREE


def test_thresholds_decide_the_hint():
    a = _scores(5)
    b = a + np.random.default_rng(6).normal(scale=1.0, size=a.shape)
    (pair,) = method_agreement({"a": a, "b": b}, k=10)
    lenient = AgreementThresholds(spearman=pair.spearman - 0.01,
                                  topk_share=pair.topk_share)
    strict = AgreementThresholds(spearman=min(1.0, pair.spearman + 0.01))
    assert method_agreement({"a": a, "b": b}, k=10, thresholds=lenient)[0].hint == AGREE
    assert method_agreement({"a": a, "b": b}, k=10, thresholds=strict)[0].hint == DISAGREE


def test_sources_ranked_in_the_same_order_agree_even_when_records_do_not():
    sources = ["web"] * 10 + ["forum"] * 10 + ["books"] * 10
    level = np.repeat([3.0, 1.0, -2.0], 10)
    rng = np.random.default_rng(7)
    a = level + rng.normal(scale=0.3, size=30)  # same source order, record order shuffled
    b = level + rng.normal(scale=0.3, size=30)
    (pair,) = source_agreement({"a": a, "b": b}, sources)
    assert pair.spearman == pytest.approx(1.0)
    assert pair.top_source_a == pair.top_source_b == "web" and pair.hint == AGREE
    (flipped,) = source_agreement({"a": a, "b": -b}, sources)
    assert flipped.top_source_b == "books" and flipped.hint == DISAGREE


def test_record_support_counts_the_methods_ranking_a_record_high():
    a = np.array([5.0, 4.0, 0.0, 0.0, 1.0])
    b = np.array([5.0, 0.0, 4.0, 0.0, 1.0])
    support = record_support({"a": a, "b": b}, k=2)
    assert support == {0: ["a", "b"], 1: ["a"], 2: ["b"]}


def test_bad_inputs_raise_config_errors_naming_the_problem():
    with pytest.raises(ConfigError, match="at least two methods"):
        method_agreement({"a": _scores(0)}, k=2)
    with pytest.raises(ConfigError, match="different numbers"):
        method_agreement({"a": _scores(0), "b": _scores(0, n_train=9)}, k=2)
    with pytest.raises(ConfigError, match="k must be in"):
        method_agreement({"a": _scores(0), "b": _scores(1)}, k=41)
    with pytest.raises(ConfigError, match="non-finite"):
        method_agreement({"a": _scores(0), "b": np.full(40, np.nan)}, k=3)
    with pytest.raises(ConfigError, match="topk_share"):
        AgreementThresholds(topk_share=1.5)
