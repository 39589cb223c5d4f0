"""What an attribution method differentiates: a train record's loss and a query's loss.

Every model-based method (gradient similarity, TracIn, influence functions, TRAK, the exact
replay) sees a model only through an :class:`AttributionTask`. A task turns a list of
*examples* (any Python objects: token-id dicts, feature vectors) into a batch, and a batch
into **per-example** losses of shape ``(B,)``:

* ``train_loss(model, batch)[b]`` is the training loss of example ``b`` alone, summed over
  its targets (tokens of a sequence), never averaged over the batch, so that the loss of one
  example does not depend on the examples batched with it;
* ``query_loss(model, batch)[b]`` is the quantity that query ``b`` explains. **A positive
  score means the train record made this quantity smaller** (for a harm query: the harmful
  tokens more likely). By default it is the train loss of the query example;
* ``sampled_loss(model, batch, generator)`` is the train loss with targets drawn from the
  model's own predictive distribution, whose gradients give the true Fisher (used by the
  curvature estimates of influence functions).

Examples keep their position in the sequence they are handed in: scores are indexed by that
position (the record id), never by a loader's order. A ``torch.utils.data.DataLoader``, an
iterator or a mapping is refused (:func:`check_examples`): pass the sequence itself (for a
loader, ``loader.dataset``).

Every value a task returns per example is normalised by :func:`per_example`: ``(B,)`` is
kept, ``(B, 1)`` is squeezed, and anything else (a scalar from ``reduction="mean"`` or
``"sum"``, a ``(B, T)`` per-token loss, a batch of another size) raises :class:`ConfigError`
naming the expected shape, since a reduction over the batch cannot be undone.
"""

from __future__ import annotations

import abc
import enum
import numbers
from collections.abc import Iterator, Mapping, Sequence, Set
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

from harmtrace._warn import warn_at_caller
from harmtrace.errors import ConfigError, InputDataError

__all__ = [
    "AttributionTask",
    "ClassificationTask",
    "LMTask",
    "PadLabelWarning",
    "RegressionTask",
    "batch_size_of",
    "check_examples",
    "per_example",
]


class PadLabelWarning(UserWarning):
    """A batch labels tokens whose attention mask is 0 (padding); they are ignored."""


def check_train_and_queries(train: Any, queries: Any, *, caller: str) -> None:
    """Both ``train`` and ``queries`` sequences (:func:`check_examples`) and non-empty, else
    a ConfigError naming ``caller``."""
    check_examples(train, argument="train")
    check_examples(queries, argument="queries")
    if not len(train) or not len(queries):
        raise ConfigError(f"{caller} needs train and query examples, got {len(train)} "
                          f"train and {len(queries)} queries")


def as_enum(kind: type[enum.Enum], value: Any, name: str) -> Any:
    """``value`` (a member of ``kind`` or its string value) as a member of ``kind``, else a
    ConfigError naming the setting ``name`` and the allowed values."""
    try:
        return kind(value.value if isinstance(value, kind) else value)
    except ValueError:
        allowed = [m.value for m in kind]
        raise ConfigError(f"{name} must be one of {allowed}; {value!r} is not one of "
                          "them") from None


def check_examples(examples: Any, *, argument: str = "examples") -> Sequence[Any]:
    """``examples`` if it is a sequence whose positions are record ids, else a ConfigError.

    Accepted: anything with ``len()`` and integer indexing (a list, a tuple, a map-style
    ``torch.utils.data.Dataset`` with ``__len__``). Refused, because their order is not a
    stable record order or their items are not examples: a ``DataLoader`` (collated
    batches, shuffled by its sampler), an iterator or generator, an ``IterableDataset``, a
    set, a mapping and a string. ``argument`` names the parameter in the message.
    """
    if isinstance(examples, DataLoader):
        order = ("shuffles" if isinstance(examples.sampler, RandomSampler)
                 else "may reorder")
        raise ConfigError(
            f"{argument} is a torch DataLoader, which yields collated batches and {order} "
            f"the records, so its positions are not record ids; pass the sequence of "
            f"examples itself, e.g. {argument}=loader.dataset: score column j is then the "
            f"example at position j")
    kind = None
    if isinstance(examples, (str, bytes)):
        kind = "a string"
    elif isinstance(examples, Mapping):
        kind = "a mapping"
    elif isinstance(examples, Set):
        kind = "a set (no order)"
    elif isinstance(examples, (Iterator, IterableDataset)):
        kind = "an iterator (no stable positions)"
    elif not (hasattr(examples, "__len__") and hasattr(examples, "__getitem__")):
        kind = f"a {type(examples).__name__} without len() and indexing"
    if kind is not None:
        raise ConfigError(f"{argument} is {kind}; pass a list (or another sequence) of "
                          f"examples, whose positions are the record ids, e.g. "
                          f"{argument}=list(...) in the record order")
    return examples


