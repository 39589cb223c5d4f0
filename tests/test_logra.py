"""LoGra projection: dense references, huge tied layers, JL tolerance, dimension sweeps."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

from harmtrace.attribute.logra import (
    LograProjector,
    LograSettings,
    LowProjectionDimWarning,
    check_projection_dim,
    logra_features,
    logra_projector,
    logra_scores,
    logra_token_scores,
    min_projection_dim,
    write_logra_store,
)
from harmtrace.attribute.scoring import score_blocks
from harmtrace.attribute.task import LMTask
from harmtrace.errors import ArtifactError, ConfigError
from helpers import tiny_lm


def _gauss(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_projection_equals_the_kronecker_dense_reference_on_a_small_layer():
    a, g = _gauss(3, 4, 7, seed=1), _gauss(3, 4, 5, seed=2)  # (B, T, d_in), (B, T, d_out)
    proj = LograProjector({"layer": (5, 7)}, LograSettings(k_out=3, k_in=4, seed=9))
    m = proj.modules["layer"]
    grad = torch.einsum("bto,bti->boi", g, a)  # (B, d_out, d_in), materialised for reference
    kron = torch.kron(m.p_out, m.p_in)  # (d_out * d_in, k_out * k_in)
    reference = grad.reshape(3, -1) @ kron
    assert m.dim == 12 and proj.dim == 12
    torch.testing.assert_close(m.linear(a, g), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.dense(grad), reference, rtol=1e-5, atol=1e-5)


def test_a_side_no_wider_than_k_is_kept_exact():
    a, g = _gauss(2, 3, 3, seed=3), _gauss(2, 3, 6, seed=4)
    m = LograProjector({"w": (6, 3)}, LograSettings(k_out=2, k_in=8)).modules["w"]
    assert m.p_in is None and (m.k_out, m.k_in) == (2, 3)
    grad = torch.einsum("bto,bti->boi", g, a)
    expected = torch.einsum("boi,ok->bki", grad, m.p_out).reshape(2, -1)
    torch.testing.assert_close(m.linear(a, g), expected, rtol=1e-5, atol=1e-5)


def test_same_seed_gives_the_same_matrices_whatever_the_module_order():
    settings = LograSettings(k_in=4, k_out=4, seed=3)
    one = LograProjector({"x": (9, 10), "y": (11, 12)}, settings)
    two = LograProjector({"y": (11, 12), "x": (9, 10)}, settings)
    other = LograProjector({"x": (9, 10)}, LograSettings(k_in=4, k_out=4, seed=4))
    assert torch.equal(one.modules["x"].p_in, two.modules["x"].p_in)
    assert torch.equal(one.modules["y"].p_out, two.modules["y"].p_out)
    assert not torch.equal(one.modules["x"].p_in, other.modules["x"].p_in)


def test_projection_preserves_inner_products_within_the_jl_tolerance():
    n, d = 40, 96
    a, g = _gauss(n, 3, d, seed=5), _gauss(n, 3, d, seed=6)
    grads = torch.einsum("bto,bti->boi", g, a).reshape(n, -1).double()  # (n, d*d)
    m = LograProjector({"w": (d, d)}, LograSettings(k_out=64, k_in=64, seed=0)).modules["w"]
    feats = m.linear(a, g).double()  # (n, 4096)
    exact, projected = grads @ grads.T, feats @ feats.T
    norms = grads.norm(dim=1)
    error = (projected - exact).abs() / torch.outer(norms, norms)
    # JL: with k = 8 ln(n) / eps^2, every pairwise product is within eps |x||y|. A
    # Kronecker projection of few-token (low-rank) gradients projects each factor by one
    # side, so its tolerance is that of the narrower side, not of k_out * k_in
    eps = math.sqrt(8 * math.log(n) / min(m.k_out, m.k_in))
    assert error.max() < eps
    # and unbiased: the mean signed error over pairs is far below a single pair's spread
    off = ~torch.eye(n, dtype=torch.bool)
    assert ((projected - exact) / torch.outer(norms, norms))[off].mean().abs() < eps / 10


def _planted(n: int = 2_000, n_query: int = 20, d: int = 128, tokens: int = 4):
    """A synthetic one-layer gradient model: records share a common direction (as real
    gradients do), so the planted copy of each query stands out only by its own part."""
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    a = u + torch.randn(n, tokens, d, generator=gen)  # (n, T, d_in)
    g = v + torch.randn(n, tokens, d, generator=gen)  # (n, T, d_out)
    copies = torch.randperm(n, generator=gen)[:n_query]  # train rows that copy the queries
    return a, g, copies


def test_planted_duplicates_are_recovered_as_the_dimension_grows_and_tiny_dims_warn():
    a, g, copies = _planted()
    n = a.shape[0]
    recovery, dims, warned = [], [], []
    for k_out, k_in in [(2, 4), (4, 4), (8, 8), (16, 16), (32, 32), (64, 64)]:
        projector = LograProjector({"w": (128, 128)},
                                   LograSettings(k_out=k_out, k_in=k_in, seed=1))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warned.append(check_projection_dim(projector.dim, n))
        assert [w.category for w in caught] == [LowProjectionDimWarning] * warned[-1]
        if caught:
            assert caught[0].filename == __file__  # stacklevel points at the caller
            assert str(projector.dim) in str(caught[0].message)
        train = projector.modules["w"].linear(a, g)  # (n, dim)
        query = train[copies]  # the queries are exact copies of the planted records
        top1 = score_blocks(query, [(range(n), train)], n_train=n).argmax(axis=1)
        recovery.append(float(np.mean(top1 == copies.numpy())))
        dims.append(projector.dim)
    assert dims == [8, 16, 64, 256, 1024, 4096]  # the dimension actually used
    assert recovery[0] <= 0.2 and recovery[-1] == 1.0
    assert recovery[-1] >= recovery[3] >= recovery[0]
    assert warned == [True, True, False, False, False, False]
    assert min_projection_dim(n) == math.ceil(8 * math.log(n))


class _TiedLM(torch.nn.Module):
    """Embedding (V, D) tied to the output head, one Linear in between; LM interface."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, width)
        self.body = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.body(self.embed(input_ids))))  # (B, T, V)


