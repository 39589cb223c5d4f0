"""Trajectory influence (SOURCE and the checkpoint sum): limits, sign, invariances, errors.

Checked against :mod:`harmtrace.attribute.influence` on the same checkpoints: one long
damped SOURCE segment is the plain EK-FAC score, one short segment is ``eta K`` times the
gradient dot product, and a one-checkpoint sum is the plain score (factor 1).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from harmtrace.attribute.exact import ReplaySpec, train_weighted
from harmtrace.attribute.influence import InfluenceSettings, fit_factors, score
from harmtrace.attribute.task import ClassificationTask
from harmtrace.attribute.unrolled import Segment, UnrolledSettings, unrolled_scores
from harmtrace.errors import ConfigError, NumericalError

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = ClassificationTask()
DAMPED = InfluenceSettings(damping=1e-3, batch_size=8)


def _data(n: int = 48, d: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = ((x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())  # 3 classes
    return [(x[i], int(y[i])) for i in range(n)]


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference relative to the largest score: the plain scorer multiplies in the
    model's precision (float32), ours in float64."""
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def trajectory():
    """Train records, queries and 3 checkpoints of one SGD run (after 4, 8 and 12 steps)."""
    train = _data()
    queries = _data(n=6, seed=1)
    spec = ReplaySpec(lr=0.5, epochs=2, batch_size=8, seed=0, init_seed=0)
    order = tuple(tuple(int(i) for i in rows) for rows in spec.batches(len(train)))
    models = []
    for steps in (4, 8, 12):
        prefix = ReplaySpec(lr=0.5, batch_size=8, init_seed=0, batch_order=order[:steps])
        models.append(train_weighted(prefix, _mlp, TASK, train, np.ones(len(train))))
    return train, queries, models


def _plain(model, train, queries, settings=DAMPED) -> np.ndarray:
    factors = fit_factors(model, TASK, train, settings=settings)
    return score(model, TASK, factors, train, queries).scores


def test_one_long_damped_source_segment_equals_plain_ekfac(trajectory):
    train, queries, models = trajectory
    settings = UnrolledSettings(influence=DAMPED, source_damping=True)
    # (1 - exp(-t (lam + d))) / (lam + d) = 1 / (lam + d) once t d >> 1 (here t d = 1e6)
    found = unrolled_scores([Segment(models[-1], 1e9, 1)], TASK, train, queries,
                            settings=settings).scores
    assert _rel(found, _plain(models[-1], train, queries)) < 1e-6


def test_one_short_source_segment_is_duration_times_gradient_dot_product(trajectory):
    train, queries, models = trajectory
    identity = _plain(models[-1], train, queries, InfluenceSettings(strategy="identity"))
    found = unrolled_scores([Segment(models[-1], 1e-7, 3)], TASK, train, queries).scores
    assert _rel(found, 3e-7 * identity) < 1e-6


def test_one_checkpoint_sum_equals_plain_ekfac(trajectory):
    train, queries, models = trajectory
    settings = UnrolledSettings(combine="sum", influence=DAMPED)
    found = unrolled_scores([(models[0], 0.3, 5)], TASK, train, queries,
                            settings=settings).scores
    assert _rel(found, _plain(models[0], train, queries)) < 1e-12


def test_checkpoint_sum_weights_by_lr_times_steps(trajectory):
    train, queries, models = trajectory
    settings = UnrolledSettings(combine="sum", influence=DAMPED)
    found = unrolled_scores([(models[0], 0.5, 2), (models[1], 0.1, 5)], TASK, train, queries,
                            settings=settings).scores
    expected = (0.5 * 2 * _plain(models[0], train, queries)
                + 0.1 * 5 * _plain(models[1], train, queries)) / 1.5
    assert _rel(found, expected) < 1e-12