def batch_size_of(batch: Any) -> int | None:
    """Leading size of the first non-scalar tensor of a batch dict, or None if it has none."""
    if isinstance(batch, Mapping):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return int(value.shape[0])
    return None


def per_example(values: Any, batch: Any, *, what: str) -> torch.Tensor:
    """``values`` as one number per example, shape ``(B,)``; ``(B, 1)`` is squeezed.

    A scalar (a loss reduced with ``mean`` or ``sum`` over the batch), a ``(B, T)``
    per-token array or a leading size other than the batch's raises :class:`ConfigError`
    naming ``what``, the shape received and the fix. Shape checks only, so it is safe inside
    ``torch.func`` transforms.
    """
    size = batch_size_of(batch)
    want = f"(B,) = ({size},)" if size is not None else "(B,)"
    if not isinstance(values, torch.Tensor):
        raise ConfigError(f"{what} must return a tensor of shape {want}, one value per "
                          f"example, got {type(values).__name__}")
    if values.dim() == 2 and values.shape[1] == 1:
        values = values[:, 0]  # (B, 1) -> (B,)
    if values.dim() == 0:
        raise ConfigError(
            f"{what} returned one number for the whole batch (shape ()), a reduction over "
            f"the batch that cannot be undone, so scores would depend on the batch size; "
            f"return one value per example, shape {want}: compute the loss with "
            f"reduction='none' and sum it over each example's own targets")
    if values.dim() != 1 or (size is not None and values.shape[0] != size):
        hint = ("; sum per-token values over each example's targets" if values.dim() == 2
                else "")
        raise ConfigError(f"{what} must have shape {want}, one value per example, got "
                          f"{tuple(values.shape)}{hint}")
    return values