def _dense_features(model, task, examples, projector) -> torch.Tensor:
    """Reference: each example's full parameter gradients by autograd, alone, projected."""
    modules = dict(model.named_modules())
    rows = []
    for example in examples:
        batch = task.collate([example])
        blocks = []
        for name, proj in projector.modules.items():
            module = modules[name]
            params = [module.weight] + ([module.bias] if getattr(module, "bias", None)
                                        is not None and name in projector.plan.linear else [])
            grads = torch.autograd.grad(task.train_loss(model, batch).sum(), params)
            weight = grads[0]
            if type(module).__name__ == "Conv1D":
                weight = weight.T  # stored (d_in, d_out): canonical is (d_out, d_in)
            full = weight if len(grads) == 1 else torch.cat([weight, grads[1][:, None]], 1)
            blocks.append(proj.dense(full[None]))
        rows.append(torch.cat(blocks, dim=1))
    return torch.cat(rows)


def test_tied_50000_x_64_embedding_is_projected_without_the_full_matrix():
    # PITFALLS.md #6: the 50,000 x 64 gradient (12.8 MB) is over the 4 MB budget; LoGra's
    # matrices (50,000 x 8 and 64 x 8: 1.6 MB) fit, and the weight is projected once
    model, task = _TiedLM(50_000, 64), LMTask()
    settings = LograSettings(k_in=8, k_out=8, embeddings=True, batch_size=2,
                             max_bytes=4 << 20)
    projector = logra_projector(model, settings)
    assert 50_000 * 64 * 4 > settings.max_bytes
    meta = projector.metadata()
    assert list(meta["modules"]) == ["body", "embed"]
    assert meta["modules"]["embed"]["tied_with"] == ["head"]
    assert meta["modules"]["embed"]["shape"] == [50_000, 64] and meta["dim"] == 2 * 64
    assert meta["parameters"] == ["body.weight", "body.bias", "embed.weight"]  # once
    examples = [[5, 49_999, 17, 3], [8, 8, 2], [40_000, 1, 2, 3, 4]]
    features = torch.cat([f for _, f in logra_features(model, task, examples,
                                                       settings=settings)])
    reference = _dense_features(model, task, examples, projector)
    torch.testing.assert_close(features, reference, rtol=1e-4, atol=1e-5)


