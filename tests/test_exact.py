"""The exact (replay) mode: metagradients against finite differences and real retraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from harmtrace.attribute.exact import (
    LRSchedule,
    Optimizer,
    ReplaySpec,
    exact_scores,
    replay_memory_bytes,
    train_weighted,
)
from harmtrace.attribute.task import ClassificationTask, LMTask
from harmtrace.errors import ConfigError, NumericalError
from helpers import tiny_lm

TASK = ClassificationTask()


pytestmark = pytest.mark.usefixtures("one_thread")


def _logistic_data(n: int = 40, d: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 3, d, generator=gen, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    examples = [(x[i], int(y[i])) for i in range(n + 3)]
    return examples[:n], examples[n:]


def _linear() -> torch.nn.Module:
    return torch.nn.Linear(5, 2).double()


def _query_losses(model: torch.nn.Module, queries) -> np.ndarray:
    batch = TASK.collate(queries)
    with torch.no_grad():
        return TASK.query_loss(model, {"x": batch["x"].double(), "y": batch["y"]}).numpy()


def _loss_after(spec, factory, train, queries, weights) -> np.ndarray:
    return _query_losses(train_weighted(spec, factory, TASK, train, weights), queries)


class _WithUnused(torch.nn.Module):
    """A linear model plus a parameter that never receives a gradient (Adam's v stays 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(5, 2).double()
        self.unused = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


OPTIMISERS = {
    "sgd": (ReplaySpec(lr=0.5, epochs=3, batch_size=8, momentum=0.9, weight_decay=1e-2,
                       schedule=LRSchedule.COSINE, warmup_steps=2), _linear),
    "adamw_clipped": (ReplaySpec(lr=0.05, epochs=3, batch_size=8, optimizer=Optimizer.ADAMW,
                                 weight_decay=0.1, max_grad_norm=0.5,
                                 schedule=LRSchedule.LINEAR), _WithUnused),
    "adam": (ReplaySpec(lr=0.05, epochs=2, batch_size=8, optimizer="adam",
                        weight_decay=0.01), _linear),
}


@pytest.mark.parametrize("name", list(OPTIMISERS))
def test_metagradient_equals_finite_difference_of_query_loss(name):
    train, queries = _logistic_data()
    spec, factory = OPTIMISERS[name]
    scores = exact_scores(spec, factory, TASK, train, queries)
    assert np.isfinite(scores).all()
    h = 1e-5
    for j in (0, 7, 31):
        up, down = np.ones(len(train)), np.ones(len(train))
        up[j] += h
        down[j] -= h
        fd = -(_loss_after(spec, factory, train, queries, up)
               - _loss_after(spec, factory, train, queries, down)) / (2 * h)
        np.testing.assert_allclose(scores[:, j], fd, rtol=1e-4, atol=1e-9)


def test_metagradient_of_a_tiny_causal_lm_with_tied_embeddings_equals_finite_difference():
    task = LMTask()

    def factory() -> torch.nn.Module:
        return tiny_lm().double()

    train = [[5, 9, 14, 3, 7, 11], [20, 21, 22], [30, 31, 32, 33, 34, 35], [40, 41, 42, 43],
             [5, 9, 14, 3, 8]]
    query = [{"input_ids": [5, 9, 14, 3, 7], "labels": [-100, -100, 14, 3, 7]}]
    spec = ReplaySpec(lr=0.05, epochs=2, batch_size=2)
    scores = exact_scores(spec, factory, task, train, query)

    def loss(weights) -> float:
        model = train_weighted(spec, factory, task, train, weights)
        with torch.no_grad():
            return float(task.query_loss(model, task.collate(query))[0])

    h = 1e-5
    for j in (0, 4):
        up, down = np.ones(len(train)), np.ones(len(train))
        up[j] += h
        down[j] -= h
        fd = -(loss(up) - loss(down)) / (2 * h)
        assert scores[0, j] == pytest.approx(fd, rel=1e-4)
    assert scores[0, 0] > 0  # the record holding the query's tokens helped it


def test_metagradient_predicts_leave_one_out_change_of_a_short_training():
    train, queries = _logistic_data()
    spec = ReplaySpec(lr=0.05, epochs=1, batch_size=10)
    scores = exact_scores(spec, _linear, TASK, train, queries)
    base = _loss_after(spec, _linear, train, queries, np.ones(len(train)))
    actual = np.zeros_like(scores)
    for j in range(len(train)):
        w = np.ones(len(train))
        w[j] = 0.0
        actual[:, j] = _loss_after(spec, _linear, train, queries, w) - base
    # removing record j raises the query loss by about scores[:, j]; what remains is the
    # second-order term, about 1% of the effect at this learning rate
    assert np.abs(scores).max() > 1e-3
    assert np.abs(actual - scores).max() <= 0.02 * np.abs(scores).max()
    assert np.linalg.norm(actual - scores) <= 0.01 * np.linalg.norm(scores)


def test_removing_one_percent_subsets_has_lds_spearman_at_least_0_9_on_digits_mlp():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0)
    train = [(x[i], int(y[i])) for i in range(200)]
    queries = [(x[i], int(y[i])) for i in range(1000, 1005)]

    def mlp() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(),
                                   torch.nn.Linear(32, 10)).double()

    spec = ReplaySpec(lr=0.2, epochs=4, batch_size=50, momentum=0.9, init_seed=1)
    scores = exact_scores(spec, mlp, TASK, train, queries)
    base = _loss_after(spec, mlp, train, queries, np.ones(len(train)))
    rng = np.random.default_rng(0)
    predicted, actual = [], []
    for _ in range(30):
        removed = rng.choice(len(train), 2, replace=False)  # 1% of 200 records
        w = np.ones(len(train))
        w[removed] = 0.0
        actual.append(_loss_after(spec, mlp, train, queries, w) - base)
        predicted.append(scores[:, removed].sum(axis=1))
    predicted, actual = np.array(predicted), np.array(actual)  # (30 subsets, 5 queries)
    rho = [spearmanr(predicted[:, i], actual[:, i])[0] for i in range(len(queries))]

    assert min(rho) >= 0.9, rho


