"""Per-example gradients equal plain autograd, whatever the batching; projections are sound."""

from __future__ import annotations

import pytest
import torch

from harmtrace.attribute.gradients import (
    per_example_gradients,
    sequence_loss,
    trainable_parameters,
)
from harmtrace.attribute.projection import GaussianProjector
from harmtrace.errors import ConfigError, NumericalError
from helpers import tiny_lm, tiny_tokenizer

LENGTHS = (5, 12, 5, 12, 7, 5)


def _sequences(lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    vocab = len(tiny_tokenizer())
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _unprojected(model: torch.nn.Module) -> GaussianProjector:
    params = trainable_parameters(model)
    return GaussianProjector({n: p.shape for n, p in params.items()}, dim=0, seed=0)


def _flat(grads: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([grads[n].reshape(-1) for n in names])


def _autograd(model, loss: torch.Tensor) -> torch.Tensor:
    """Flattened gradient of ``loss`` w.r.t. the trainable parameters, in projector order."""
    params = trainable_parameters(model)
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True)
    return _flat(dict(zip(params, grads, strict=True)), list(params))


def _alone(model, seq: list[int], mask: list[bool] | None = None) -> torch.Tensor:
    """Reference: autograd on one unpadded sequence (labels -100 outside ``mask``)."""
    ids = torch.tensor([seq])
    labels = ids[0].clone()
    if mask is not None:
        labels[~torch.tensor(mask)] = -100
    logits = model(input_ids=ids).logits[0]  # (T, V)
    return _autograd(model, sequence_loss(logits, labels))


def test_per_example_gradients_equal_autograd_on_each_sequence_alone() -> None:
    model = tiny_lm()
    seqs = _sequences()
    got = per_example_gradients(model, seqs, projector=_unprojected(model))

    assert got.shape == (len(seqs), sum(p.numel() for p in trainable_parameters(model).values()))
    for row, seq in enumerate(seqs):
        torch.testing.assert_close(got[row], _alone(model, seq), rtol=1e-5, atol=1e-5)


def test_gradients_do_not_depend_on_batch_size_or_sequence_order() -> None:
    model = tiny_lm()
    seqs = _sequences((5, 12, 5, 5, 5, 12))  # batches of 3 split the length-5 group
    projector = _unprojected(model)
    reference = per_example_gradients(model, seqs, projector=projector, batch_size=32)

    for batch_size in (1, 3):
        got = per_example_gradients(model, seqs, projector=projector, batch_size=batch_size)
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)

    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(1)).tolist()
    shuffled = per_example_gradients(model, [seqs[i] for i in order], projector=projector)
    torch.testing.assert_close(shuffled, reference[order], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_gradient_equals_autograd_on_a_padded_batch_with_pad_labels_ignored(side: str) -> None:
    model = tiny_lm()
    seqs = _sequences((5, 12, 16))
    pad, width = tiny_tokenizer().pad_token_id, 16
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, seq in enumerate(seqs):
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, span] = torch.tensor(seq)
        mask[row, span] = 1
        labels[row, span] = torch.tensor(seq)
        # Alone, the first token is context only; padded on the left it would otherwise be
        # "predicted" from a pad position.
        labels[row, span.start] = -100
    # HF GPT-2 numbers positions 0..T-1 regardless of the mask; left padding must shift them.
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)

    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    got = per_example_gradients(model, seqs, projector=_unprojected(model))
    for row in range(len(seqs)):
        expected = _autograd(model, sequence_loss(logits[row], labels[row]))
        torch.testing.assert_close(got[row], expected, rtol=1e-5, atol=1e-5)


def test_tied_embedding_is_counted_once_and_gets_both_gradient_paths() -> None:
    model = tiny_lm()
    params = trainable_parameters(model)
    wte = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is wte
    assert sum(p is wte for p in params.values()) == 1
    unique = {id(p): p.numel() for p in model.parameters()}
    assert sum(p.numel() for p in params.values()) == sum(unique.values())

    seq = _sequences((9,))[0]
    got = per_example_gradients(model, [seq], projector=_unprojected(model))[0]
    torch.testing.assert_close(got, _alone(model, seq), rtol=1e-5, atol=1e-5)

    # The output head touches every row of the tied matrix, the input side only the rows
    # of tokens in the sequence: rows of absent tokens carry the head's gradient alone.
    names = list(params)
    name = next(n for n in names if params[n] is wte)
    offset = sum(params[n].numel() for n in names[: names.index(name)])
    block = got[offset : offset + wte.numel()].reshape(wte.shape)  # (V, D)
    absent = sorted(set(range(wte.shape[0])) - set(seq))
    assert block[absent].abs().sum(dim=1).min() > 0


