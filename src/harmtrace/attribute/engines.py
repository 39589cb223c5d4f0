"""The attribution engines, adapted to the pipeline's :class:`AttributionInputs`.

The engines (:mod:`~harmtrace.attribute.influence`, :mod:`~harmtrace.attribute.trak`,
:mod:`~harmtrace.attribute.logra`, :mod:`~harmtrace.attribute.repsim`,
:mod:`~harmtrace.attribute.exact`) see a model through an :class:`~harmtrace.attribute.task.
LMTask`. Here the pipeline's inputs become that task's examples:

* a query (:class:`~harmtrace.behaviours.focus.FocusedQuery`) becomes ``{"input_ids":
  token_ids, "labels": [t if target_mask[t] else -100]}``, so its loss is the summed NLL of
  its focus tokens;
* a train record is its token ids, every token labelled (summed NLL of the record).

Each adapter returns ``(scores, metadata)``: ``scores`` ``(n_query, n_train)`` float64,
**positive when the record made the query's focus tokens more likely** (lowered its loss),
and what was actually used (damping, projection dimension, modules, normalisation) for the
``scores-{method}.json`` written beside the score file. :mod:`harmtrace.attribute.methods`
registers them by name.

Which parameters: ``attribute.parameters`` (substrings of parameter names) selects, for
``ekfac``, ``kfac`` and ``logra``, the Linear / Conv1D layers whose weight or bias names
match (these engines read per-layer gradients; the embeddings and the output head tied to
them are left out); for ``trak`` the parameters themselves; ``repsim`` uses no gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from harmtrace.attribute.exact import (
    LRSchedule,
    Optimizer,
    ReplaySpec,
    exact_scores,
    replay_memory_bytes,
    train_weighted,
)
from harmtrace.attribute.gradients import trainable_parameters
from harmtrace.attribute.influence import InfluenceSettings, Strategy, influence_scores
from harmtrace.attribute.layers import tracked_modules
from harmtrace.attribute.logra import LograSettings, logra_scores
from harmtrace.attribute.repsim import default_layer, repsim_scores
from harmtrace.attribute.task import LMTask
from harmtrace.attribute.token_influence import TokenInfluenceSettings, token_influence_scores
from harmtrace.attribute.trak import TrakSettings, trak_scores
from harmtrace.behaviours.focus import FocusedQuery
from harmtrace.errors import ConfigError, NumericalError
from harmtrace.models.lm import GRAD_CLIP_NORM, LMSettings, batch_order, build_lm, warmup_steps

if TYPE_CHECKING:
    from harmtrace.attribute.methods import AttributionInputs

__all__ = [
    "LMTraining",
    "exact",
    "influence",
    "logra",
    "lm_query",
    "replay_spec",
    "repsim",
    "token_influence",
    "trak",
]

Adapter = Callable[["AttributionInputs"], tuple[np.ndarray, dict]]

#: Refuse a TRAK projection matrix larger than this (it is held in memory).
_TRAK_MAX_BYTES = 4 << 30


@dataclass(frozen=True)
class LMTraining:
    """How the pipeline trained the model (``harmtrace.models.lm.train_lm``): the LM
    settings, the training seed and the tokenizer. The ``exact`` method replays it."""

    settings: LMSettings
    seed: int
    tokenizer: Any


def lm_query(query: FocusedQuery) -> dict[str, list[int]]:
    """The :class:`LMTask` example of a query: labels -100 except at its focus tokens."""
    labels = [t if keep else -100
              for t, keep in zip(query.token_ids, query.target_mask, strict=True)]
    return {"input_ids": list(query.token_ids), "labels": labels}


def _examples(inputs: AttributionInputs) -> tuple[LMTask, list[list[int]], list[dict]]:
    train = [list(s) for s in inputs.train_sequences]
    return LMTask(pad_id=inputs.pad_id), train, [lm_query(q) for q in inputs.queries]


def _final(inputs: AttributionInputs) -> torch.nn.Module:
    if not inputs.checkpoints:
        raise ConfigError("attribution needs at least one checkpoint (model, learning rate)")
    return inputs.checkpoints[-1][0]


def _layers(model: torch.nn.Module, parameters: Sequence[str], method: str) -> tuple[str, ...]:
    """Full names of the tracked Linear/Conv1D layers selected by ``attribute.parameters``
    (all of them when it is empty); see the module docstring."""
    every = tracked_modules(model)
    if not parameters:
        return tuple(every)
    chosen = [n for n in every
              if any(s in f"{n}.weight" or s in f"{n}.bias" for s in parameters)]
    if not chosen:
        raise ConfigError(
            f"attribute.parameters = {list(parameters)} selects no Linear/Conv1D layer, and "
            f"method {method} reads per-layer gradients; name layers such as "
            f"{every[:3]} (embeddings and the tied output head are not supported)")
    return tuple(chosen)


# --------------------------------------------------------------------------- influence

_INFLUENCE_NOTE = ("curvature of the mean train loss; one record's removal changes the "
                   "query loss by about +score / n_train")


def influence(strategy: Strategy) -> Adapter:
    """The adapter of the influence functions with curvature ``strategy`` (final model)."""

    def run(inputs: AttributionInputs) -> tuple[np.ndarray, dict]:
        task, train, queries = _examples(inputs)
        model = _final(inputs)
        modules = _layers(model, inputs.parameters, strategy.value)
        settings = InfluenceSettings(strategy=strategy, damping=inputs.influence_damping,
                                     seed=inputs.seed, batch_size=inputs.batch_size,
                                     modules=modules)
        try:
            result = influence_scores(model, task, train, queries, settings=settings)
        except NumericalError as err:
            if "damping" not in str(err):
                raise
            raise NumericalError(f"{err} (in the config: raise attribute.influence_damping, "
                                 "or leave the key out for the default)") from err
        meta = result.metadata
        return result.scores, {
            "normalisation": meta["normalisation"],
            "damping": {"per_module": meta["damping"], "rule": meta["damping_rule"]},
            "projection_dim": None,
            "projected": False,
            "parameters": list(meta["modules"]),
            "details": {"strategy": meta["strategy"], "fisher": meta["fisher"],
                        "min_eigenvalue": meta["min_eigenvalue"], "note": _INFLUENCE_NOTE,
                        "checkpoint": "final"},
        }

    return run


def token_influence(inputs: AttributionInputs) -> tuple[np.ndarray, dict]:
    """Token-level K-FAC influence of the output head; a record scores as its best token."""
    _, train, queries = _examples(inputs)
    settings = TokenInfluenceSettings(batch_size=inputs.batch_size)
    result = token_influence_scores(_final(inputs), train, queries, settings=settings,
                                    pad_id=inputs.pad_id, progress=inputs.progress)
    meta = result.metadata
    return result.scores, {
        "normalisation": (
            "score(q, t) = sum over the query's focus positions s of (g_t S^-1 g_s)"
            "(a_t A^-1 a_s) for every train token t; a record's score is that of its best "
            f"token; {meta['normalisation']}"),
        "damping": {"per_module": meta["damping"], "rule": meta["damping_rule"]},
        "projection_dim": None,
        "projected": False,
        "parameters": list(meta["modules"]),
        "details": {"aggregation": meta["aggregation"], "factor_kind": meta["factor_kind"],
                    "tied_output_head": meta["tied_output_head"],
                    "n_train_tokens": meta["n_train_tokens"], "checkpoint": "final",
                    "best_token": result.best_token.tolist()},
    }


# --------------------------------------------------------------------------- TRAK


def trak(inputs: AttributionInputs) -> tuple[np.ndarray, dict]:
    """TRAK over the final model or every saved checkpoint (``trak_ensemble``)."""
    task, train, queries = _examples(inputs)
    final = _final(inputs)
    if inputs.trak_ensemble == "checkpoints":
        models = [m for m, _ in inputs.checkpoints]
    elif inputs.trak_ensemble == "final":
        models = [final]
    else:
        raise ConfigError(f"attribute.trak_ensemble = {inputs.trak_ensemble!r} is unknown; "
                          "use 'checkpoints' or 'final'")
    n_params = sum(p.numel() for p in trainable_parameters(final, inputs.parameters).values())
    dim = inputs.trak_projection_dim
    if 0 < dim < n_params and n_params * dim * 4 > _TRAK_MAX_BYTES:
        raise ConfigError(
            f"TRAK's projection of {n_params:,} parameters to {dim} dimensions needs "
            f"{n_params * dim * 4 / 2**30:.1f} GiB; lower attribute.trak_projection_dim or "
            "restrict attribute.parameters")
    settings = TrakSettings(projection_dim=dim, seed=inputs.seed, damping=inputs.damping,
                            parameters=inputs.parameters, batch_size=inputs.batch_size)
    result = trak_scores(models, task, train, queries, settings=settings)
    meta = result.metadata
    return result.scores, {
        "normalisation": (
            "features: gradients of the output function, the summed per-token margin "
            "log p - log(1 - p) over labelled tokens; kernel (Phi^T Phi + lambda I)^-1 "
            "over the train features; train weight q_j = mean of (1 - p) over the record's "
            "tokens; scores averaged over the models of the ensemble; no 1/n factor"),
        "damping": {"lambda_per_model": list(meta.damping),
                    "rule": f"attribute.damping = {inputs.damping:g} x trace(Phi^T Phi) / k"},
        "projection_dim": meta.projection_dim,
        "projected": meta.projected,
        "parameters": list(meta.parameters),
        "details": {"n_models": meta.n_models, "ensemble": inputs.trak_ensemble,
                    "n_params": meta.n_params, "per_example": list(meta.per_example),
                    "smallest_eigenvalue": list(meta.smallest_eigenvalue)},
    }


# --------------------------------------------------------------------------- LoGra


def logra(inputs: AttributionInputs) -> tuple[np.ndarray, dict]:
    """LoGra-projected gradient dot products at the final model."""
    task, train, queries = _examples(inputs)
    model = _final(inputs)
    settings = LograSettings(k_in=inputs.logra_k_in, k_out=inputs.logra_k_out,
                             seed=inputs.seed, batch_size=inputs.batch_size,
                             modules=_layers(model, inputs.parameters, "logra"))
    result = logra_scores(model, task, train, queries, settings=settings)
    meta = result.metadata
    return np.asarray(result.scores, dtype=np.float64), {
        "normalisation": ("gradients of the summed token NLL (query: its focus tokens; "
                          "record: all tokens), Kronecker-projected per layer; plain dot "
                          "product (no curvature); no 1/n factor"),
        "damping": None,
        "projection_dim": meta["dim"],
        "projected": not all(m["exact_in"] and m["exact_out"]
                             for m in meta["modules"].values()),
        "parameters": list(meta["parameters"] or []),
        "details": {"k_in": inputs.logra_k_in, "k_out": inputs.logra_k_out,
                    "modules": meta["modules"], "dim_warning": meta["dim_warning"],
                    "checkpoint": "final"},
    }


# --------------------------------------------------------------------------- repsim


def repsim(inputs: AttributionInputs) -> tuple[np.ndarray, dict]:
    """Cosine of mean last hidden states at the final model."""
    task, train, queries = _examples(inputs)
    model = _final(inputs)
    layer = default_layer(model)
    scores = repsim_scores(model, task, train, queries, layer=layer,
                           batch_size=inputs.batch_size)
    return scores, {
        "normalisation": ("cosine of the input of the last Linear layer (the last hidden "
                          "state), averaged over the labelled tokens; no loss, in [-1, 1]"),
        "damping": None,
        "projection_dim": None,
        "projected": False,
        "parameters": [],
        "details": {"layer": layer, "checkpoint": "final"},
    }


# --------------------------------------------------------------------------- exact


def replay_spec(settings: LMSettings, n_records: int, *, seed: int) -> ReplaySpec:
    """The :class:`ReplaySpec` of ``train_lm(sequences, tokenizer, settings, seed=seed)``
    on ``n_records`` sequences: AdamW, warm-up then cosine decay, gradients clipped to
    :data:`~harmtrace.models.lm.GRAD_CLIP_NORM`, mean token loss, the same batch order."""
    steps = batch_order(n_records, settings, seed=seed)
    return ReplaySpec(
        lr=settings.learning_rate, init_seed=seed, optimizer=Optimizer.ADAMW,
        weight_decay=settings.weight_decay, max_grad_norm=GRAD_CLIP_NORM,
        schedule=LRSchedule.COSINE, warmup_steps=warmup_steps(len(steps), settings),
        normalisation="tokens", batch_order=tuple(tuple(rows) for rows in steps))


_EXACT_NEEDS = (
    "method 'exact' replays the model's whole training, so it needs how the model was "
    "trained: the pipeline knows it only for a model its train stage trained (not for "
    "train.model_path). For another model, call harmtrace.attribute.exact.exact_scores with "
    "a ReplaySpec (optimiser, learning-rate schedule, batch order) and a model factory")


def exact(inputs: AttributionInputs) -> tuple[np.ndarray, dict]:
    """Metagradients through the replayed training of the pipeline's own model."""
    training = inputs.training
    if training is None:
        raise ConfigError(_EXACT_NEEDS)
    task, train, queries = _examples(inputs)
    spec = replay_spec(training.settings, len(train), seed=training.seed)

    def factory() -> torch.nn.Module:
        return build_lm(training.settings, training.tokenizer)

    need = replay_memory_bytes(spec, factory, task, train)
    if need > inputs.exact_max_bytes:
        raise ConfigError(
            f"method 'exact' unrolls all {len(spec.batch_order)} training steps, about "
            f"{need / 2**30:.2f} GiB, over attribute.exact_max_gib = "
            f"{inputs.exact_max_bytes / 2**30:g}; raise it, or use fewer train records, "
            "epochs or a smaller model")
    _check_replay(spec, factory, task, train, _final(inputs))
    scores = exact_scores(spec, factory, task, train, queries,
                          max_graph_bytes=inputs.exact_max_bytes)
    return scores, {
        "normalisation": (
            "batch loss sum_i w_i l_i / (labelled tokens of the batch), train_lm's mean "
            "token loss; scores[i, j] = -d(query i's summed focus-token NLL)/d w_j at w = 1 "
            "through every replayed step; removing record j raises the loss by about "
            "the score"),
        "damping": None,
        "projection_dim": None,
        "projected": False,
        "parameters": list(trainable_parameters(_final(inputs))),
        "details": {"steps": len(spec.batch_order), "optimizer": spec.optimizer.value,
                    "lr": spec.lr, "warmup_steps": spec.warmup_steps,
                    "schedule": spec.schedule.value, "max_grad_norm": spec.max_grad_norm,
                    "weight_decay": spec.weight_decay, "graph_bytes_estimate": need,
                    "dtype": "float32, as trained"},
    }


def _check_replay(spec: ReplaySpec, factory, task: LMTask, train: list[list[int]],
                  final: torch.nn.Module) -> None:
    """Refuse a replay that does not reproduce the final checkpoint: its metagradients would
    describe some other training."""
    replayed = dict(train_weighted(spec, factory, task, train, np.ones(len(train)))
                    .named_parameters())
    worst, where = 0.0, ""
    for name, param in final.named_parameters():
        if name not in replayed:
            raise ConfigError(f"the replayed model has no parameter {name}; {_EXACT_NEEDS}")
        gap = float((replayed[name].detach() - param.detach()).abs().max())
        scale = float(param.detach().abs().max())
        if gap > 1e-3 * max(scale, 1.0) and gap > worst:
            worst, where = gap, name
    if where:
        raise ConfigError(
            f"replaying train_lm does not reproduce the final checkpoint (parameter {where} "
            f"differs by {worst:.3g}); the model was not trained by this pipeline with "
            f"these settings. {_EXACT_NEEDS}")
