"""Influence over a training trajectory: SOURCE (approximate unrolling) and a checkpoint sum.

A single-checkpoint influence function assumes the final model minimises the train loss and
so ignores how a record's effect built up during training. Here training is described by a
list of :class:`Segment`: segment ``l`` (``l = 1..L`` in training order) took ``K_l``
optimiser steps of size ``eta_l``, and its checkpoint ``model`` stands for the parameters of
that stretch. Every segment's curvature ``H_l`` is an EK-FAC (or K-FAC) fit of
:func:`harmtrace.attribute.influence.fit_factors` at its checkpoint; in that eigenbasis a
function of ``H_l`` is the function of its eigenvalues ``lambda``.

**SOURCE** (:attr:`Combine.SOURCE`; Bae et al. 2024, "Training Data Attribution via
Approximate Unrolling"). With ``H_l`` and the record's gradient ``g_l(z)`` held constant
over the segment, gradient descent on ``mean_j L_j + eps L_z``, linearised, unrolls to

    d theta_T / d eps = - sum_l  S_{l+1} ... S_L (I - S_l) H_l^-1 g_l(z),
    S_l = exp(-eta_l K_l H_l)   (the paper's approximation of (I - eta_l H_l)^K_l),

and the score of train record ``j`` for query ``i`` is ``-g_query_i^T d theta_T / d eps``:

    scores[i, j] = sum_l  < phi_l(H_l) S_{l+1} ... S_L g_query_i , g_l(z_j) >,
    phi_l(lambda) = (1 - exp(-eta_l K_l lambda)) / lambda   (= eta_l K_l at lambda = 0).

``g_query_i`` is the query-loss gradient at the **last** checkpoint, which must be the
trained model the queries measure. Each matrix is symmetric, so the products are applied to
the query side, one segment at a time from the last backwards, module by module (EK-FAC is
block-diagonal over modules). ``phi`` is finite at ``lambda = 0``, so SOURCE needs no
damping term; ``source_damping=True`` uses ``lambda + damping`` with the damping of the
fitted factors instead. As
``eta_l K_l lambda -> inf`` (one segment, long horizon, damped) the score becomes the plain
influence ``g_query^T (H + damping)^-1 g_train``; as it goes to 0 it becomes
``eta K g_query^T g_train`` (a TracIn term).

Simplifications against the paper, stated exactly: (1) a segment's curvature and train
gradients come from **one** checkpoint, where the paper averages the EK-FAC factors and the
gradients over several checkpoints of the segment; (2) ``eta_l`` is whatever step size the
caller gives (the segment's mean learning rate is the natural choice); for SGD with momentum
``beta`` pass ``lr / (1 - beta)``, and when the training loss is not the mean over records
of each record's summed loss (a token-mean LM loss) divide by the same normaliser; Adam's
per-parameter step is not modelled, so ``eta_l`` is then only a horizon; (3) ``H_l`` is the
(true or empirical) Fisher of :class:`~harmtrace.attribute.influence.InfluenceSettings`,
positive semi-definite, so ``S_l`` never amplifies a direction; the true Hessian's negative
eigenvalues are not represented.

**Checkpoint sum** (:attr:`Combine.SUM`): the influence of each checkpoint with its own
query and train gradients, weighted by the segment's share of the training time,

    scores = sum_l  w_l  scores_l,   w_l = eta_l K_l / sum_m eta_m K_m,

so one segment gives exactly the plain influence score (factor 1).

Sign (whole project): ``scores[i, j] > 0`` means train record ``j`` made query ``i``'s loss
smaller. Scale: as for :mod:`harmtrace.attribute.influence`, removing record ``j`` of ``n``
changes the query loss by about ``scores[i, j] / n``.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from harmtrace.attribute.influence import (
    InfluenceFactors,
    InfluenceResult,
    InfluenceSettings,
    Strategy,
    fit_factors,
    query_features,
    score,
    train_feature_blocks,
)
from harmtrace.attribute.task import as_enum, check_examples
from harmtrace.errors import ConfigError, NumericalError

__all__ = ["Combine", "Segment", "UnrolledSettings", "unrolled_scores"]

log = logging.getLogger(__name__)


class Combine(enum.StrEnum):
    """``source``: approximate unrolling (Bae et al. 2024); ``sum``: weighted checkpoint sum."""

    SOURCE = "source"
    SUM = "sum"


@dataclass(frozen=True, eq=False)
class Segment:
    """One stretch of training: ``n_steps`` optimiser steps of size ``learning_rate``.

    model: the checkpoint that stands for the segment (its curvature and train gradients);
        the last segment's model is the trained model whose query losses are explained.
    learning_rate: float > 0, the step size on the mean train loss (see the module
        docstring for momentum and token-mean losses).
    n_steps: int >= 1, the optimiser steps in the segment.
    """

    model: torch.nn.Module
    learning_rate: float
    n_steps: int

    def __post_init__(self) -> None:
        if not isinstance(self.model, torch.nn.Module):
            raise ConfigError(f"Segment.model must be a torch.nn.Module, got "
                              f"{type(self.model).__name__}")
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (
                math.isfinite(lr) and lr > 0):
            raise ConfigError(f"Segment.learning_rate must be a finite number > 0, got "
                              f"{lr!r}; give the segment's (mean) step size")
        steps = self.n_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"Segment.n_steps must be an integer >= 1, got {steps!r}")
        object.__setattr__(self, "learning_rate", float(lr))

    @property
    def duration(self) -> float:
        """``learning_rate * n_steps``, the segment's time ``eta K``."""
        return self.learning_rate * self.n_steps


