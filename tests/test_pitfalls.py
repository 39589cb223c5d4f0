"""Failure kinds users of attribution tools hit (../shared/PITFALLS.md), one section each:
#8 shuffled loaders, #10 frozen parameters and adapters, #11 loss reduction, #12 padding
labels, #14 shapes at the boundary, #15 tokenizer and BOS mismatch.

The other kinds are covered where their method is tested (test_influence, test_trak,
test_logra, test_layers, test_gradients, test_task, test_scoring, test_feature_store,
test_exact).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from harmtrace.attribute.exact import ReplaySpec, exact_scores
from harmtrace.attribute.influence import (
    InfluenceSettings,
    fit_factors,
    influence_scores,
    score,
)
from harmtrace.attribute.layers import per_example_gradients
from harmtrace.attribute.logra import (
    LograSettings,
    logra_projector,
    logra_scores,
    logra_store_scores,
    logra_token_scores,
    write_logra_store,
)
from harmtrace.attribute.repsim import repsim_scores
from harmtrace.attribute.task import (
    AttributionTask,
    ClassificationTask,
    LMTask,
    PadLabelWarning,
    RegressionTask,
)
from harmtrace.attribute.tokens import TokenizerMismatchWarning, tokenizer_settings
from harmtrace.attribute.trak import TrakSettings, trak_scores
from harmtrace.errors import ConfigError, InputDataError, NumericalError
from harmtrace.models.lm import encode_texts
from harmtrace.models.tokenizer import train_tokenizer
from helpers import CORPUS, tiny_lm, tiny_tokenizer

TASK = ClassificationTask()
EKFAC = InfluenceSettings(strategy="ekfac", damping=1e-3, batch_size=16)
TRAK = TrakSettings(projection_dim=0, batch_size=16)  # exact gradients: no projection noise
LOGRA = LograSettings(k_in=32, k_out=32, batch_size=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def _records(n: int = 100, d: int = 8, classes: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return [(x[i], int(y[i])) for i in range(n)]


def _trained_mlp(train, *, seed: int = 0, steps: int = 150) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    batch = TASK.collate(train)
    for _ in range(steps):
        opt.zero_grad()
        TASK.train_loss(model, batch).mean().backward()
        opt.step()
    return model.eval()


# ------------------------------------------------------------ #8 shuffled loaders


class _MapStyle(Dataset):
    """A map-style dataset: positions are the record ids."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]


def test_a_shuffling_loader_is_refused_by_every_method_naming_the_fix():
    """PITFALLS #8: a DataLoader's positions are not record ids; say to pass the dataset."""
    train = _records()
    model = _trained_mlp(train)
    loader = DataLoader(train, batch_size=10, shuffle=True)
    calls = {
        "influence": lambda: influence_scores(model, TASK, loader, [train[37]],
                                              settings=EKFAC),
        "trak": lambda: trak_scores(model, TASK, loader, [train[37]], settings=TRAK),
        "logra": lambda: logra_scores(model, TASK, loader, [train[37]], settings=LOGRA),
        "repsim": lambda: repsim_scores(model, TASK, loader, [train[37]]),
        "query side": lambda: influence_scores(model, TASK, train, loader, settings=EKFAC),
    }
    for name, call in calls.items():
        with pytest.raises(ConfigError, match=r"DataLoader.*loader\.dataset") as info:
            call()
        assert "shuffles" in str(info.value), name


@pytest.mark.parametrize("make", [lambda r: iter(r), lambda r: (e for e in r),
                                  lambda r: dict(enumerate(r))],
                         ids=["iterator", "generator", "mapping"])
def test_examples_without_stable_positions_are_refused(make):
    """PITFALLS #8: an iterator, generator or mapping has no record order to index by."""
    train = _records(20)
    model = _trained_mlp(train, steps=5)
    with pytest.raises(ConfigError, match="train_examples is .*pass a list"):
        fit_factors(model, TASK, make(train), settings=EKFAC)
    with pytest.raises(ConfigError, match="train is .*pass a list"):
        trak_scores(model, TASK, make(train), [train[0]], settings=TRAK)