def test_train_weighted_is_bit_identical_for_the_same_spec_and_weights():
    train, _ = _logistic_data()
    spec = ReplaySpec(lr=0.3, epochs=2, batch_size=7, momentum=0.5, seed=4)
    w = np.linspace(0.0, 2.0, len(train))
    a = train_weighted(spec, _linear, TASK, train, w).state_dict()
    b = train_weighted(spec, _linear, TASK, train, w).state_dict()

    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_zero_weight_makes_a_record_content_irrelevant():
    train, _ = _logistic_data()
    spec = ReplaySpec(lr=0.3, epochs=2, batch_size=8, momentum=0.9)
    w = np.ones(len(train))
    w[5] = 0.0
    changed = list(train)
    changed[5] = (torch.full((5,), 7.0, dtype=torch.float64), 1 - train[5][1])
    a = train_weighted(spec, _linear, TASK, train, w).state_dict()
    b = train_weighted(spec, _linear, TASK, changed, w).state_dict()

    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_unit_weights_reproduce_torch_sgd_on_the_same_batches():
    train, _ = _logistic_data()
    spec = ReplaySpec(lr=0.3, epochs=2, batch_size=8, momentum=0.9, weight_decay=0.01,
                      init_seed=3)
    ours = train_weighted(spec, _linear, TASK, train, np.ones(len(train)))

    torch.manual_seed(3)
    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=0.01)
    for rows in spec.batches(len(train)):
        batch = TASK.collate([train[int(i)] for i in rows])
        opt.zero_grad()
        TASK.train_loss(model, {"x": batch["x"].double(), "y": batch["y"]}).mean().backward()
        opt.step()

    for (name, p), q in zip(ours.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=name)


def test_unit_weights_reproduce_torch_adamw_with_gradient_clipping():
    train, _ = _logistic_data()
    spec = ReplaySpec(lr=0.05, epochs=2, batch_size=8, optimizer=Optimizer.ADAMW,
                      weight_decay=0.1, max_grad_norm=0.3, init_seed=2)
    ours = train_weighted(spec, _linear, TASK, train, np.ones(len(train)))

    torch.manual_seed(2)
    model = _linear()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    for rows in spec.batches(len(train)):
        batch = TASK.collate([train[int(i)] for i in rows])
        opt.zero_grad()
        TASK.train_loss(model, {"x": batch["x"].double(), "y": batch["y"]}).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
        opt.step()

    for (name, p), q in zip(ours.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)


