"""Representation similarity: how alike a query and a train record look to the model.

A model-based baseline that needs no gradient: each example becomes one vector, the input
of a chosen layer (by default the last ``torch.nn.Linear``, which for a causal LM is the
output head, so the vector is the last hidden state), and the score is the cosine (or dot
product) of the query's and the record's vectors. This follows the "last layer" similarity
explanations evaluated by Hanawa et al. 2021, "Evaluation of Similarity-based Explanations"
(ICLR), where cosine of the last hidden layer is among the more faithful simple methods.

* For an :class:`LMTask` the hidden states ``(B, T, D)`` are averaged over the labelled
  tokens of the sequence (labels other than -100; by default every token), so a harm query
  is represented by its harmful tokens and a record by its tokens;
* for any other task the layer input ``(B, ...)`` is flattened per example.

Sign: larger is more similar, read as "more to blame", the project's direction; it is a
heuristic with no counterfactual meaning, and the cosine lies in ``[-1, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from harmtrace.attribute.exact import _cast_batch
from harmtrace.attribute.task import AttributionTask, LMTask, check_train_and_queries
from harmtrace.errors import ConfigError, InputDataError, NumericalError

__all__ = ["default_layer", "representations", "repsim_scores"]


def default_layer(model: torch.nn.Module) -> str:
    """Name of the last ``torch.nn.Linear`` module of ``model`` (in registration order)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            last = name
    if last is None:
        raise ConfigError("the model has no torch.nn.Linear module; pass layer= the name of "
                          "the module whose input is the representation")
    return last


def _module(model: torch.nn.Module, layer: str) -> torch.nn.Module:
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ConfigError(f"layer = {layer!r} is not a module of the model; some names: "
                          f"{[n for n in modules if n][-5:]}")
    return modules[layer]


def _pool(task: AttributionTask, hidden: torch.Tensor, batch: dict, rows: list[int],
          what: str) -> torch.Tensor:
    """One vector per example ``(B, D)`` from the layer input ``hidden``."""
    if isinstance(task, LMTask) and hidden.dim() == 3:  # (B, T, D)
        keep = (batch["labels"] != -100) & (batch["attention_mask"] != 0)  # (B, T)
        counts = keep.sum(dim=1)
        if (counts == 0).any():
            first = rows[int((counts == 0).nonzero()[0])]
            raise InputDataError(f"{what} record {first} has no labelled token to represent; "
                                 "give it labels other than -100")
        summed = (hidden.double() * keep[..., None]).sum(dim=1)  # (B, D)
        return summed / counts[:, None]
    return hidden.double().reshape(hidden.shape[0], -1)


def representations(model: torch.nn.Module, task: AttributionTask, examples: Sequence[Any], *,
                    layer: str | None = None, query: bool = False,
                    batch_size: int = 32) -> torch.Tensor:
    """Representations ``(len(examples), D)`` float64: the input of ``layer`` (default the
    last Linear), pooled per example. The forward pass is the task's ``query_loss`` when
    ``query`` else its ``train_loss``; the model runs in eval mode and its mode is restored.
    """
    target = _module(model, layer if layer is not None else default_layer(model))
    captured: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, args: tuple) -> None:
        captured.append(args[0].detach())

    dtype = next(model.parameters()).dtype
    forward = task.query_loss if query else task.train_loss
    what = "query" if query else "train"
    out: list[torch.Tensor] = []
    handle = target.register_forward_pre_hook(hook)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for rows, batch in task.batches(examples, batch_size):
                captured.clear()
                forward(model, _cast_batch(batch, dtype))
                if len(captured) != 1:
                    raise ConfigError(f"layer {layer!r} ran {len(captured)} times in one "
                                      "forward pass; choose a module that runs once")
                out.append(_pool(task, captured[0], batch, rows, what))
    finally:
        handle.remove()
        model.train(was_training)
    reps = torch.cat(out)
    _check(reps, what)
    return reps


def _check(reps: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(reps).all(dim=1)
    if bad.any():
        raise NumericalError(f"the representation of {what} record {int(bad.nonzero()[0])} "
                             "is not finite; check the record and the model's weights")


def _normalised(reps: torch.Tensor, what: str) -> torch.Tensor:
    norms = reps.norm(dim=1, keepdim=True)
    zero = norms[:, 0] == 0
    if zero.any():
        raise NumericalError(f"the representation of {what} record {int(zero.nonzero()[0])} "
                             "is zero, so its cosine is undefined; use normalise=False")
    return reps / norms


def repsim_scores(model: torch.nn.Module, task: AttributionTask, train: Sequence[Any],
                  queries: Sequence[Any], *, layer: str | None = None, normalise: bool = True,
                  batch_size: int = 32) -> np.ndarray:
    """Similarity of representations, shape ``(n_query, n_train)`` float64.

    ``scores[i, j]`` is the cosine (``normalise=True``, in ``[-1, 1]``) or dot product of
    query ``i``'s and train record ``j``'s representations (:func:`representations`);
    larger means more alike, read as more to blame (Hanawa et al. 2021).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    check_train_and_queries(train, queries, caller="repsim_scores")
    common = {"layer": layer, "batch_size": batch_size}
    train_reps = representations(model, task, train, **common)  # (n_train, D)
    query_reps = representations(model, task, queries, query=True, **common)  # (n_query, D)
    if normalise:
        train_reps = _normalised(train_reps, "train")
        query_reps = _normalised(query_reps, "query")
    scores = query_reps @ train_reps.T  # (n_query, n_train)
    if normalise:
        scores = scores.clamp(-1.0, 1.0)  # rounding can step just outside
    return scores.numpy()