def test_splitting_a_source_segment_at_the_same_checkpoint_changes_nothing(trajectory):
    # exp(-t2 H)(1 - exp(-t1 H)) H^-1 + (1 - exp(-t2 H)) H^-1 = (1 - exp(-(t1 + t2) H)) H^-1
    train, queries, models = trajectory
    whole = unrolled_scores([(models[0], 0.5, 8), (models[2], 0.5, 4)], TASK, train, queries)
    split = unrolled_scores([(models[0], 0.5, 3), (models[0], 0.5, 5), (models[2], 0.5, 4)],
                            TASK, train, queries)
    assert _rel(split.scores, whole.scores) < 1e-10


@pytest.mark.parametrize("combine", ["source", "sum"])
def test_planted_copy_of_a_train_record_ranks_at_the_top(trajectory, combine):
    train, _, models = trajectory
    planted = [3, 17, 30, 41]
    queries = [train[j] for j in planted]
    segments = [(m, 0.5, 4) for m in models]
    scores = unrolled_scores(segments, TASK, train, queries,
                             settings=UnrolledSettings(combine=combine)).scores
    for i, j in enumerate(planted):
        assert scores[i, j] > 0  # the copy lowered its twin's loss
        assert j in np.argsort(-scores[i])[:3], f"record {j} ranks {np.argsort(-scores[i])}"


@pytest.mark.parametrize("combine", ["source", "sum"])
def test_scores_do_not_depend_on_batch_size(trajectory, combine):
    train, queries, models = trajectory
    segments = [(m, 0.5, 4) for m in models]
    found = [unrolled_scores(segments, TASK, train, queries, settings=UnrolledSettings(
        combine=combine, influence=InfluenceSettings(batch_size=size))).scores
        for size in (5, 48)]
    assert _rel(found[0], found[1]) < 1e-6


def test_metadata_states_sign_and_every_segment(trajectory):
    train, queries, models = trajectory
    result = unrolled_scores([(models[0], 0.5, 8), (models[2], 0.25, 4)], TASK, train,
                             queries)
    assert result.scores.shape == (len(queries), len(train))
    assert [s["duration"] for s in result.metadata["segments"]] == [4.0, 1.0]
    assert "smaller" in result.metadata["sign"]


@pytest.mark.parametrize(("segments", "named"), [
    ([], "segments is empty"),
    ("model", "segments must be a list"),
    ([("m", 0.1)], "segments[0] must be a Segment"),
])
def test_bad_segment_lists_are_refused_naming_the_argument(segments, named):
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        unrolled_scores(segments, TASK, _data(n=4), _data(n=2))


@pytest.mark.parametrize(("lr", "steps", "named"), [
    (0.0, 1, "learning_rate"), (-0.1, 1, "learning_rate"), (float("nan"), 1, "learning_rate"),
    (0.1, 0, "n_steps"), (0.1, 1.5, "n_steps"),
])
def test_non_positive_learning_rate_or_steps_are_refused(lr, steps, named):
    with pytest.raises(ConfigError, match=named):
        Segment(_mlp(), lr, steps)
    with pytest.raises(ConfigError, match=rf"segments\[1\]: .*{named}"):
        unrolled_scores([(_mlp(), 0.1, 1), (_mlp(), lr, steps)], TASK, _data(n=4),
                        _data(n=2))


def test_source_without_an_eigenbasis_is_refused():
    with pytest.raises(ConfigError, match="strategy 'ekfac' or 'kfac'"):
        UnrolledSettings(influence=InfluenceSettings(strategy="diagonal"))
    with pytest.raises(ConfigError, match="combine"):
        UnrolledSettings(combine="average")


def test_checkpoints_of_different_architectures_are_refused():
    other = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    with pytest.raises(ConfigError, match="same architecture"):
        unrolled_scores([(_mlp(), 0.1, 1), (other, 0.1, 1)], TASK, _data(n=4), _data(n=2))


def test_non_finite_checkpoint_raises_naming_the_segment(trajectory):
    train, queries, models = trajectory
    broken = copy.deepcopy(models[1])
    with torch.no_grad():
        broken[0].weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match=r"segments\[1\] \(checkpoint 2 of 3\)"):
        unrolled_scores([(models[0], 0.5, 4), (broken, 0.5, 4), (models[2], 0.5, 4)], TASK,
                        train, queries)