def test_tokens_outside_the_target_mask_do_not_contribute() -> None:
    model = tiny_lm()
    seqs = _sequences((12, 7))
    masks = [[t % 3 == 0 for t in range(len(s))] for s in seqs]
    projector = _unprojected(model)
    got = per_example_gradients(model, seqs, projector=projector, target_masks=masks)
    full = per_example_gradients(model, seqs, projector=projector)

    for row, seq in enumerate(seqs):
        torch.testing.assert_close(got[row], _alone(model, seq, masks[row]),
                                   rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got[row], full[row])


def test_train_mode_is_restored_and_dropout_never_applies() -> None:
    model = tiny_lm(dropout=0.3).train()
    seqs = _sequences((6, 10))
    projector = _unprojected(model)
    first = per_example_gradients(model, seqs, projector=projector)
    second = per_example_gradients(model, seqs, projector=projector)

    assert model.training
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(first[1], _alone(model, seqs[1]), rtol=1e-5, atol=1e-5)


def test_same_seed_gives_the_same_projection_whatever_the_parameter_order() -> None:
    shapes = {"a.weight": torch.Size([4, 5]), "b.bias": torch.Size([7])}
    grads = {"a.weight": torch.randn(3, 4, 5), "b.bias": torch.randn(3, 7)}
    one = GaussianProjector(shapes, dim=16, seed=3)
    two = GaussianProjector(dict(reversed(shapes.items())), dim=16, seed=3)

    for name in shapes:
        torch.testing.assert_close(one.matrices[name], two.matrices[name], rtol=0, atol=0)
    torch.testing.assert_close(one.project(grads), two.project(grads), rtol=1e-6, atol=1e-6)


def test_different_seeds_give_different_projections() -> None:
    shapes = {"w": torch.Size([10, 10])}
    grads = {"w": torch.randn(2, 10, 10)}
    one = GaussianProjector(shapes, dim=32, seed=0).project(grads)
    two = GaussianProjector(shapes, dim=32, seed=1).project(grads)
    assert not torch.allclose(one, two)


def test_projection_preserves_inner_products_within_jl_tolerance() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1, 50, 100, generator=gen)
    b = a + 0.5 * torch.randn(1, 50, 100, generator=gen)  # <a, b> is large
    projector = GaussianProjector({"w": torch.Size([50, 100])}, dim=2048, seed=7)
    pa, pb = projector.project({"w": a})[0], projector.project({"w": b})[0]

    exact = float((a * b).sum())
    # the relative std of the estimate is about sqrt(2 / k) = 0.03; allow five of them
    assert abs(float(pa @ pb) - exact) / exact < 0.15
    assert abs(float(pa.norm()) / float(a.norm()) - 1) < 0.1
    assert abs(float(pb.norm()) / float(b.norm()) - 1) < 0.1


@pytest.mark.parametrize("include", [["wte"], ["no_such_module"]])
def test_naming_only_frozen_or_missing_parameters_is_an_error(include: list[str]) -> None:
    model = tiny_lm()
    model.get_input_embeddings().weight.requires_grad_(False)
    with pytest.raises(ConfigError, match=include[0]):
        trainable_parameters(model, include)


def test_include_keeps_only_the_named_trainable_parameters() -> None:
    model = tiny_lm()
    params = trainable_parameters(model, ["mlp"])
    assert params and all("mlp" in name for name in params)


def test_nan_weight_raises_numerical_error_naming_the_sequence() -> None:
    model = tiny_lm()
    with torch.no_grad():
        # only sequences longer than 10 tokens read position 10
        model.transformer.wpe.weight[10, 0] = float("nan")
    seqs = _sequences((5, 6, 12, 7))
    with pytest.raises(NumericalError, match="sequence 2 "):
        per_example_gradients(model, seqs, projector=_unprojected(model))


def test_train_mode_is_kept_when_the_projector_does_not_fit_the_model() -> None:
    model = tiny_lm(dropout=0.1).train()
    projector = GaussianProjector({"no.such.weight": torch.Size([3])}, dim=0, seed=0)
    with pytest.raises(ConfigError, match="projector"):
        per_example_gradients(model, _sequences((5,)), projector=projector)
    assert model.training