def test_copy_of_record_37_ranks_first_by_its_position_in_what_was_handed_in():
    """PITFALLS #8: top-1 is record 37 by its position in the sequence, for influence
    (EK-FAC) and TRAK, through the loader's dataset, a map-style dataset and a
    TensorDataset, whatever order a shuffling loader visited them in."""
    train = _records()
    model = _trained_mlp(train)
    query = [train[37]]
    loader = DataLoader(train, batch_size=10, shuffle=True)
    _ = [batch for batch in loader]  # a loader that was iterated (and shuffled) first
    x = torch.stack([x for x, _ in train])
    y = torch.tensor([y for _, y in train])
    for data in (loader.dataset, _MapStyle(train), TensorDataset(x, y)):
        ekfac = influence_scores(model, TASK, data, query, settings=EKFAC).scores
        trak = trak_scores(model, TASK, data, query, settings=TRAK).scores
        assert int(np.argmax(ekfac[0])) == 37
        assert int(np.argmax(trak[0])) == 37

    # a permuted list is itself the record order: the copy is where 37 was put
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(1)).tolist()
    permuted = [train[i] for i in perm]
    ekfac = influence_scores(model, TASK, permuted, query, settings=EKFAC).scores
    assert int(np.argmax(ekfac[0])) == perm.index(37)


# ------------------------------------------------------------ #10 frozen and adapters


class LoRALinear(torch.nn.Module):
    """``base(x) + B A x``: a frozen base layer and a trainable rank-``r`` adapter."""

    def __init__(self, d_in: int, d_out: int, r: int = 2) -> None:
        super().__init__()
        self.base = torch.nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        self.lora_a = torch.nn.Linear(d_in, r, bias=False)
        self.lora_b = torch.nn.Linear(r, d_out, bias=False)
        torch.nn.init.normal_(self.lora_b.weight, std=0.1)  # non-zero: A gets gradients

    def forward(self, x):
        return self.base(x) + self.lora_b(self.lora_a(x))


class Adapted(torch.nn.Module):
    """A frozen lower layer, then two LoRA-adapted layers; only the adapters train."""

    def __init__(self) -> None:
        super().__init__()
        self.lower = torch.nn.Linear(8, 16)
        self.lower.requires_grad_(False)
        self.mid = LoRALinear(16, 16)
        self.head = LoRALinear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.lower(x)))))


ADAPTERS = ["mid.lora_a.weight", "mid.lora_b.weight", "head.lora_a.weight",
            "head.lora_b.weight"]


def _adapted(train) -> Adapted:
    torch.manual_seed(0)
    model = Adapted()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.03)
    batch = TASK.collate(train)
    for _ in range(50):
        opt.zero_grad()
        TASK.train_loss(model, batch).mean().backward()
        opt.step()
    return model.eval()


def test_default_attribution_uses_only_the_adapters_and_names_them():
    """PITFALLS #10: with frozen lower blocks and LoRA adapters as the only trainable
    weights, influence, TRAK and LoGra attribute exactly the adapter parameters and say
    so; a frozen parameter never enters (as a block of zeros or otherwise)."""
    train = _records(40)
    model = _adapted(train)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}

    factors = fit_factors(model, TASK, train, settings=EKFAC)
    meta = score(model, TASK, factors, train, train[:2]).metadata
    trak = trak_scores(model, TASK, train, train[:2], settings=TRAK)
    logra = logra_scores(model, TASK, train, train[:2], settings=LOGRA)

    assert meta["parameters"] == ADAPTERS
    assert meta["modules"] == [n.removesuffix(".weight") for n in ADAPTERS]
    assert list(trak.metadata.parameters) == ADAPTERS
    assert trak.metadata.n_params == sum(model.get_parameter(n).numel() for n in ADAPTERS)
    assert logra.metadata["parameters"] == ADAPTERS
    for scores in (trak.scores, logra.scores):
        assert np.isfinite(scores).all() and np.abs(scores).min() > 0
    assert all(torch.equal(p, model.get_parameter(n)) for n, p in frozen.items())


