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

Examples keep their position in the list they are handed in: scores are indexed by that
position, never by a loader's order.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from harmtrace.errors import ConfigError, InputDataError

__all__ = ["AttributionTask", "ClassificationTask", "LMTask", "RegressionTask"]


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

    @abc.abstractmethod
    def sampled_loss(self, model: torch.nn.Module, batch: dict,
                     generator: torch.Generator) -> torch.Tensor:
        """Per-example loss ``(B,)`` against targets sampled from the model (true Fisher)."""

    def batches(self, examples: Sequence[Any], batch_size: int):
        """Yield ``(rows, batch)`` over ``examples`` in order, ``rows`` their positions."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(examples), batch_size):
            rows = list(range(start, min(start + batch_size, len(examples))))
            yield rows, self.collate([examples[i] for i in rows])


class LMTask(AttributionTask):
    """A causal LM (Hugging Face interface: ``model(input_ids=..., attention_mask=...)``).

    An example is a sequence of token ids, or a dict ``{"input_ids": [...], "labels":
    [...]}`` whose labels are -100 at tokens that are context only (a prompt, or words that
    carry no harm). The loss of a sequence is the **sum** of next-token negative
    log-likelihoods over its labelled tokens. Batches are right-padded with pad labels -100
    and attention mask 0, so padding never changes a sequence's loss.
    """

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

    def _logits(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits if hasattr(out, "logits") else out  # (B, T, V)

    def train_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        logits = self._logits(model, batch)[:, :-1]  # (B, T-1, V): predicts token t+1
        targets = batch["labels"][:, 1:]  # (B, T-1)
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                              reduction="none")  # (B, T-1), 0 where ignored
        return nll.sum(dim=1)

    def sampled_loss(self, model: torch.nn.Module, batch: dict,
                     generator: torch.Generator) -> torch.Tensor:
        logits = self._logits(model, batch)[:, :-1]  # (B, T-1, V)
        with torch.no_grad():
            probs = torch.softmax(logits.detach().double(), dim=-1)
            flat = probs.reshape(-1, probs.shape[-1])
            drawn = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:2])
        keep = batch["labels"][:, 1:] != -100
        targets = drawn.masked_fill(~keep, -100)
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                              reduction="none")
        return nll.sum(dim=1)


class ClassificationTask(AttributionTask):
    """``model(x)`` returns logits ``(B, C)``; an example is ``(x, label)``; loss is the CE."""

    def collate(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        xs = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in examples])
        ys = torch.tensor([int(y) for _, y in examples], dtype=torch.long)
        return {"x": xs, "y": ys}

    def train_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")

    def sampled_loss(self, model: torch.nn.Module, batch: dict,
                     generator: torch.Generator) -> torch.Tensor:
        logits = model(batch["x"])
        with torch.no_grad():
            probs = torch.softmax(logits.detach().double(), dim=-1)
            drawn = torch.multinomial(probs, 1, generator=generator)[:, 0]
        return F.cross_entropy(logits, drawn, reduction="none")


class RegressionTask(AttributionTask):
    """``model(x)`` returns ``(B,)`` or ``(B, 1)``; an example is ``(x, y)``; loss is
    ``(f(x) - y)^2 / 2``, whose Fisher under unit Gaussian noise is the Gauss-Newton matrix."""

    def collate(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        xs = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in examples])
        ys = torch.tensor([float(y) for _, y in examples], dtype=torch.float32)
        return {"x": xs, "y": ys}

    def _predict(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        out = model(batch["x"])
        if out.dim() == 2 and out.shape[1] == 1:
            out = out[:, 0]
        if out.dim() != 1:
            raise ConfigError(f"a regression model must return (B,) or (B, 1), got "
                              f"{tuple(out.shape)}")
        return out

    def train_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return 0.5 * (self._predict(model, batch) - batch["y"]) ** 2

    def sampled_loss(self, model: torch.nn.Module, batch: dict,
                     generator: torch.Generator) -> torch.Tensor:
        pred = self._predict(model, batch)
        noise = torch.randn(pred.shape, generator=generator, dtype=pred.dtype)
        return 0.5 * (pred - (pred.detach() + noise)) ** 2


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
