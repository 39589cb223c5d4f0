"""Representation similarity: copies rank first, cosines are bounded, the representation is
the documented hidden vector, and the model is left as it was handed over."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harmtrace.attribute.repsim import default_layer, representations, repsim_scores
from harmtrace.attribute.task import ClassificationTask, LMTask
from harmtrace.errors import ConfigError, InputDataError, NumericalError
from helpers import tiny_lm

TASK = ClassificationTask()


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _examples(n: int = 30, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    return [(x[i], i % 3) for i in range(n)]


def test_a_copy_of_the_query_ranks_first():
    train = _examples()
    query = _examples(1, seed=5)[0]
    train = train[:11] + [query] + train[11:]
    scores = repsim_scores(_mlp(), TASK, train, [query])

    assert int(np.argmax(scores[0])) == 11
    assert np.sum(scores[0] == scores[0, 11]) == 1


def test_cosine_is_in_minus_one_to_one_and_one_for_the_copy():
    train = _examples()
    scores = repsim_scores(_mlp(), TASK, train, train[:5])

    assert scores.shape == (5, 30) and scores.dtype == np.float64
    assert (scores >= -1).all() and (scores <= 1).all()
    np.testing.assert_allclose(np.diag(scores[:, :5]), 1.0, rtol=0, atol=1e-12)


def test_generic_representation_is_the_input_of_the_last_linear():
    model = _mlp()
    train = _examples()
    x = torch.stack([e[0] for e in train])
    with torch.no_grad():
        hidden = torch.tanh(model[0](x)).double()  # (30, 8): what enters model[2]
    dots = repsim_scores(model, TASK, train, train[:4], normalise=False)

    assert default_layer(model) == "2"
    np.testing.assert_allclose(dots, (hidden[:4] @ hidden.T).numpy(), rtol=1e-5, atol=1e-6)


def test_lm_representation_is_the_mean_last_hidden_state_over_labelled_tokens():
    model = tiny_lm()
    query = {"input_ids": [5, 9, 14, 3, 7], "labels": [-100, -100, 14, 3, 7]}
    reps = representations(model, LMTask(), [query], query=True)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([query["input_ids"]]), output_hidden_states=True)
    expected = out.hidden_states[-1][0, 2:].double().mean(dim=0)

    torch.testing.assert_close(reps[0], expected, rtol=1e-5, atol=1e-6)


def test_lm_scores_do_not_depend_on_padding_and_the_copy_ranks_first():
    model = tiny_lm()
    train = [[5, 9, 14, 3, 7, 11], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37],
             [40, 41, 42, 43], [1, 5, 9, 14, 3, 7, 11]]
    query = [1, 5, 9, 14, 3, 7, 11]
    alone = repsim_scores(model, LMTask(), train, [query], batch_size=1)
    padded = repsim_scores(model, LMTask(), train, [query], batch_size=5)

    np.testing.assert_allclose(padded, alone, rtol=1e-5, atol=1e-6)
    assert int(np.argmax(alone[0])) == 4


def test_model_mode_is_restored_and_the_hook_removed():
    model = torch.nn.Sequential(torch.nn.Dropout(0.5), *_mlp())
    model.train()
    train = _examples()
    a = repsim_scores(model, TASK, train, train[:3])
    b = repsim_scores(model, TASK, train, train[:3])

    assert model.training and model[0].training
    assert not model[3]._forward_pre_hooks
    np.testing.assert_array_equal(a, b)  # dropout was off


def test_a_zero_representation_is_refused_naming_the_record():
    model = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(6, 3))
    train = _examples()
    train[7] = (-torch.ones(6), 0)  # ReLU input -> zero vector into the Linear

    with pytest.raises(NumericalError, match="train record 7 is zero"):
        repsim_scores(model, TASK, train, train[:2])


def test_a_non_finite_representation_is_refused_naming_the_record():
    train = _examples()
    train[4] = (torch.full((6,), float("nan")), 0)

    with pytest.raises(NumericalError, match="train record 4"):
        repsim_scores(_mlp(), TASK, train, train[:2])


def test_unknown_layer_and_unlabelled_lm_query_are_refused():
    with pytest.raises(ConfigError, match="'nope'"):
        repsim_scores(_mlp(), TASK, _examples(), _examples(2), layer="nope")
    query = {"input_ids": [5, 9, 14], "labels": [-100, -100, -100]}
    with pytest.raises(InputDataError, match="query record 0"):
        repsim_scores(tiny_lm(), LMTask(), [[5, 9, 14]], [query])