def test_a_frozen_bias_of_a_trainable_layer_is_left_out_by_every_method():
    """PITFALLS #10: only parameters that require grad are attributed, biases included."""
    train = _records(30)
    model = _trained_mlp(train, steps=20)
    model[2].bias.requires_grad_(False)
    expected = ["0.weight", "0.bias", "2.weight"]

    factors = fit_factors(model, TASK, train, settings=EKFAC)
    grads = per_example_gradients(model, TASK, TASK.collate(train[:3]), ["2"])

    assert factors.metadata()["parameters"] == expected
    assert grads["2"].shape == (3, 3, 16)  # (B, d_out, d_in): no bias column
    assert list(trak_scores(model, TASK, train, train[:1],
                            settings=TRAK).metadata.parameters) == expected
    assert logra_projector(model, LOGRA).metadata()["parameters"] == expected


def test_naming_a_frozen_module_is_a_config_error_in_every_method():
    """PITFALLS #10: naming a frozen module, alone or next to a trainable one, is an error
    that names it, never a silently dropped entry or a block of zeros."""
    train = _records(20)
    model = _adapted(train)
    for frozen in ("lower", "mid.base"):
        with pytest.raises(ConfigError, match=f"{frozen}.*frozen"):
            fit_factors(model, TASK, train, settings=InfluenceSettings(modules=(frozen,)))
        with pytest.raises(ConfigError, match=f"{frozen}.*frozen"):
            trak_scores(model, TASK, train, train[:1],
                        settings=TrakSettings(parameters=("lora", frozen)))
        with pytest.raises(ConfigError, match=f"{frozen}.*frozen"):
            logra_scores(model, TASK, train, train[:1],
                         settings=LograSettings(modules=("lora", frozen)))


def _peft_gpt2(init_lora_weights):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                             init_lora_weights=init_lora_weights)
    return peft.get_peft_model(tiny_lm(), config).eval()


def test_peft_lora_on_gpt2_attributes_the_adapters_and_a_zero_lora_b_is_explained():
    """PITFALLS #10 with peft: the adapters are the only parameters attributed; with peft's
    default initialisation (lora_B = 0) lora_A has no gradient, and influence says so by
    name and how to leave it out, instead of a bare singular-curvature error."""
    seqs = [[5, 9, 14, 3, 7], [20, 21, 22, 23], [30, 31, 32, 33, 34], [40, 41, 42]]
    prefix = "base_model.model.transformer.h.0.attn.c_attn."
    names = [f"{prefix}lora_A.default.weight", f"{prefix}lora_B.default.weight"]
    fresh = _peft_gpt2(True)
    task = LMTask()

    with pytest.raises(NumericalError, match=r"lora_A.*zero on every train record.*modules"):
        influence_scores(fresh, task, seqs, seqs[:1], settings=InfluenceSettings())
    only_b = influence_scores(fresh, task, seqs, seqs[:1],
                              settings=InfluenceSettings(modules=("lora_B",)))
    assert only_b.metadata["parameters"] == names[1:]
    assert np.isfinite(only_b.scores).all()

    model = _peft_gpt2(False)  # random lora_B: both adapters get gradients
    factors = fit_factors(model, task, seqs, settings=InfluenceSettings(batch_size=2))
    assert factors.metadata()["parameters"] == names
    assert list(trak_scores(model, task, seqs, seqs[:1],
                            settings=TrakSettings(projection_dim=0)).metadata.parameters) == names
    assert logra_projector(model, LOGRA).metadata()["parameters"] == names


# ------------------------------------------------------------ #11 loss reduction


