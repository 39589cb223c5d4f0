"""Streamed block scoring, top-k (FAISS and torch), aggregation, per-token scores."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from harmtrace.attribute.gradients import per_example_gradients, trainable_parameters
from harmtrace.attribute.projection import GaussianProjector
from harmtrace.attribute.scoring import (
    TopKBackend,
    TopKSettings,
    aggregate_queries,
    per_token_scores,
    score_blocks,
    token_examples,
    topk,
)
from harmtrace.attribute.store import FeatureStore, FeatureStoreWriter
from harmtrace.errors import ArtifactError, ConfigError, NumericalError
from helpers import tiny_lm


def _gauss(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _store(path, features: torch.Tensor, shard_rows: int = 3000) -> FeatureStore:
    with FeatureStoreWriter(path, dim=features.shape[1], n_rows=features.shape[0],
                            dtype="float32", shard_rows=shard_rows,
                            metadata={"test": True}) as writer:
        writer.append(range(features.shape[0]), features)
    return FeatureStore.open(path)


def _peak_bytes(fn) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_scores_on_disk_do_not_depend_on_block_size_and_memory_follows_block(tmp_path):
    # PITFALLS.md #5: 20,000 train x 5,000 query records
    n_train, n_query, d = 20_000, 5_000, 8
    store = _store(tmp_path / "train", _gauss(n_train, d, seed=1))
    query = _gauss(n_query, d, seed=2)
    small, peak_small = _peak_bytes(lambda: score_blocks(
        query, store, out=tmp_path / "a.npy", block_rows=500))
    large, peak_large = _peak_bytes(lambda: score_blocks(
        query, store, out=tmp_path / "b.npy", block_rows=2_000))

    assert small.shape == large.shape == (n_query, n_train)
    for start in range(0, n_query, 1000):  # compared in slices: never the whole product
        assert np.array_equal(small[start : start + 1000], large[start : start + 1000])
    expected = query[:7].numpy() @ store.read(0, n_train).numpy().T
    np.testing.assert_allclose(small[:7], expected, rtol=1e-5, atol=1e-5)

    product = 4 * n_query * n_train  # 400 MB, had the matrix been held in memory
    block_small = 4 * n_query * 500  # one block of scores
    assert peak_small < 2 * block_small + (1 << 20)
    assert peak_large > 2 * peak_small  # memory grows with the block...
    assert peak_large < 2 * 4 * n_query * 2_000 + (1 << 20)  # ...and stays a few blocks,
    assert peak_large < product / 4  # far from the product


def test_in_memory_scores_equal_a_direct_product_for_any_block_order():
    query, train = _gauss(4, 6, seed=3), _gauss(50, 6, seed=4)
    order = np.random.default_rng(0).permutation(50)
    blocks = [(order[i : i + 9].tolist(), train[order[i : i + 9]]) for i in range(0, 50, 9)]
    scores = score_blocks(query, blocks, n_train=50)
    np.testing.assert_allclose(scores, (query @ train.T).numpy(), rtol=1e-6, atol=1e-6)


def test_budget_error_names_block_rows_with_a_size_that_fits(tmp_path):
    query = _gauss(1000, 16)
    blocks = [(range(10), _gauss(10, 16))]
    with pytest.raises(ConfigError, match="lower block_rows to (\\d+)") as info:
        score_blocks(query, blocks, n_train=100_000, out=tmp_path / "s.npy",
                     block_rows=50_000, max_bytes=64 << 20)
    fit = int(info.value.args[0].split("lower block_rows to ")[1].split()[0])
    assert 1 <= fit < 50_000
    with pytest.raises(ConfigError, match="out=PATH"):
        score_blocks(query, blocks, n_train=100_000, block_rows=100, max_bytes=64 << 20)


def test_nan_train_feature_raises_naming_the_record_and_leaves_no_score_file(tmp_path):
    train = _gauss(30, 4)
    train[17, 2] = float("nan")
    blocks = [(list(range(i, i + 10)), train[i : i + 10]) for i in range(0, 30, 10)]
    with pytest.raises(NumericalError, match="train record 17"):
        score_blocks(_gauss(2, 4), blocks, n_train=30, out=tmp_path / "s.npy")
    assert list(tmp_path.iterdir()) == []


def test_nan_query_raises_naming_the_query():
    query = _gauss(3, 4)
    query[1, 0] = float("inf")
    with pytest.raises(NumericalError, match="query 1"):
        score_blocks(query, [(range(5), _gauss(5, 4))], n_train=5)


def test_missing_and_repeated_rows_are_errors():
    q = _gauss(2, 3)
    with pytest.raises(ArtifactError, match="record 4 never arrived"):
        score_blocks(q, [(range(4), _gauss(4, 3))], n_train=5)
    with pytest.raises(ConfigError, match="row 2 arrived twice"):
        score_blocks(q, [(range(3), _gauss(3, 3)), ([2, 3], _gauss(2, 3))], n_train=5)


def test_faiss_and_torch_topk_agree_on_small_data(tmp_path):
    train, query = _gauss(700, 12, seed=5), _gauss(9, 12, seed=6)
    store = _store(tmp_path / "s", train, shard_rows=256)
    by_faiss = topk(store, 10, query=query, block_rows=300,
                    settings=TopKSettings(backend=TopKBackend.FAISS))
    by_torch = topk(store, 10, query=query, block_rows=128,
                    settings=TopKSettings(backend="torch"))
    assert by_faiss.backend == "faiss" and by_torch.backend == "torch"
    assert np.array_equal(by_faiss.indices, by_torch.indices)
    np.testing.assert_allclose(by_faiss.values, by_torch.values, rtol=1e-5, atol=1e-5)
    # and both equal a full sort of the dense score matrix
    dense = (query @ train.T).numpy()
    assert np.array_equal(by_torch.indices, np.argsort(-dense, axis=1)[:, :10])
    from_matrix = topk(dense, 10, block_rows=64)
    assert np.array_equal(from_matrix.indices, by_torch.indices)


def test_ivf_topk_with_every_cell_probed_equals_exact():
    train, query = _gauss(2_000, 8, seed=7), _gauss(5, 8, seed=8)
    ivf = topk(train, 5, query=query, block_rows=500, settings=TopKSettings(
        backend=TopKBackend.FAISS, approximate_above=1_000, nlist=16, nprobe=16))
    exact = topk(train, 5, query=query, settings=TopKSettings(backend=TopKBackend.TORCH))
    assert ivf.approximate and not exact.approximate
    assert np.array_equal(ivf.indices, exact.indices)


def test_topk_breaks_ties_by_lower_row():
    scores = np.array([[1.0, 3.0, 3.0, 2.0, 3.0]], dtype=np.float32)
    assert topk(scores, 3, block_rows=2).indices.tolist() == [[1, 2, 4]]


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="'fast' is unknown"):
        TopKSettings(backend="fast")


def test_aggregate_is_the_mean_over_each_behaviours_queries(tmp_path):
    scores = _gauss(6, 11).numpy()
    groups = ["b", "a", "b", "a", "a", "c"]
    names, agg = aggregate_queries(scores, groups, out=tmp_path / "agg.npy", block_rows=4)
    assert names == ["a", "b", "c"]
    np.testing.assert_allclose(agg[0], scores[[1, 3, 4]].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(agg[1], scores[[0, 2]].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(agg[2], scores[5], rtol=1e-6)


def test_token_examples_label_one_target_each():
    positions, examples = token_examples({"input_ids": [5, 6, 7, 8],
                                          "labels": [-100, -100, 7, 8]})
    assert positions == [2, 3]
    assert [e["labels"] for e in examples] == [[-100, -100, 7, -100], [-100, -100, -100, 8]]
    with pytest.raises(ConfigError, match="no target token"):
        token_examples({"input_ids": [1, 2], "labels": [1, -100]})


def test_per_token_scores_sum_to_the_sequence_score():
    model = tiny_lm(seed=0)
    params = trainable_parameters(model)
    projector = GaussianProjector({n: p.shape for n, p in params.items()}, dim=64, seed=1)
    query = {"input_ids": [3, 17, 40, 9, 12, 5], "labels": [-100, -100, 40, 9, 12, 5]}
    positions, examples = token_examples(query)
    masks = [[lab != -100 for lab in e["labels"]] for e in [query, *examples]]
    grads = per_example_gradients(model, [query["input_ids"]] * len(masks),
                                  projector=projector, target_masks=masks)
    train = per_example_gradients(model, [[1, 2, 3, 4], [7, 8, 9], [40, 9, 12, 5, 6]],
                                  projector=projector)
    sequence = score_blocks(grads[:1], [(range(3), train)], n_train=3)
    tokens = per_token_scores(grads[1:], [(range(3), train)], n_train=3)
    assert tokens.shape == (len(positions), 3)
    np.testing.assert_allclose(tokens.sum(axis=0), sequence[0], rtol=1e-4, atol=1e-5)