class AttributionTask(abc.ABC):
    """How to batch examples and compute per-example losses; see the module docstring."""

    @abc.abstractmethod
    def collate(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """A batch (dict of tensors with a leading batch dimension) of ``examples``."""

    @abc.abstractmethod
    def train_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Per-example training loss ``(B,)``, each summed over that example's targets."""

    def query_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Per-query loss ``(B,)``; a positive score means a record made it smaller."""
        return self.train_loss(model, batch)

    #: True when :meth:`sampled_loss` also takes a list of one generator per example, so
    #: that a batch draws exactly what its examples would draw alone (the built-in tasks
    #: do); a task without it is sampled one example at a time.
    row_generators: bool = False

    @abc.abstractmethod
    def sampled_loss(self, model: torch.nn.Module, batch: dict,
                     generator: torch.Generator) -> torch.Tensor:
        """Per-example loss ``(B,)`` against targets sampled from the model (true Fisher)."""

    def check_batch(self, batch: dict, rows: Sequence[int]) -> None:
        """Check a collated batch of records ``rows`` before use; warn about what will be
        assumed. Called on every batch of :meth:`batches`; the default checks nothing."""
        return None

    def batches(self, examples: Sequence[Any],
                batch_size: int) -> Iterator[tuple[list[int], dict]]:
        """Yield ``(rows, batch)`` over ``examples`` in order, ``rows`` their positions.

        ``examples`` must be a sequence (:func:`check_examples`) and ``batch_size >= 1``;
        both are checked when this is called, before the first batch.
        """
        check_examples(examples)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        return self._batches(examples, batch_size)

    def _batches(self, examples: Sequence[Any], batch_size: int):
        for start in range(0, len(examples), batch_size):
            rows = list(range(start, min(start + batch_size, len(examples))))
            batch = self.collate([examples[i] for i in rows])
            self.check_batch(batch, rows)
            yield rows, batch


class LMTask(AttributionTask):
    """A causal LM (Hugging Face interface: ``model(input_ids=..., attention_mask=...)``).

    An example is a sequence of token ids, or a dict ``{"input_ids": [...], "labels":
    [...]}`` whose labels are -100 at tokens that are context only (a prompt, or words that
    carry no harm). The loss of a sequence is the **sum** of next-token negative
    log-likelihoods over its labelled tokens (a token sum, never a mean). Batches are
    right-padded with pad labels -100 and attention mask 0, so padding never changes a
    sequence's loss. A batch from a custom ``collate`` that labels padding (attention mask
    0, label not -100; e.g. labels copied from ``input_ids`` with the pad token), or the
    first token after left padding (predicted from a pad), gets a :class:`PadLabelWarning`
    and those labels are ignored as if they were -100 (see :meth:`targets`). Targets of the
    true Fisher are drawn at target positions only, so left padding does not change them.
    """

    row_generators = True

    def __init__(self, *, pad_id: int = 0) -> None:
        self.pad_id = pad_id

    def collate(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        rows = [_as_lm_example(e, i) for i, e in enumerate(examples)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, (seq, lab) in enumerate(rows):
            ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            labels[b, : len(seq)] = torch.tensor(lab, dtype=torch.long)
            mask[b, : len(seq)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def check_batch(self, batch: dict, rows: Sequence[int]) -> None:
        """Warn (:class:`PadLabelWarning`) when padding is labelled as a target, or is the
        context a target is predicted from; :meth:`targets` ignores such labels."""
        labels, mask = batch.get("labels"), batch.get("attention_mask")
        if labels is None or mask is None or labels.shape != mask.shape:
            return
        stray = (labels[:, 1:] != -100) & ~_real_pairs(mask)  # (B, T-1)
        if bool(stray.any()):
            warn_at_caller(
                "a batch has labels other than -100 where attention_mask is 0 (padding) or "
                "right after it (a first token predicted from left padding); harmtrace "
                "ignores them, as if they were -100, so that padding never changes a "
                "sequence's loss. Set those labels to -100 in collate to say so",
                PadLabelWarning)

    @staticmethod
    def targets(batch: dict) -> torch.Tensor:
        """Next-token targets ``(B, T-1)``: ``labels[:, 1:]``, with -100 where a label is
        -100 and wherever the target token or the token predicting it is padding
        (attention mask 0), so that a sequence's loss is the same padded or alone."""
        labels = batch["labels"][:, 1:]
        mask = batch.get("attention_mask")
        if mask is not None and mask.shape == batch["labels"].shape:
            # masked_fill, not a data-dependent branch, so that it runs inside vmap
            labels = labels.masked_fill(~_real_pairs(mask), -100)
        return labels

    def scored_token_ids(self, examples: Sequence[Any]) -> list[dict[str, list[int]]]:
        """Per example, the ``positions`` and ``token_ids`` whose loss is scored: every
        labelled token but the first (it has no context to be predicted from)."""
        out = []
        for index, example in enumerate(examples):
            ids, labels = _as_lm_example(example, index)
            where = [t for t in range(1, len(ids)) if labels[t] != -100]
            out.append({"positions": where, "token_ids": [labels[t] for t in where]})
        return out

    def _logits(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits if hasattr(out, "logits") else out  # (B, T, V)

    def train_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        logits = self._logits(model, batch)[:, :-1]  # (B, T-1, V): predicts token t+1
        targets = self.targets(batch)  # (B, T-1)
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                              reduction="none")  # (B, T-1), 0 where ignored
        return nll.sum(dim=1)

    def sampled_loss(self, model: torch.nn.Module, batch: dict,
                     generator: torch.Generator) -> torch.Tensor:
        logits = self._logits(model, batch)[:, :-1]  # (B, T-1, V)
        keep = self.targets(batch) != -100  # (B, T-1)
        targets = torch.full(keep.shape, -100, dtype=torch.long, device=keep.device)
        with torch.no_grad():
            # draws at target positions only, in order, so that padding (left or right)
            # never shifts the random stream: a sequence draws the same targets padded or
            # alone
            probs = _samplable(torch.softmax(logits.detach()[keep], dim=-1))
            if probs.shape[0]:  # (n_targets, V), row-major over (example, position)
                counts = keep.sum(dim=1).tolist()  # targets of each example
                targets[keep] = _draw(probs, _uniforms(generator, counts))
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                              reduction="none")
        return nll.sum(dim=1)