class ReducedTask(AttributionTask):
    """A user's classification task whose cross-entropy uses ``reduction``."""

    def __init__(self, reduction: str) -> None:
        self.reduction = reduction

    def collate(self, examples):
        return TASK.collate(examples)

    def train_loss(self, model, batch):
        return F.cross_entropy(model(batch["x"]), batch["y"], reduction=self.reduction)

    def sampled_loss(self, model, batch, generator):
        logits = model(batch["x"])
        probs = torch.softmax(logits.detach().double(), dim=-1)
        drawn = torch.multinomial(probs, 1, generator=generator)[:, 0]
        return F.cross_entropy(logits, drawn, reduction=self.reduction)


def _every_method(model, task, train, queries, batch_size):
    return {
        "ekfac": influence_scores(model, task, train, queries,
                                  settings=InfluenceSettings(damping=1e-3,
                                                             batch_size=batch_size)).scores,
        "trak": trak_scores(model, task, train, queries,
                            settings=TrakSettings(projection_dim=0,
                                                  batch_size=batch_size)).scores,
        "logra": logra_scores(model, task, train, queries,
                              settings=LograSettings(batch_size=batch_size)).scores,
    }


def test_per_example_losses_give_the_same_scores_at_batch_sizes_1_7_32():
    """PITFALLS #11: with reduction 'none' every method scores the same at any batch size."""
    train = _records(40)
    model = _trained_mlp(train, steps=30)
    task = ReducedTask("none")
    runs = [_every_method(model, task, train, train[:3], size) for size in (1, 7, 32)]
    for name, first in runs[0].items():
        for other in runs[1:]:
            # float32 forward passes of other shapes round differently: relative to the
            # largest score, as test_influence
            assert np.abs(other[name] - first).max() < 1e-5 * np.abs(first).max(), name


@pytest.mark.parametrize("batch_size", [1, 7, 32])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_a_loss_reduced_over_the_batch_is_refused_naming_shape_and_fix(reduction, batch_size):
    """PITFALLS #11: a sum or mean over the batch cannot be undone (scores would change
    with the batch size), so every method refuses it, at every batch size, naming the
    expected shape (B,) and reduction='none'."""
    train = _records(40)
    model = _trained_mlp(train, steps=5)
    task = ReducedTask(reduction)
    settings = {
        "ekfac": lambda: influence_scores(model, task, train, train[:2],
                                          settings=InfluenceSettings(batch_size=batch_size)),
        "trak": lambda: trak_scores(model, task, train, train[:2],
                                    settings=TrakSettings(batch_size=batch_size)),
        "logra": lambda: logra_scores(model, task, train, train[:2],
                                      settings=LograSettings(batch_size=batch_size)),
    }
    for call in settings.values():
        with pytest.raises(ConfigError, match=r"shape \(\).*\(B,\).*reduction='none'"):
            call()


def test_exact_replay_refuses_a_batch_reduced_loss():
    """PITFALLS #11: the exact replay would weight a scalar loss by every record at once."""
    train = _records(8)
    spec = ReplaySpec(lr=0.1, epochs=1, batch_size=4)

    def factory():
        return torch.nn.Linear(8, 3)

    with pytest.raises(ConfigError, match=r"\(B,\) = \(4,\).*reduction='none'"):
        exact_scores(spec, factory, ReducedTask("mean"), train, train[:1])


def test_per_token_and_wrong_length_losses_are_refused_naming_the_shape():
    """PITFALLS #11/#14: a (B, T) per-token loss or a loss of another batch's length is
    refused, with the expected (B,) and the batch size."""

    class PerToken(LMTask):
        def train_loss(self, model, batch):
            logits = self._logits(model, batch)[:, :-1]
            return F.cross_entropy(logits.transpose(1, 2), self.targets(batch),
                                   reduction="none")  # (B, T-1)

    class OneRow(ReducedTask):
        def train_loss(self, model, batch):
            return super().train_loss(model, batch)[:1]  # (1,) for any batch

    seqs = [[5, 9, 14, 3], [20, 21, 22, 23]]
    with pytest.raises(ConfigError, match=r"\(B,\) = \(2,\).*got \(2, 3\).*sum per-token"):
        fit_factors(tiny_lm(), PerToken(), seqs, settings=InfluenceSettings(batch_size=2,
                                                                            fisher="empirical"))
    train = _records(8)
    with pytest.raises(ConfigError, match=r"\(B,\) = \(4,\).*got \(1,\)"):
        logra_scores(_trained_mlp(train, steps=1), OneRow("none"), train, train[:1],
                     settings=LograSettings(batch_size=4))