def test_features_of_tiny_gpt2_equal_autograd_alone_and_do_not_depend_on_batch_size():
    model, task = tiny_lm(seed=0), LMTask()
    examples = [[3, 17, 40, 9, 12], [7, 8], [40, 9, 12, 5, 6, 100, 2], [1, 2, 3]]
    by_one = LograSettings(k_in=8, k_out=8, seed=2, batch_size=1)
    by_three = LograSettings(k_in=8, k_out=8, seed=2, batch_size=3)
    projector = logra_projector(model, by_one)
    assert "lm_head" not in projector.modules  # tied to wte: left to the embedding path
    one = torch.cat([f for _, f in logra_features(model, task, examples, settings=by_one)])
    three = torch.cat([f for _, f in logra_features(model, task, examples,
                                                    settings=by_three)])
    torch.testing.assert_close(one, three, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(one, _dense_features(model, task, examples, projector),
                               rtol=1e-4, atol=1e-5)


def test_tied_wte_of_gpt2_counts_head_and_embedding_once():
    model, task = tiny_lm(seed=1), LMTask()
    settings = LograSettings(k_in=8, k_out=8, embeddings=True, modules=("wte",))
    projector = logra_projector(model, settings)
    assert list(projector.modules) == ["transformer.wte"]
    assert projector.metadata()["modules"]["transformer.wte"]["tied_with"] == ["lm_head"]
    examples = [[3, 17, 40, 9], [7, 8, 9]]
    features = torch.cat([f for _, f in logra_features(model, task, examples,
                                                       settings=settings)])
    torch.testing.assert_close(features, _dense_features(model, task, examples, projector),
                               rtol=1e-4, atol=1e-5)


def test_scores_equal_feature_products_and_the_store_path_gives_the_same(tmp_path):
    model, task = tiny_lm(seed=0), LMTask()
    train = [[3, 17, 40, 9, 12], [7, 8], [40, 9, 12, 5, 6], [1, 2, 3], [9, 9, 9, 9]]
    queries = [[40, 9, 12, 5, 6], [7, 8, 1]]
    settings = LograSettings(k_in=16, k_out=16, seed=0, batch_size=2)
    result = logra_scores(model, task, train, queries, settings=settings)
    f_train = torch.cat([f for _, f in logra_features(model, task, train, settings=settings)])
    f_query = torch.cat([f for _, f in logra_features(model, task, queries, settings=settings,
                                                      loss="query")])
    np.testing.assert_allclose(result.scores, (f_query @ f_train.T).numpy(), rtol=1e-4,
                               atol=1e-4)
    assert result.scores[0].argmax() == 2  # the verbatim copy of query 0 ranks first
    assert result.metadata["dim"] == f_train.shape[1] and result.metadata["n_train"] == 5

    store = write_logra_store(model, task, train, tmp_path / "store", settings=settings,
                              metadata={"model": "tiny-0"}, dtype="float32", shard_rows=2)
    assert store.metadata["projection"]["dim"] == f_train.shape[1]
    from_store = score_blocks(f_query, store, block_rows=3)
    np.testing.assert_allclose(from_store, result.scores, rtol=1e-4, atol=1e-4)


def test_warning_of_logra_scores_points_at_its_caller():
    model, task = tiny_lm(seed=0), LMTask()
    settings = LograSettings(k_in=1, k_out=1, modules=("attn.c_proj",))
    with pytest.warns(LowProjectionDimWarning, match="far too small") as record:
        result = logra_scores(model, task, [[1, 2, 3]] * 30, [[1, 2]], settings=settings)
    assert record[0].filename == __file__
    assert result.metadata["dim_warning"] and result.metadata["dim"] == 1


def test_broadcast_position_embedding_is_refused_by_name():
    # GPT-2 looks positions up once, (1, T, D), and broadcasts them over the batch: the
    # gradient at that output is the batch's sum, so per-example features would be wrong
    model, task = tiny_lm(seed=0), LMTask()
    settings = LograSettings(embeddings=True, modules=("wpe",))
    with pytest.raises(ConfigError, match="transformer.wpe is broadcast over the batch"):
        list(logra_features(model, task, [[1, 2, 3], [4, 5, 6]], settings=settings))


def test_per_token_scores_of_an_lm_query_sum_to_its_sequence_score(tmp_path):
    model, task = tiny_lm(seed=0), LMTask()
    settings = LograSettings(k_in=16, k_out=16, seed=0, batch_size=3)
    train = [[3, 17, 40, 9, 12], [7, 8], [40, 9, 12, 5, 6]]
    query = {"input_ids": [40, 9, 12, 5, 6], "labels": [-100, -100, 12, 5, 6]}
    store = write_logra_store(model, task, train, tmp_path / "s", settings=settings,
                              dtype="float32")
    positions, tokens = logra_token_scores(model, task, query, store, settings=settings)
    sequence = logra_scores(model, task, train, [query], settings=settings).scores
    assert positions == [2, 3, 4] and tokens.shape == (3, 3)
    np.testing.assert_allclose(tokens.sum(axis=0), sequence[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ArtifactError, match="other projection settings"):
        logra_token_scores(model, task, query, store, settings=LograSettings(k_in=8, k_out=8))


def test_bad_settings_and_unknown_modules_are_config_errors():
    with pytest.raises(ConfigError, match="k_in"):
        LograSettings(k_in=0)
    with pytest.raises(ConfigError, match="nonexistent"):
        logra_projector(tiny_lm(seed=0), LograSettings(modules=("nonexistent",)))
    with pytest.raises(ConfigError, match="max_bytes"):
        LograProjector({"w": (1000, 1000)}, LograSettings(k_in=64, k_out=64, max_bytes=1000))


def test_iterating_all_pairs_is_symmetric_in_the_projected_space():
    a, g = _gauss(6, 2, 20, seed=8), _gauss(6, 2, 30, seed=9)
    m = LograProjector({"w": (30, 20)}, LograSettings(k_out=5, k_in=5)).modules["w"]
    f = m.linear(a, g)
    for i, j in itertools.combinations(range(6), 2):
        assert torch.isclose(f[i] @ f[j], f[j] @ f[i])


def test_write_logra_store_resumes_after_the_last_finished_shard(tmp_path):
    model, task = tiny_lm(seed=0), LMTask()
    train = [[3, 17, 40, 9, 12], [7, 8], [40, 9, 12, 5, 6], [1, 2, 3], [9, 9, 9, 9]]
    settings = LograSettings(k_in=8, k_out=8, batch_size=2)
    kwargs = dict(settings=settings, metadata={"model": "tiny-0"}, dtype="float32",
                  shard_rows=2)
    whole = write_logra_store(model, task, train, tmp_path / "s", **kwargs).read(0, 5)
    for name in ("complete.json", "shard-00001.done.json", "shard-00002.done.json"):
        (tmp_path / "s" / name).unlink()  # as if killed after the first shard
    resumed = write_logra_store(model, task, train, tmp_path / "s", **kwargs)
    torch.testing.assert_close(resumed.read(0, 5), whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(ArtifactError, match="metadata.caller.model"):
        write_logra_store(model, task, train, tmp_path / "s",
                          **{**kwargs, "metadata": {"model": "tiny-1"}})