class ClassificationTask(AttributionTask):
    """``model(x)`` returns logits ``(B, C)``; an example is ``(x, label)``; loss is the CE.

    A label is one class index: an int (or integral float), a tensor, array or list holding
    one such number, or, with ``classes`` (a sequence of class names, keyword-only), a
    name from it. Anything else (a string without ``classes``, a one-hot vector, a
    fraction, a negative index) raises :class:`InputDataError` naming the example. A
    custom ``collate`` may give ``y`` as ``(B,)`` or ``(B, 1)``.
    """

    row_generators = True

    def __init__(self, *, classes: Sequence[str] | None = None) -> None:
        self.classes = None if classes is None else [str(c) for c in classes]

    def collate(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        pairs = [_pair(e, i, "label") for i, e in enumerate(examples)]
        xs = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in pairs])
        ys = torch.tensor([self._label(y, i) for i, (_, y) in enumerate(pairs)],
                          dtype=torch.long)
        return {"x": xs, "y": ys}

    def _label(self, label: Any, index: int) -> int:
        if isinstance(label, str):
            if self.classes is None:
                raise InputDataError(
                    f"the label of example {index} is the string {label!r}; give the class "
                    f"index as an int, or name the classes: ClassificationTask(classes=[...])")
            if label not in self.classes:
                raise InputDataError(f"the label {label!r} of example {index} is not one of "
                                     f"the classes {self.classes[:10]}")
            return self.classes.index(label)
        value = _scalar(label, index, "label", "one class index per example")
        if not value.is_integer() or value < 0:
            raise InputDataError(f"the label of example {index} is {value!r}; a label must "
                                 f"be a class index, an integer >= 0")
        return int(value)

    def labels(self, batch: dict) -> torch.Tensor:
        """Class indices ``(B,)`` of a batch (``(B, 1)`` is squeezed)."""
        return _column(batch, "y", "class labels")

    def logits(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """``model(x)``, checked to be logits ``(B, C)``."""
        out = model(batch["x"])
        if out.dim() != 2 or out.shape[0] != batch["x"].shape[0]:
            raise ConfigError(f"a classification model must return logits (B, C) = "
                              f"({batch['x'].shape[0]}, C), got {tuple(out.shape)}; for one "
                              f"output per example use RegressionTask")
        return out

    def train_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, batch), self.labels(batch),
                               reduction="none")

    def sampled_loss(self, model: torch.nn.Module, batch: dict,
                     generator: torch.Generator) -> torch.Tensor:
        logits = self.logits(model, batch)
        with torch.no_grad():
            probs = _samplable(torch.softmax(logits.detach().double(), dim=-1))  # (B, C)
            drawn = _draw(probs, _uniforms(generator, [1] * len(probs)))
        return F.cross_entropy(logits, drawn, reduction="none")