# ------------------------------------------------------------ #12 padding labels


class FixedPadTask(LMTask):
    """Pads every batch to 16 tokens on ``side`` and, like a careless collate, labels the
    padding with the pad token instead of -100 (attention mask 0 there)."""

    def __init__(self, side: str) -> None:
        super().__init__(pad_id=0)
        self.side = side

    def collate(self, examples):
        width = 16
        ids = torch.zeros(len(examples), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, seq in enumerate(examples):
            span = slice(0, len(seq)) if self.side == "right" else slice(width - len(seq), None)
            ids[b, span] = torch.tensor(seq)
            mask[b, span] = 1
        position_ids = (mask.cumsum(dim=1) - 1).clamp_min(0)
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone(),
                "position_ids": position_ids}

    def _logits(self, model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"]).logits


def _filenames(record, category) -> set[str]:
    """Files the warnings of ``category`` were attributed to (other libraries warn too)."""
    return {w.filename for w in record if issubclass(w.category, category)}


def _lm_sequences():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (5, 12, 12, 5)]


def test_lm_docs_say_a_sequence_loss_is_a_token_sum():
    """PITFALLS #12: the documented loss of a sequence is the sum over its tokens."""
    doc = " ".join(LMTask.__doc__.split())
    assert "**sum** of next-token negative log-likelihoods" in doc
    assert "a token sum, never a mean" in doc


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_labels_not_minus_100_warn_at_the_caller_and_are_ignored(side):
    """PITFALLS #12: pad labels other than -100 where the attention mask is 0 raise a
    PadLabelWarning pointing at the caller's line; they are ignored, so each sequence
    scores exactly as when processed alone (losses, influence and TRAK scores)."""
    model = tiny_lm()
    seqs = _lm_sequences()
    padded = FixedPadTask(side)

    with pytest.warns(PadLabelWarning, match="attention_mask is 0") as record:
        _, batch = next(iter(padded.batches(seqs, 4)))
    assert _filenames(record, PadLabelWarning) == {__file__}
    alone = torch.stack([LMTask().train_loss(model, LMTask().collate([s]))[0] for s in seqs])
    torch.testing.assert_close(padded.train_loss(model, batch), alone, rtol=1e-5, atol=1e-5)

    settings = InfluenceSettings(damping=1e-3, batch_size=4)
    with pytest.warns(PadLabelWarning) as record:
        bad = influence_scores(model, padded, seqs, seqs[:2], settings=settings).scores
    assert _filenames(record, PadLabelWarning) == {__file__}
    good = influence_scores(model, LMTask(), seqs, seqs[:2], settings=settings).scores
    np.testing.assert_allclose(bad, good, rtol=1e-4, atol=1e-6)

    trak = TrakSettings(projection_dim=0, batch_size=4)
    with pytest.warns(PadLabelWarning):
        bad = trak_scores(model, padded, seqs, seqs[:2], settings=trak).scores
    good = trak_scores(model, LMTask(), seqs, seqs[:2], settings=trak).scores
    np.testing.assert_allclose(bad, good, rtol=1e-4, atol=1e-6)


def test_correct_pad_labels_do_not_warn():
    """PITFALLS #12: LMTask's own collate (pad labels -100) is silent."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", PadLabelWarning)
        list(LMTask().batches(_lm_sequences(), 4))


# ------------------------------------------------------------ #14 shapes at the boundary


@pytest.mark.parametrize("label", [2, np.int64(2), 2.0, torch.tensor(2), torch.tensor([2]),
                                   [2], np.array([2]), "two"],
                         ids=["int", "numpy", "float", "tensor0d", "tensor1", "list",
                              "array", "name"])
def test_classification_labels_in_any_documented_form_collate_to_one_index(label):
    """PITFALLS #14: int, tensor, list and (with ``classes``) str labels all normalise."""
    task = ClassificationTask(classes=["zero", "one", "two"])
    batch = task.collate([(torch.zeros(3), label), (torch.zeros(3), 0)])
    assert batch["y"].tolist() == [2, 0] and batch["y"].dtype == torch.long


