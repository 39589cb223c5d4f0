"""Attribution scores have the documented sign and scale; roll-ups are consistent."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from harmtrace.attribute.gradients import sequence_loss
from harmtrace.attribute.methods import AttributionInputs, compute_scores, method_names
from harmtrace.attribute.rollup import auprc, rollup_sources, top_k
from harmtrace.attribute.triangulate import method_agreement
from harmtrace.behaviours.focus import FocusedQuery
from harmtrace.errors import ConfigError
from harmtrace.models.lm import LMSettings, encode_texts, train_lm
from helpers import CORPUS, tiny_lm, tiny_tokenizer

TEXTS = list(CORPUS[:16])
QUERY_RECORD = 3


def _query(seq: list[int], words: str = "") -> FocusedQuery:
    # every token after the first is a target, as for a train record
    return FocusedQuery(tuple(seq), (False,) + (True,) * (len(seq) - 1), words, False)


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, list[list[int]]]:
    """A tiny LM trained for 16 steps on 16 records, and those records' token ids."""
    # Cut to 12 tokens: one length means one vmap call per gradient pass (keeps tests fast).
    seqs = encode_texts(tiny_tokenizer(), TEXTS, max_length=12)
    assert {len(s) for s in seqs} == {12} and len(set(map(tuple, seqs))) == len(seqs)
    settings = LMSettings(n_layer=1, n_embd=32, n_head=2, vocab_size=300, max_length=32,
                          epochs=4, batch_size=4, learning_rate=5e-3, n_checkpoints=1)
    return train_lm(seqs, tiny_tokenizer(), settings, seed=0).model, seqs


def _inputs(model, seqs, *, dim: int = 0, checkpoints=None) -> AttributionInputs:
    return AttributionInputs(
        train_sequences=seqs, train_texts=TEXTS, queries=[_query(seqs[QUERY_RECORD])],
        checkpoints=checkpoints or [(model, 1.0)], projection_dim=dim,
    )


def _query_loss(model, seq: list[int]) -> float:
    ids = torch.tensor([seq])
    with torch.no_grad():
        return float(sequence_loss(model(input_ids=ids).logits[0], ids[0]))


def _sgd_step(model, seq: list[int], lr: float) -> torch.nn.Module:
    """A copy of ``model`` after one plain SGD step on the summed loss of ``seq``."""
    stepped = copy.deepcopy(model).eval()
    ids = torch.tensor([seq])
    loss = sequence_loss(stepped(input_ids=ids).logits[0], ids[0])
    grads = torch.autograd.grad(loss, list(stepped.parameters()))
    with torch.no_grad():
        for param, grad in zip(stepped.parameters(), grads, strict=True):
            param -= lr * grad
    return stepped


def test_gradcos_ranks_the_verbatim_train_copy_of_the_query_first(trained) -> None:
    model, seqs = trained
    scores = compute_scores("gradcos", _inputs(model, seqs))
    assert scores.shape == (1, len(seqs))
    assert int(scores[0].argmax()) == QUERY_RECORD
    assert scores[0, QUERY_RECORD] == pytest.approx(1.0, abs=1e-5)


def test_graddot_is_minus_the_first_order_change_of_query_loss_per_unit_lr(trained) -> None:
    model, seqs = trained
    scores = compute_scores("graddot", _inputs(model, seqs))[0]
    helpful, harmful = QUERY_RECORD, int(scores.argmin())
    assert scores[helpful] > 0 > scores[harmful]  # both signs are exercised

    lr = 1e-3
    before = _query_loss(model, seqs[QUERY_RECORD])
    for j in (helpful, harmful):
        after = _query_loss(_sgd_step(model, seqs[j], lr), seqs[QUERY_RECORD])
        lowered = (before - after) / lr  # positive: the step on record j lowered query loss
        assert np.sign(lowered) == np.sign(scores[j])
        assert lowered == pytest.approx(scores[j], rel=0.1)


def test_tracin_is_the_lr_weighted_sum_of_per_checkpoint_graddot(trained) -> None:
    model, seqs = trained
    early = tiny_lm(seed=1)
    checkpoints = [(early, 0.3), (model, 0.7)]
    tracin = compute_scores("tracin", _inputs(model, seqs, dim=64, checkpoints=checkpoints))
    per_checkpoint = [
        compute_scores("graddot", _inputs(m, seqs, dim=64, checkpoints=[(m, lr)]))
        for m, lr in checkpoints
    ]
    expected = 0.3 * per_checkpoint[0] + 0.7 * per_checkpoint[1]
    np.testing.assert_allclose(tracin, expected, rtol=1e-5, atol=1e-4)
    assert not np.allclose(per_checkpoint[0], per_checkpoint[1])


def test_bm25_scores_the_record_holding_the_query_words_highest_and_never_negative() -> None:
    queries = [_query([1, 2, 3], words="purple elephant"), _query([1, 2, 3], words="the")]
    inputs = AttributionInputs(train_sequences=[], train_texts=TEXTS + [CORPUS[18]],
                               queries=queries, checkpoints=[])
    scores = compute_scores("bm25", inputs)
    assert scores.shape == (2, len(TEXTS) + 1)
    assert int(scores[0].argmax()) == len(TEXTS)
    assert scores[0, len(TEXTS)] > 0
    assert (scores >= 0).all()
    assert (scores[1] == 0).all()  # a query of stop words only matches nothing