def test_learning_rate_schedules_have_their_closed_form():
    spec = ReplaySpec(lr=1.0, schedule=LRSchedule.LINEAR, warmup_steps=2)
    assert [spec.lr_at(t, 6) for t in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    cosine = ReplaySpec(lr=2.0, schedule=LRSchedule.COSINE)
    assert cosine.lr_at(2, 4) == pytest.approx(1.0)


def test_replay_larger_than_the_memory_limit_is_refused_naming_the_setting():
    train, queries = _logistic_data()
    spec = ReplaySpec(lr=0.1, epochs=2, batch_size=8)
    need = replay_memory_bytes(spec, _linear, TASK, train)
    assert need > 0

    with pytest.raises(ConfigError, match=r"GiB.*ReplaySpec.epochs"):
        exact_scores(spec, _linear, TASK, train, queries, max_graph_bytes=need - 1)


def test_a_non_finite_record_stops_training_with_numerical_error():
    train, queries = _logistic_data()
    train[3] = (torch.full((5,), float("nan"), dtype=torch.float64), 0)
    spec = ReplaySpec(lr=0.1, epochs=2, batch_size=8)

    with pytest.raises(NumericalError, match="train record 3 is not finite"):
        train_weighted(spec, _linear, TASK, train, np.ones(len(train)))
    with pytest.raises(NumericalError, match="train record 3 is not finite"):
        exact_scores(spec, _linear, TASK, train, queries)


def test_weights_of_the_wrong_shape_are_refused():
    train, _ = _logistic_data()
    with pytest.raises(ConfigError, match=r"shape \(40,\)"):
        train_weighted(ReplaySpec(lr=0.1), _linear, TASK, train, np.ones(39))


def test_models_with_dropout_are_not_replayable():
    def dropout_model() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(5, 2)).double()

    train, queries = _logistic_data()
    with pytest.raises(ConfigError, match="dropout"):
        exact_scores(ReplaySpec(lr=0.1), dropout_model, TASK, train, queries)


def test_invalid_spec_values_are_refused_by_name():
    with pytest.raises(ConfigError, match="ReplaySpec.lr"):
        ReplaySpec(lr=0.0)
    with pytest.raises(ConfigError, match="ReplaySpec.momentum"):
        ReplaySpec(lr=0.1, momentum=1.0)
    with pytest.raises(ConfigError, match="SGD only"):
        ReplaySpec(lr=0.1, momentum=0.9, optimizer=Optimizer.ADAM)
    with pytest.raises(ConfigError, match="'lion' is not one of"):
        ReplaySpec(lr=0.1, optimizer="lion")


def test_train_weighted_replays_harmtraces_own_lm_training():
    from dataclasses import replace

    from harmtrace.models.lm import build_lm, train_lm
    from helpers import CORPUS, TINY, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    settings = replace(TINY, epochs=2, batch_size=4, learning_rate=5e-3, weight_decay=0.01,
                       warmup_fraction=0.25, n_checkpoints=1)
    sequences = [tokenizer(text)["input_ids"] for text in CORPUS[:10]]
    theirs = train_lm(sequences, tokenizer, settings, seed=7).model

    gen = torch.Generator().manual_seed(7)  # train_lm's data order
    order = []
    for _ in range(settings.epochs):
        perm = torch.randperm(len(sequences), generator=gen).tolist()
        order += [tuple(perm[s : s + 4]) for s in range(0, len(sequences), 4)]
    spec = ReplaySpec(lr=5e-3, init_seed=7, optimizer=Optimizer.ADAMW, weight_decay=0.01,
                      max_grad_norm=1.0, schedule=LRSchedule.COSINE, warmup_steps=1,
                      normalisation="tokens", batch_order=tuple(order))
    ours = train_weighted(spec, lambda: build_lm(settings, tokenizer), LMTask(), sequences,
                          np.ones(len(sequences)))

    torch.manual_seed(7)
    initial = build_lm(settings, tokenizer)
    pairs = zip(ours.parameters(), initial.parameters(), strict=True)
    moved = [not torch.allclose(p, q, atol=1e-4) for p, q in pairs]
    assert sum(moved) > len(moved) // 2  # the training did move the weights
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