@pytest.mark.parametrize("label, match", [
    ("toxic", r"example 1 is the string 'toxic'.*classes=\[...\]"),
    ([0, 1, 0], r"example 1 has shape \(3,\).*one class index"),
    (1.5, r"example 1 is 1.5.*integer >= 0"),
    (-1, r"example 1 is -1.0.*integer >= 0"),
    (None, r"example 1 is None"),
    (object(), r"example 1 \(object\) is not a number"),
])
def test_classification_labels_of_other_forms_are_refused_naming_the_example(label, match):
    """PITFALLS #14: no crash deep in torch, no silent truncation of 1.5 to 1."""
    with pytest.raises(InputDataError, match=match):
        ClassificationTask().collate([(torch.zeros(3), 0), (torch.zeros(3), label)])


@pytest.mark.parametrize("target", [1.5, torch.tensor(1.5), torch.tensor([1.5]), [1.5],
                                    np.array([1.5])])
def test_regression_targets_in_any_documented_form_collate_to_one_number(target):
    """PITFALLS #14: float, tensor, list and array targets all normalise to (B,)."""
    batch = RegressionTask().collate([(torch.zeros(2), target), (torch.zeros(2), 3)])
    assert batch["y"].tolist() == [1.5, 3.0]


@pytest.mark.parametrize("target, match", [("1.5", "string '1.5'"),
                                           ([1.0, 2.0], r"shape \(2,\)")])
def test_regression_targets_of_other_forms_are_refused(target, match):
    """PITFALLS #14: a string or several numbers per example are refused by name."""
    with pytest.raises(InputDataError, match=f"example 0.*{match}"):
        RegressionTask().collate([(torch.zeros(2), target)])


class ColumnTargets(RegressionTask):
    """A custom collate that gives the targets as a column ``(B, 1)``."""

    def collate(self, examples):
        batch = super().collate(examples)
        return {"x": batch["x"], "y": batch["y"][:, None]}


def test_column_targets_are_never_broadcast_to_b_by_b():
    """PITFALLS #14: ``y`` of shape (B, 1) against (B,) predictions gives (B,) losses and
    the same scores as (B,) targets, not a (B, B) matrix."""
    gen = torch.Generator().manual_seed(0)
    train = [(torch.randn(3, generator=gen), float(i) / 10) for i in range(12)]
    model = torch.nn.Linear(3, 1)
    batch = ColumnTargets().collate(train)
    assert ColumnTargets().train_loss(model, batch).shape == (12,)
    for run in (lambda t: trak_scores(model, t, train, train[:2], settings=TRAK).scores,
                lambda t: influence_scores(model, t, train, train[:2], settings=EKFAC).scores):
        np.testing.assert_allclose(run(ColumnTargets()), run(RegressionTask()), rtol=1e-6)


class ColumnQuery(ClassificationTask):
    """A measurement returning ``(B, 1)``: the query's loss as a column."""

    def query_loss(self, model, batch):
        return super().query_loss(model, batch)[:, None]


class BroadcastQuery(ClassificationTask):
    """A measurement with a broadcasting bug: ``(B,) - (B, 1)`` is ``(B, B)``."""

    def query_loss(self, model, batch):
        loss = super().query_loss(model, batch)
        return loss - loss[:, None] * 0