def test_unknown_method_is_a_config_error_listing_the_methods() -> None:
    inputs = AttributionInputs(train_sequences=[], train_texts=[], queries=[], checkpoints=[])
    with pytest.raises(ConfigError, match="nosuch") as info:
        compute_scores("nosuch", inputs)
    for name in method_names():
        assert name in str(info.value)


def _planted_scores() -> tuple[np.ndarray, list[str]]:
    """20 queries x 30 records; records 10..19 (source "b") score about 1, others about 0."""
    rng = np.random.default_rng(0)
    sources = ["a"] * 10 + ["b"] * 10 + ["c"] * 10
    scores = rng.normal(0, 0.3, size=(20, 30))
    scores[:, 10:20] += 1.0
    return scores, sources


def test_rollup_ranks_the_planted_source_first_with_consistent_fields() -> None:
    scores, sources = _planted_scores()
    rows = rollup_sources(scores, sources, k=10, n_boot=500, seed=0)

    assert [r["source"] for r in rows][0] == "b"
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    for row in rows:
        lo, hi = row["ci"]
        assert lo <= row["score"] <= hi
        assert row["n_records"] == 10
    assert sum(r["share_topk"] for r in rows) == pytest.approx(1.0)
    assert rows[0]["share_topk"] > 0.8
    b_mean = scores[:, 10:20].mean()
    assert rows[0]["score"] == pytest.approx(b_mean)


def test_top_k_breaks_ties_by_record_index() -> None:
    scores = np.zeros((3, 8))
    scores[:, 5] = 1.0
    first = top_k(scores, 4)
    np.testing.assert_array_equal(first, [5, 0, 1, 2])
    np.testing.assert_array_equal(top_k(scores.copy(), 4), first)


def test_auprc_is_average_precision_of_mean_scores() -> None:
    scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.9, 0.8, 0.7, 0.1]])
    labels = [1, 0, 1, 0]
    # ranks 1 and 3 are positives: precision 1/1 and 2/3
    assert auprc(scores, labels) == pytest.approx((1 + 2 / 3) / 2)

    planted, _ = _planted_scores()
    planted_labels = [0] * 10 + [1] * 10 + [0] * 10
    expected = average_precision_score(planted_labels, planted.mean(axis=0))
    assert auprc(planted, planted_labels) == pytest.approx(expected)


def test_a_method_agrees_perfectly_with_itself() -> None:
    scores, _ = _planted_scores()
    other = np.random.default_rng(1).normal(size=scores.shape)
    pairs = method_agreement({"a": scores, "a-copy": scores.copy(), "noise": other}, k=5)
    rows = [p.as_dict() for p in pairs]
    same = next(r for r in rows if {r["a"], r["b"]} == {"a", "a-copy"})
    assert same["spearman"] == pytest.approx(1.0)
    assert same["topk_share"] == 1.0
    noisy = next(r for r in rows if {r["a"], r["b"]} == {"a", "noise"})
    assert noisy["spearman"] < 0.9


@pytest.mark.parametrize("kind", ["diagonal", "adam"])
def test_preconditioned_dot_equals_the_weighted_inner_product(trained, kind) -> None:
    from harmtrace.attribute.gradients import per_example_gradients, trainable_parameters
    from harmtrace.attribute.projection import GaussianProjector

    model, seqs = trained
    inputs = _inputs(model, seqs)
    inputs.preconditioner, inputs.damping = kind, 0.01
    scores = compute_scores("graddot", inputs)[0]

    params = trainable_parameters(model)
    projector = GaussianProjector({n: p.shape for n, p in params.items()}, dim=0, seed=0)
    grads = per_example_gradients(model, seqs, projector=projector).double()  # (n, P)
    fisher = (grads**2).mean(dim=0)
    base = fisher if kind == "diagonal" else fisher.sqrt()
    weights = 1.0 / (base + 0.01 * base.mean())
    expected = (grads * weights) @ grads[QUERY_RECORD]
    np.testing.assert_allclose(scores, expected.numpy(), rtol=2e-3, atol=1e-6)


def test_preconditioned_cosine_of_a_record_with_itself_is_one(trained) -> None:
    model, seqs = trained
    inputs = _inputs(model, seqs)
    inputs.preconditioner = "adam"
    scores = compute_scores("gradcos", inputs)[0]
    assert scores[QUERY_RECORD] == pytest.approx(1.0, abs=1e-5)
    assert int(scores.argmax()) == QUERY_RECORD


def test_an_unknown_preconditioner_is_a_config_error(trained) -> None:
    model, seqs = trained
    inputs = _inputs(model, seqs)
    inputs.preconditioner = "kfac?"
    with pytest.raises(ConfigError, match="preconditioner"):
        compute_scores("graddot", inputs)