@dataclass(frozen=True)
class UnrolledSettings:
    """Settings of :func:`unrolled_scores`, validated on construction.

    combine: :class:`Combine` or its name, default ``source``.
    influence: the :class:`InfluenceSettings` of every checkpoint's factors (default:
        EK-FAC, true Fisher, damping 0.1 x mean eigenvalue); ``source`` needs the
        ``ekfac`` or ``kfac`` strategy (an eigenbasis).
    source_damping: bool, default False. ``source`` only: add the factors' damping to the
        eigenvalues (``phi`` and ``S`` of ``lambda + damping``); False follows the paper.
    """

    combine: Combine = Combine.SOURCE
    influence: InfluenceSettings = field(default_factory=InfluenceSettings)
    source_damping: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "combine",
                           as_enum(Combine, self.combine, "UnrolledSettings.combine"))
        if not isinstance(self.influence, InfluenceSettings):
            raise ConfigError(f"UnrolledSettings.influence must be an InfluenceSettings, got "
                              f"{type(self.influence).__name__}")
        eigen = (Strategy.EKFAC, Strategy.KFAC)
        if self.combine is Combine.SOURCE and self.influence.strategy not in eigen:
            raise ConfigError(f"combine 'source' needs influence strategy 'ekfac' or 'kfac' "
                              f"(an eigenbasis), got {self.influence.strategy.value!r}; "
                              f"change the strategy or use combine 'sum'")
        if not isinstance(self.source_damping, bool):
            raise ConfigError(f"UnrolledSettings.source_damping must be True or False, got "
                              f"{self.source_damping!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"combine": self.combine.value, "influence": self.influence.to_dict(),
                "source_damping": self.source_damping}


def unrolled_scores(segments: Sequence[Segment | tuple], task, train_examples: Sequence[Any],
                    query_examples: Sequence[Any], *,
                    settings: UnrolledSettings | None = None) -> InfluenceResult:
    """Trajectory influence ``scores (n_query, n_train)`` float64 over ``segments``.

    ``segments`` are in training order, each a :class:`Segment` or a tuple
    ``(model, learning_rate, n_steps)``; the last one's model is the trained model.
    ``scores[i, j] > 0`` means train record ``j`` made query ``i``'s loss
    (``task.query_loss`` at the last checkpoint) smaller; see the module docstring for the
    formulas. Curvature is fitted at every checkpoint over ``train_examples``. A non-finite
    gradient, curvature or score raises :class:`NumericalError` naming the segment and,
    where known, the record.
    """
    settings = settings or UnrolledSettings()
    segments = _segments(segments)
    check_examples(train_examples, argument="train_examples")
    check_examples(query_examples, argument="query_examples")
    if len(query_examples) == 0 or len(train_examples) == 0:
        raise ConfigError(f"unrolled_scores needs at least one query and one train example, "
                          f"got {len(query_examples)} query and {len(train_examples)} train")

    factors = []
    for index, seg in enumerate(segments):
        with _naming(index, len(segments)):
            factors.append(fit_factors(seg.model, task, train_examples,
                                       settings=settings.influence))
    _check_same_modules(factors)

    if settings.combine is Combine.SUM:
        scores = _checkpoint_sum(segments, factors, task, train_examples, query_examples)
    else:
        scores = _source(segments, factors, task, train_examples, query_examples,
                         damped=settings.source_damping)
    if not np.isfinite(scores).all():
        i, j = (int(v) for v in np.argwhere(~np.isfinite(scores))[0])
        raise NumericalError(f"the unrolled score of query {i} and train record {j} is not "
                             f"finite; check that record and the checkpoints' weights")
    meta = _metadata(segments, factors, settings)
    meta.update(n_query=len(query_examples), n_train=len(train_examples))
    log.info("unrolled %s scores over %d segments: %d queries x %d train records",
             settings.combine.value, len(segments), len(query_examples), len(train_examples))
    return InfluenceResult(scores, None, meta)


# --------------------------------------------------------------------------- validation


def _segments(segments: Any) -> list[Segment]:
    single = (isinstance(segments, tuple) and len(segments) > 0
              and isinstance(segments[0], torch.nn.Module))
    if (single or isinstance(segments, (Segment, str, bytes))
            or not isinstance(segments, Sequence)):
        raise ConfigError(f"segments must be a list of Segment or (model, learning_rate, "
                          f"n_steps) tuples, got {type(segments).__name__}")
    if len(segments) == 0:
        raise ConfigError("segments is empty; give at least one checkpoint as "
                          "Segment(model, learning_rate, n_steps)")
    out = []
    for index, seg in enumerate(segments):
        if isinstance(seg, Segment):
            out.append(seg)
            continue
        if not isinstance(seg, tuple) or len(seg) != 3:
            raise ConfigError(f"segments[{index}] must be a Segment or a (model, "
                              f"learning_rate, n_steps) tuple, got {seg!r:.80}")
        try:
            out.append(Segment(*seg))
        except ConfigError as err:
            raise ConfigError(f"segments[{index}]: {err}") from err
    return out