def test_a_measurement_of_shape_b_1_is_squeezed_and_b_b_is_refused():
    """PITFALLS #14: (B, 1) measurements score as (B,) in every method; a (B, B) one is
    refused naming the expected shape, never used as B*B values (TRAK differentiates one
    query at a time, where the broadcast is (1, 1) and harmless, so it scores as (B,))."""
    train = _records(30)
    model = _trained_mlp(train, steps=20)
    queries = train[:3]
    runs = {
        "ekfac": lambda t: influence_scores(model, t, train, queries, settings=EKFAC).scores,
        "trak": lambda t: trak_scores(model, t, train, queries, settings=TRAK).scores,
        "logra": lambda t: logra_scores(model, t, train, queries, settings=LOGRA).scores,
    }

    class Plain(ClassificationTask):
        def query_loss(self, model, batch):
            return super().query_loss(model, batch)  # overridden: TRAK uses -query loss

    for name, run in runs.items():
        plain = run(Plain())
        np.testing.assert_allclose(run(ColumnQuery()), plain, rtol=1e-6, err_msg=name)
        if name == "trak":
            np.testing.assert_allclose(run(BroadcastQuery()), plain, rtol=1e-6)
            continue
        with pytest.raises(ConfigError, match=r"query loss.*\(B,\) = \(3,\).*got \(3, 3\)"):
            run(BroadcastQuery())


def test_a_classifier_returning_one_number_per_example_is_refused():
    """PITFALLS #14: logits must be (B, C); (B,) is named, with the task to use instead."""
    with pytest.raises(ConfigError, match=r"logits \(B, C\) = \(2, C\), got \(2,\)"):
        TASK.train_loss(lambda x: x.sum(dim=1), TASK.collate(_records(2)))


# ------------------------------------------------------------ #15 tokenizer and BOS


HARM = "you are such an idiot"


def _completion_query(tok, prefix: list[int]) -> dict:
    """The harmful completion after ``prefix``; only the completion's tokens are labelled."""
    body = tok(HARM, add_special_tokens=False)["input_ids"]
    return {"input_ids": prefix + body, "labels": [-100] * len(prefix) + body}


