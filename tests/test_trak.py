"""TRAK: copies rank first, the sign agrees with retraining, and the estimate is invariant to
batching and mode; ensembling, damping and projection are reported as used."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harmtrace.attribute.exact import ReplaySpec, train_weighted
from harmtrace.attribute.task import ClassificationTask, LMTask, RegressionTask
from harmtrace.attribute.trak import (
    DampingScale,
    LowDimensionWarning,
    PerExample,
    TrakSettings,
    trak_scores,
)
from harmtrace.errors import ConfigError, NumericalError
from helpers import tiny_lm

TASK = ClassificationTask()


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 50, d: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = (x[:, 0] + 0.3 * torch.randn(n, generator=gen) > 0).long()
    query = (torch.randn(d, generator=gen), 1)
    return [(x[i], int(y[i])) for i in range(n)], query


def _mlp(seed: int, train) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = TASK.collate(train)
    for _ in range(60):
        opt.zero_grad()
        TASK.train_loss(model, batch).mean().backward()
        opt.step()
    return model


SETTINGS = TrakSettings(projection_dim=64, seed=3)


def test_exact_copies_of_the_queries_rank_first():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    queries = [(x[i], int(y[i])) for i in range(1000, 1008)]
    train = [(x[i], int(y[i])) for i in range(150)] + queries  # copies at 150..157
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = TASK.collate(train)
    for _ in range(100):
        opt.zero_grad()
        TASK.train_loss(model, batch).mean().backward()
        opt.step()
    result = trak_scores(model, TASK, train, queries, settings=TrakSettings(projection_dim=256))

    np.testing.assert_array_equal(np.argmax(result.scores, axis=1), np.arange(150, 158))
    assert result.scores.shape == (8, 158) and result.scores.dtype == np.float64


def test_copy_with_the_same_label_is_positive_and_flipped_label_negative_as_retraining():
    train, query = _data()
    train = train + [query, (query[0], 0)]
    spec = ReplaySpec(lr=0.5, epochs=150, batch_size=len(train), shuffle=False)

    def logistic() -> torch.nn.Module:
        return torch.nn.Linear(6, 2)

    model = train_weighted(spec, logistic, TASK, train, np.ones(len(train)))
    scores = trak_scores(model, TASK, train, [query], settings=SETTINGS).scores[0]
    assert scores[-2] > 0 > scores[-1]

    batch = TASK.collate([query])
    base = TASK.query_loss(model, batch).item()
    for j in (len(train) - 2, len(train) - 1):
        w = np.ones(len(train))
        w[j] = 0.0
        without = TASK.query_loss(train_weighted(spec, logistic, TASK, train, w), batch).item()
        # a positive score means removing the record raises the query loss
        assert np.sign(without - base) == np.sign(scores[j])


def test_same_seed_gives_the_same_scores_and_another_seed_other_scores():
    train, query = _data()
    model = _mlp(0, train)
    a = trak_scores(model, TASK, train, [query], settings=SETTINGS).scores
    b = trak_scores(model, TASK, train, [query], settings=SETTINGS).scores
    c = trak_scores(model, TASK, train, [query],
                    settings=TrakSettings(projection_dim=64, seed=4)).scores

    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("mode", [PerExample.VMAP, PerExample.LOOP])
def test_scores_do_not_depend_on_batch_size(mode):
    train, query = _data()
    model = _mlp(0, train)
    queries = [query, train[4]]
    runs = [trak_scores(model, TASK, train, queries,
                        settings=TrakSettings(projection_dim=64, batch_size=bs,
                                              per_example=mode)).scores
            for bs in (1, 7, 64)]

    # features are float32 (as TRAK stores them): equal up to float32 rounding of the batch
    scale = np.abs(runs[0]).max()
    for other in runs[1:]:
        np.testing.assert_allclose(other, runs[0], rtol=1e-4, atol=1e-5 * scale)


def test_vmap_and_loop_give_the_same_scores():
    train, query = _data()
    model = _mlp(0, train)
    vmapped = trak_scores(model, TASK, train, [query],
                          settings=TrakSettings(projection_dim=64, per_example=PerExample.VMAP))
    looped = trak_scores(model, TASK, train, [query],
                         settings=TrakSettings(projection_dim=64, per_example=PerExample.LOOP))

    scale = np.abs(looped.scores).max()
    np.testing.assert_allclose(vmapped.scores, looped.scores, rtol=1e-4, atol=1e-5 * scale)
    assert vmapped.metadata.per_example == ("vmap",)
    assert looped.metadata.per_example == ("loop",)


def test_ensemble_of_two_models_is_the_mean_of_single_model_scores():
    train, query = _data()
    first, second = _mlp(0, train), _mlp(1, train)
    both = trak_scores([first, second], TASK, train, [query], settings=SETTINGS)
    one = trak_scores([first], TASK, train, [query], settings=SETTINGS).scores
    two = trak_scores([second], TASK, train, [query], settings=SETTINGS).scores

    np.testing.assert_allclose(both.scores, (one + two) / 2, rtol=1e-12, atol=1e-15)
    assert both.metadata.n_models == 2 and len(both.metadata.damping) == 2


def test_the_projection_dimension_actually_used_is_reported():
    train, query = _data()
    model = _mlp(0, train)  # 6*8 + 8 + 8*2 + 2 = 74 parameters
    small = trak_scores(model, TASK, train, [query], settings=SETTINGS).metadata
    large = trak_scores(model, TASK, train, [query],
                        settings=TrakSettings(projection_dim=4096)).metadata
    heads = trak_scores(model, TASK, train, [query],
                        settings=TrakSettings(projection_dim=0, parameters=("2.",))).metadata

    assert (small.projection_dim, small.projected, small.n_params) == (64, True, 74)
    assert (large.projection_dim, large.projected) == (74, False)
    assert heads.parameters == ("2.weight", "2.bias") and heads.projection_dim == 18


def test_regression_scores_equal_the_closed_form_gauss_newton_influence():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64) + 0.1 * torch.randn(
        30, generator=gen, dtype=torch.float64)
    # RegressionTask collates as float32: keep the reference on float32-representable values
    x, y = x.float().double(), y.float().double()
    train = [(x[i], float(y[i])) for i in range(30)]
    queries = [((x[i] + 0.25).float().double(), float(y[i])) for i in range(3)]
    model = torch.nn.Linear(4, 1).double()
    lam = 0.7
    settings = TrakSettings(projection_dim=0, damping=lam, damping_scale=DampingScale.ABSOLUTE)
    scores = trak_scores(model, RegressionTask(), train, queries, settings=settings).scores

    with torch.no_grad():
        xt = torch.cat([x, torch.ones(30, 1, dtype=torch.float64)], dim=1)  # (weight, bias)
        xq = torch.stack([torch.cat([q[0], torch.ones(1, dtype=torch.float64)])
                          for q in queries])
        rt = y - model(x)[:, 0]  # residuals y - f
        rq = torch.tensor([q[1] for q in queries], dtype=torch.float64) - model(xq[:, :4])[:, 0]
        h_inv = torch.linalg.inv(xt.T @ xt + lam * torch.eye(5, dtype=torch.float64))
        expected = (rq[:, None] * xq) @ h_inv @ (xt * rt[:, None]).T  # (3, 30)

    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-6, atol=1e-10)


def test_zero_damping_on_a_singular_kernel_is_refused():
    train, query = _data(n=10)
    model = _mlp(0, train)  # 74 parameters, 10 records: Phi^T Phi has rank <= 10
    with pytest.raises(ConfigError, match="damping"):
        trak_scores(model, TASK, train, [query],
                    settings=TrakSettings(projection_dim=0, damping=0.0))


def test_a_non_finite_record_raises_numerical_error_naming_it():
    train, query = _data()
    model = _mlp(0, train)
    train[13] = (torch.full((6,), float("nan")), 0)

    with pytest.raises(NumericalError, match="train record 13"):
        trak_scores(model, TASK, train, [query], settings=SETTINGS)


def test_a_far_too_small_projection_warns():
    train, query = _data()
    with pytest.warns(LowDimensionWarning, match="projection_dim = 8"):
        trak_scores(_mlp(0, train), TASK, train, [query],
                    settings=TrakSettings(projection_dim=8))


def test_train_mode_is_restored_and_does_not_change_the_scores():
    train, query = _data()
    model = _mlp(0, train)
    noisy = torch.nn.Sequential(torch.nn.Dropout(0.5), *model)
    noisy.train()
    a = trak_scores(noisy, TASK, train, [query], settings=SETTINGS).scores
    b = trak_scores(noisy, TASK, train, [query], settings=SETTINGS).scores

    assert noisy.training and noisy[0].training
    np.testing.assert_array_equal(a, b)


def test_lm_copy_of_the_query_ranks_first():
    model = tiny_lm()
    seqs = [[5, 9, 14, 3, 7, 11], [20, 21, 22], [30, 31, 32, 33, 34, 35], [40, 41, 42, 43],
            [5, 9, 14, 3, 8, 12], [50, 60, 70, 80, 90]]
    query = {"input_ids": [1, 5, 9, 14, 3, 7, 11], "labels": [-100, -100, 9, 14, 3, 7, 11]}
    train = seqs + [query["input_ids"]]
    result = trak_scores(model, LMTask(), train, [query],
                         settings=TrakSettings(projection_dim=256, batch_size=3))

    assert int(np.argmax(result.scores[0])) == len(train) - 1
    assert np.isfinite(result.scores).all()


def test_invalid_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="projection_dim"):
        TrakSettings(projection_dim=-1)
    with pytest.raises(ConfigError, match="damping"):
        TrakSettings(damping=-1.0)
    with pytest.raises(ConfigError, match="'rel' is not one of"):
        TrakSettings(damping_scale="rel")
    assert TrakSettings(per_example="loop").per_example is PerExample.LOOP
    with pytest.raises(ConfigError, match="at least one model"):
        trak_scores([], TASK, [(torch.zeros(6), 0)], [(torch.zeros(6), 0)])