def _check_same_modules(factors: list[InfluenceFactors]) -> None:
    first = factors[0]
    for index, f in enumerate(factors[1:], start=1):
        if f.modules != first.modules or f.info != first.info:
            raise ConfigError(f"the checkpoint of segments[{index}] tracks modules "
                              f"{f.modules} but segments[0] tracks {first.modules}; every "
                              f"checkpoint must be the same architecture")


@contextmanager
def _naming(index: int, total: int):
    """Re-raise a :class:`NumericalError` with the segment it came from."""
    try:
        yield
    except NumericalError as err:
        raise NumericalError(f"segments[{index}] (checkpoint {index + 1} of {total}): "
                             f"{err}") from err


# --------------------------------------------------------------------------- combining


def _checkpoint_sum(segments, factors, task, train, queries) -> np.ndarray:
    total = sum(s.duration for s in segments)
    scores = np.zeros((len(queries), len(train)))
    for index, (seg, fac) in enumerate(zip(segments, factors, strict=True)):
        with _naming(index, len(segments)):
            part = score(seg.model, task, fac, train, queries).scores
        scores += (seg.duration / total) * part
    return scores


def _source(segments, factors, task, train, queries, *, damped: bool) -> np.ndarray:
    last = len(segments) - 1
    with _naming(last, len(segments)):
        raw = _identity(factors[last])
        u = query_features(segments[last].model, task, raw, queries)  # (n_query, P)
    scores = np.zeros((len(queries), len(train)))
    for index in range(last, -1, -1):  # the last segment first: u carries S_{l+1}...S_L
        seg, fac = segments[index], factors[index]
        t = seg.duration
        v = _apply(fac, u, lambda lam, t=t: _phi(lam, t), damped=damped)  # (n_query, P)
        with _naming(index, len(segments)):
            for rows, feats in train_feature_blocks(seg.model, task, fac, train):
                scores[:, rows] += (v @ feats.T).numpy()  # feats (B, P)
        if index > 0:
            u = _apply(fac, u, lambda lam, t=t: torch.exp(-t * lam), damped=damped)
    return scores


def _identity(factors: InfluenceFactors) -> InfluenceFactors:
    """The same modules with ``H = I``: :func:`query_features` then gives raw gradients."""
    plain = dataclasses.replace(factors.settings, strategy=Strategy.IDENTITY)
    return dataclasses.replace(factors, settings=plain)


def _phi(lam: torch.Tensor, t: float) -> torch.Tensor:
    """``(1 - exp(-t lam)) / lam``, equal to ``t`` where ``t lam`` is ~0 (no cancellation)."""
    x = t * lam
    small = x.abs() < 1e-8
    safe = torch.where(small, torch.ones_like(lam), lam)
    return torch.where(small, t * (1 - x / 2), -torch.expm1(-x) / safe)


def _apply(factors: InfluenceFactors, flat: torch.Tensor, fn, *, damped: bool) -> torch.Tensor:
    """``fn(H)`` applied to every row of ``flat (N, P)`` (modules in ``factors.modules``
    order, each ``(d_out, d_in')`` row-major), in each module's eigenbasis (float64)."""
    out, start = [], 0
    for n in factors.modules:
        info, t = factors.info[n], factors.tensors[n]
        block = flat[:, start:start + info.n_params].reshape(-1, info.d_out, info.d_in_aug)
        start += info.n_params
        lam = t["lam"] if "lam" in t else torch.outer(t["l_s"], t["l_a"])  # (d_out, d_in')
        lam = lam + factors.damping[n] if damped else lam.clamp(min=0.0)
        rotated = t["q_s"].T @ block @ t["q_a"]  # (N, d_out, d_in') in the eigenbasis
        out.append((t["q_s"] @ (rotated * fn(lam)) @ t["q_a"].T).reshape(len(flat), -1))
    return torch.cat(out, dim=1)


def _metadata(segments, factors, settings: UnrolledSettings) -> dict[str, Any]:
    first = factors[0].metadata()
    return {
        "method": f"unrolled-{settings.combine.value}",
        "settings": settings.to_dict(),
        "modules": first["modules"],
        "parameters": first["parameters"],
        "segments": [{"learning_rate": s.learning_rate, "n_steps": s.n_steps,
                      "duration": s.duration, "damping": dict(f.damping),
                      "min_eigenvalue": dict(f.min_eigenvalue)}
                     for s, f in zip(segments, factors, strict=True)],
        "query_checkpoint": "the last segment's model",
        "normalisation": first["normalisation"],
        "sign": "scores[i, j] > 0: train record j made query i's loss smaller",
    }