class RegressionTask(AttributionTask):
    """``model(x)`` returns ``(B,)`` or ``(B, 1)``; an example is ``(x, y)``; loss is
    ``(f(x) - y)^2 / 2``, whose Fisher under unit Gaussian noise is the Gauss-Newton matrix.

    A target is one number: an int or float, or a tensor, array or list holding one. A
    string or several numbers raise :class:`InputDataError` naming the example. A custom
    ``collate`` may give ``y`` as ``(B,)`` or ``(B, 1)``; it is never broadcast against the
    ``(B,)`` predictions.
    """

    row_generators = True

    def collate(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        pairs = [_pair(e, i, "target") for i, e in enumerate(examples)]
        xs = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in pairs])
        ys = torch.tensor([_scalar(y, i, "target", "one number per example")
                           for i, (_, y) in enumerate(pairs)], dtype=torch.float32)
        return {"x": xs, "y": ys}

    def targets(self, batch: dict) -> torch.Tensor:
        """Targets ``(B,)`` of a batch (``(B, 1)`` is squeezed)."""
        return _column(batch, "y", "regression targets")

    def _predict(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        out = model(batch["x"])
        if out.dim() == 2 and out.shape[1] == 1:
            out = out[:, 0]
        if out.dim() != 1 or out.shape[0] != batch["x"].shape[0]:
            raise ConfigError(f"a regression model must return (B,) or (B, 1) with B = "
                              f"{batch['x'].shape[0]}, got {tuple(out.shape)}")
        return out

    def train_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return 0.5 * (self._predict(model, batch) - self.targets(batch)) ** 2  # (B,)

    def sampled_loss(self, model: torch.nn.Module, batch: dict,
                     generator: torch.Generator) -> torch.Tensor:
        pred = self._predict(model, batch)
        if isinstance(generator, torch.Generator):
            noise = torch.randn(pred.shape, generator=generator, dtype=pred.dtype)
        else:
            noise = torch.cat([torch.randn(1, generator=gen, dtype=pred.dtype)
                               for gen in _per_row(generator, pred.shape[0])])  # (B,)
        return 0.5 * (pred - (pred.detach() + noise)) ** 2


def _per_row(generators: Sequence[torch.Generator], n_rows: int) -> Sequence[torch.Generator]:
    """``generators`` checked to hold one ``torch.Generator`` per row of the batch."""
    if len(generators) != n_rows or not all(isinstance(g, torch.Generator)
                                            for g in generators):
        raise ConfigError(f"sampled_loss takes one torch.Generator or a list of one per "
                          f"example; got {len(generators)} items for a batch of {n_rows}")
    return generators


def _uniforms(generator, counts: list[int]) -> torch.Tensor:
    """``sum(counts)`` uniforms in [0, 1), float64: from one generator, or ``counts[b]`` from
    the ``b``-th of a list of per-example generators, so that an example draws the same
    numbers in a batch as alone."""
    if isinstance(generator, torch.Generator):
        return torch.rand(sum(counts), generator=generator, dtype=torch.float64)
    return torch.cat([torch.rand(n, generator=gen, dtype=torch.float64)
                      for n, gen in zip(counts, _per_row(generator, len(counts)), strict=True)])


def _draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One category per row of ``probs`` ``(n, V)`` by inverting its CDF at ``uniforms``
    ``(n,)``: the same law as ``torch.multinomial``, in one call for every row."""
    cdf = probs.cumsum(dim=-1)  # (n, V), in the model's precision
    point = (uniforms.to(cdf.dtype) * cdf[:, -1])[:, None]  # (n, 1)
    drawn = torch.searchsorted(cdf, point, right=True)[:, 0]
    return drawn.clamp_max(probs.shape[-1] - 1)


def _real_pairs(mask: torch.Tensor) -> torch.Tensor:
    """``(B, T-1)`` bool: token ``t + 1`` and the token ``t`` predicting it are both real."""
    return (mask[:, 1:] != 0) & (mask[:, :-1] != 0)


def _samplable(probs: torch.Tensor) -> torch.Tensor:
    """``probs (..., C)`` with non-finite rows made uniform, so that sampling never fails: the
    loss of such a row stays non-finite and the caller names the record (a raw
    ``torch.multinomial`` error would not)."""
    bad = ~torch.isfinite(probs).all(dim=-1, keepdim=True)
    return torch.where(bad, torch.ones_like(probs), probs)


def _pair(example: Any, index: int, what: str) -> tuple[Any, Any]:
    """``(x, y)`` of one example, or an InputDataError naming it."""
    if isinstance(example, (str, bytes, Mapping)) or not hasattr(example, "__len__") \
            or len(example) != 2:
        raise InputDataError(f"example {index} must be a pair (x, {what}), got "
                             f"{type(example).__name__}")
    x, y = example
    return x, y


def _scalar(value: Any, index: int, what: str, expected: str) -> float:
    """One number from an int, float, 0-d or one-element tensor, array or list."""
    if isinstance(value, (str, bytes)):
        raise InputDataError(f"the {what} of example {index} is the string {value!r}; "
                             f"expected {expected}, as a number")
    if isinstance(value, numbers.Real):
        return float(value)
    if value is None:
        raise InputDataError(f"the {what} of example {index} is None; expected {expected}")
    try:
        array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value,
                           dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InputDataError(f"the {what} of example {index} ({type(value).__name__}) is "
                             f"not a number; expected {expected}") from err
    if array.size != 1:
        raise InputDataError(f"the {what} of example {index} has shape {array.shape}; "
                             f"expected {expected} (shape () or (1,))")
    return float(array.reshape(()))


def _column(batch: dict, key: str, what: str) -> torch.Tensor:
    """``batch[key]`` as ``(B,)``; ``(B, 1)`` is squeezed, other shapes are refused."""
    values = batch[key]
    size = batch["x"].shape[0] if "x" in batch else batch_size_of(batch)
    if values.dim() == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.dim() != 1 or values.shape[0] != size:
        raise ConfigError(f"batch[{key!r}] ({what}) must have shape (B,) or (B, 1) with "
                          f"B = {size}, got {tuple(values.shape)}")
    return values


def _as_lm_example(example: Any, index: int) -> tuple[list[int], list[int]]:
    if isinstance(example, dict):
        if "input_ids" not in example:
            raise InputDataError(f"LM example {index} has no 'input_ids'")
        ids = [int(t) for t in example["input_ids"]]
        labels = [int(t) for t in example.get("labels", ids)]
    else:
        ids = [int(t) for t in example]
        labels = list(ids)
    if not ids:
        raise InputDataError(f"LM example {index} is empty")
    if len(labels) != len(ids):
        raise InputDataError(f"LM example {index} has {len(ids)} input_ids but "
                             f"{len(labels)} labels; give one label per token (-100 to skip)")
    return ids, labels