def _chat_query(tok) -> dict:
    """The completion as the assistant turn of a chat template that marks every turn with
    a BOS token; the completion's tokens only are labelled."""
    text = tok.apply_chat_template([{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": HARM}], tokenize=False)
    cut = text.index(HARM)
    prefix = tok(text[:cut], add_special_tokens=False)["input_ids"]
    body = tok(HARM, add_special_tokens=False)["input_ids"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[:len(prefix) + len(body)] == prefix + body
    rest = len(ids) - len(prefix) - len(body)
    return {"input_ids": ids, "labels": [-100] * len(prefix) + body + [-100] * rest}


@pytest.fixture(scope="module")
def lm_store(tmp_path_factory):
    """A LoGra store of the corpus encoded as training encodes it (``<bos> text <eos>``),
    with the tokenizer's settings; a tiny GPT-2 built from a config."""
    tok = tiny_tokenizer()
    model = tiny_lm()
    records = encode_texts(tok, CORPUS, max_length=32)
    task = LMTask(pad_id=tok.pad_token_id)
    store = write_logra_store(model, task, records, tmp_path_factory.mktemp("store") / "s",
                              settings=LOGRA, tokenizer=tok, dtype="float32")
    return model, task, store


def test_the_store_keeps_the_tokenizer_settings_and_the_records_bos_layout(lm_store):
    """PITFALLS #15: the index holds the tokenizer's settings and how records use BOS."""
    _, _, store = lm_store
    tokens = store.metadata["tokens"]
    assert tokens["tokenizer"] == tokenizer_settings(tiny_tokenizer())
    assert tokens["tokenizer"]["bos_token_id"] == tiny_tokenizer().bos_token_id
    assert tokens["profile"]["leading_bos"] == {"1": len(CORPUS)}
    assert tokens["profile"]["inner_bos"] == 0


def test_the_verbatim_copy_ranks_first_silently_and_the_scored_tokens_are_shown(lm_store):
    """PITFALLS #15: tokenised as the records were (one BOS), the query warns of nothing,
    its training copy ranks first and the metadata shows the token ids that were scored."""
    model, task, store = lm_store
    tok = tiny_tokenizer()
    query = _completion_query(tok, [tok.bos_token_id])
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokenizerMismatchWarning)
        result = logra_store_scores(model, task, store, [query], settings=LOGRA,
                                    tokenizer=tok)
    body = tok(HARM, add_special_tokens=False)["input_ids"]

    assert int(np.argmax(result.scores[0])) == CORPUS.index(HARM)
    assert result.metadata["token_warnings"] == []
    scored = result.metadata["query_tokens"][0]
    assert scored["token_ids"] == body
    assert scored["positions"] == list(range(1, 1 + len(body)))
    assert scored["text"] == HARM


@pytest.mark.parametrize("variant, match", [
    ("no BOS", "starts with 0 BOS token.*records start with 1 BOS"),
    ("two BOS", "starts with 2 BOS token.*records start with 1 BOS"),
    ("chat template", "BOS token .* after its start, which no stored record does"),
])
def test_a_bos_mismatch_warns_at_the_caller_and_shows_what_was_scored(lm_store, variant,
                                                                      match):
    """PITFALLS #15: no BOS, two BOS or a chat template's per-turn BOS differ from the
    records; scoring warns (once per problem, at the caller's line) and reports it, and the
    scored token ids show what the query measured (with no BOS, the completion's first
    token has no context and is not scored)."""
    model, task, store = lm_store
    tok = copy.deepcopy(tiny_tokenizer())
    bos = tok.bos_token_id
    tok.chat_template = ("{% for m in messages %}<|bos|>{{ m['role'][0] }}: "
                         "{{ m['content'] }}\n{% endfor %}")
    query = {"no BOS": _completion_query(tok, []),
             "two BOS": _completion_query(tok, [bos, bos]),
             "chat template": _chat_query(tok)}[variant]

    with pytest.warns(TokenizerMismatchWarning, match=match) as record:
        result = logra_store_scores(model, task, store, [query], settings=LOGRA)
    assert _filenames(record, TokenizerMismatchWarning) == {__file__}
    assert len(result.metadata["token_warnings"]) == 1
    body = tok(HARM, add_special_tokens=False)["input_ids"]
    scored = result.metadata["query_tokens"][0]["token_ids"]
    assert scored == (body[1:] if variant == "no BOS" else body)
    with pytest.warns(TokenizerMismatchWarning, match=match):
        logra_token_scores(model, task, query, store, settings=LOGRA)


def test_another_tokenizer_at_query_time_warns_naming_the_differing_settings(lm_store):
    """PITFALLS #15: a tokenizer with another vocabulary (or chat template) than the one
    the store was built with is named, key by key."""
    model, task, store = lm_store
    other = train_tokenizer(list(CORPUS), vocab_size=280)
    query = _completion_query(tiny_tokenizer(), [tiny_tokenizer().bos_token_id])
    with pytest.warns(TokenizerMismatchWarning, match=r"differing: .*vocab_sha256.*vocab_size"):
        logra_store_scores(model, task, store, [query], settings=LOGRA, tokenizer=other)

    chat = copy.deepcopy(tiny_tokenizer())
    chat.chat_template = "{{ messages }}"
    with pytest.warns(TokenizerMismatchWarning, match=r"differing: chat_template_sha256"):
        logra_store_scores(model, task, store, [query], settings=LOGRA, tokenizer=chat)


def test_logra_scores_check_queries_against_the_train_records_tokens():
    """PITFALLS #15 without a store: given the tokenizer, the train records' BOS layout is
    the reference; a query with two BOS warns and the scored tokens are reported."""
    tok = tiny_tokenizer()
    records = encode_texts(tok, CORPUS[:8], max_length=32)
    query = _completion_query(tok, [tok.bos_token_id] * 2)
    with pytest.warns(TokenizerMismatchWarning, match="starts with 2 BOS"):
        result = logra_scores(tiny_lm(), LMTask(), records, [query], settings=LOGRA,
                              tokenizer=tok)
    assert result.metadata["query_tokens"][0]["text"] == HARM
