"""The methods the benchmark compares, registered by name, each with its library.

Every adapter is ``run(task, model, clock) -> scores`` with ``scores`` of shape
``(n_query, n_train)`` in harmtrace's sign: **``scores[i, j] > 0`` means train record ``j``
lowered query ``i``'s loss**. Each adapter times its train-side work (factors, train
features) inside ``clock.fit()`` and its query-side work inside ``clock.score()``.

harmtrace's methods are called through its Python API; the peers live in
:mod:`benchmarks.lds.peers`, one module per library, each documenting its sign.
The EK-FAC comparison uses :data:`MATCHED`: the same damping rule, Fisher and modules.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from benchmarks.lds.methods_base import Clock, Method
from benchmarks.lds.tasks import BenchTask

__all__ = ["Clock", "MATCHED", "METHODS", "Method", "SEGMENT_STEPS", "trajectory_segments"]

# Matched EK-FAC settings shared by harmtrace and kronfluence: damping is the heuristic
# 0.1 x the mean of each module's (corrected) eigenvalues, the true Fisher (targets sampled
# from the model), every nn.Linear of the model tracked, float32 model.
MATCHED = {"damping": None, "damping_rule": "0.1 x mean eigenvalue per module",
           "fisher": "true", "modules": "every nn.Linear", "seed": 0}


def float32(model: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy of ``model`` in eval mode (approximate methods run in float32)."""
    import copy

    return copy.deepcopy(model).float().eval()


# -- harmtrace -----------------------------------------------------------------------------


def _exact(task: BenchTask, model: torch.nn.Module, clock: Clock) -> np.ndarray:
    from harmtrace.attribute.exact import exact_scores

    with clock.score():  # one replay serves every query: all of it counts as scoring
        return exact_scores(task.extra["spec"], task.extra["factory"], task.attr_task,
                            task.train, task.queries)


def _influence(strategy: str) -> Callable:
    def run(task: BenchTask, model: torch.nn.Module, clock: Clock) -> np.ndarray:
        from harmtrace.attribute import influence as inf

        settings = inf.InfluenceSettings(strategy=inf.Strategy(strategy),
                                         damping=MATCHED["damping"],
                                         fisher=inf.Fisher(MATCHED["fisher"]),
                                         seed=MATCHED["seed"], batch_size=64)
        m = float32(model) if task.name == "T1" else model
        with clock.fit():
            factors = inf.fit_factors(m, task.attr_task, task.train, settings=settings)
        with clock.score():
            result = inf.score(m, task.attr_task, factors, task.train, task.queries)
        return np.asarray(result.scores)

    return run


#: Optimiser steps per segment of the trajectory methods: T1's epoch (16 steps), a third of
#: T2's 126 steps (train_lm's own checkpoints); ``None``: every stored checkpoint.
SEGMENT_STEPS = {"T1": 16, "T2": 42}


def trajectory_segments(task: BenchTask, *, every: int | None) -> list:
    """The full training as :class:`~harmtrace.attribute.unrolled.Segment` s ending at the
    stored checkpoints whose step is a multiple of ``every`` (``None``: all of them).

    A segment's step size is its mean learning rate converted to a step on the mean
    per-record loss that influence's curvature describes: T1's SGD with heavy-ball momentum
    ``beta`` moves ``lr / (1 - beta)`` per unit gradient in steady state; T2's loss is a
    token mean, so its lr is divided by the mean labelled tokens per record. T2's AdamW
    rescaling of each coordinate is not modelled (see :mod:`harmtrace.attribute.unrolled`).
    """
    from harmtrace.attribute.unrolled import Segment

    if task.name == "T1":
        scale = 1.0 / (1.0 - task.extra["spec"].momentum)
    else:
        scale = 1.0 / float(np.mean([len(x) - 1 for x in task.train]))
    step_lr = task.extra["step_lr"]
    chosen = [(s, m) for s, m in task.extra["trajectory"] if every is None or s % every == 0]
    segments, start = [], 0
    for step, ckpt in chosen:
        lr = float(np.mean(step_lr[start:step])) * scale
        segments.append(Segment(float32(ckpt) if task.name == "T1" else ckpt, lr, step - start))
        start = step
    return segments


def _unrolled(combine: str, *, every_stored: bool) -> Callable:
    def run(task: BenchTask, model: torch.nn.Module, clock: Clock) -> np.ndarray:
        from harmtrace.attribute import influence as inf
        from harmtrace.attribute.unrolled import UnrolledSettings, unrolled_scores

        influence = inf.InfluenceSettings(damping=MATCHED["damping"],
                                          fisher=inf.Fisher(MATCHED["fisher"]),
                                          seed=MATCHED["seed"], batch_size=64)
        settings = UnrolledSettings(combine=combine, influence=influence)
        every = None if every_stored else SEGMENT_STEPS[task.name]
        segments = trajectory_segments(task, every=every)
        clock.notes.append(f"{len(segments)} segments: steps "
                           f"{[s.n_steps for s in segments]}, step sizes "
                           f"{[round(s.learning_rate, 6) for s in segments]}")
        with clock.fit():  # factors, query and train gradients of every checkpoint
            result = unrolled_scores(segments, task.attr_task, task.train, task.queries,
                                     settings=settings)
        return np.asarray(result.scores)

    return run


def _trak(task: BenchTask, model: torch.nn.Module, clock: Clock) -> np.ndarray:
    from harmtrace.attribute import trak

    settings = trak.TrakSettings(seed=0)
    m = float32(model) if task.name == "T1" else model
    with clock.fit():
        result = trak.trak_scores([m], task.attr_task, task.train, task.queries,
                                  settings=settings)
    return np.asarray(result.scores)


def _repsim(task: BenchTask, model: torch.nn.Module, clock: Clock) -> np.ndarray:
    from harmtrace.attribute import repsim

    m = float32(model) if task.name == "T1" else model
    with clock.fit():
        result = repsim.repsim_scores(m, task.attr_task, task.train, task.queries)
    return np.asarray(getattr(result, "scores", result))


def _logra(task: BenchTask, model: torch.nn.Module, clock: Clock) -> np.ndarray:
    from harmtrace.attribute import logra

    m = float32(model) if task.name == "T1" else model
    with clock.fit():
        result = logra.logra_scores(m, task.attr_task, task.train, task.queries,
                                    settings=logra.LograSettings())
    return np.asarray(getattr(result, "scores", result))


def _lm_gradient(name: str) -> Callable:
    """graddot / gradcos / tracin of :mod:`harmtrace.attribute.methods` (LM tasks)."""

    def run(task: BenchTask, model: torch.nn.Module, clock: Clock) -> np.ndarray:
        from harmtrace.attribute.methods import AttributionInputs, compute_scores
        from harmtrace.behaviours.focus import FocusedQuery

        queries = [FocusedQuery(token_ids=tuple(q), target_mask=(True,) * len(q),
                                words=t, focused=False)
                   for q, t in zip(task.queries, task.extra["query_texts"], strict=True)]
        checkpoints = task.extra["checkpoint_models"] if name == "tracin" else [(model, 1.0)]
        inputs = AttributionInputs(train_sequences=task.train,
                                   train_texts=task.extra["train_texts"], queries=queries,
                                   checkpoints=checkpoints, projection_dim=0, batch_size=32)
        with clock.fit():
            return compute_scores(name, inputs)

    return run


METHODS: dict[str, Method] = {
    "ht-exact": Method("harmtrace", _exact, ("T1",),
                       "exact replay metagradient (MAGIC-style)", approximate=False),
    "ht-ekfac": Method("harmtrace", _influence("ekfac"), ("T1", "T2"), "EK-FAC influence"),
    "ht-kfac": Method("harmtrace", _influence("kfac"), ("T1", "T2"), "K-FAC influence"),
    "ht-diagonal": Method("harmtrace", _influence("diagonal"), ("T1", "T2"),
                          "diagonal-Fisher influence"),
    "ht-dense": Method("harmtrace", _influence("dense"), ("T1",),
                       "influence with the exact (dense) Hessian"),
    "ht-identity": Method("harmtrace", _influence("identity"), ("T1", "T2"),
                          "gradient dot product (no curvature)"),
    "ht-source": Method("harmtrace", _unrolled("source", every_stored=False), ("T1", "T2"),
                        "SOURCE unrolled EK-FAC, a segment per epoch (T1) / third (T2)"),
    "ht-ekfac-ckpt": Method("harmtrace", _unrolled("sum", every_stored=False), ("T1", "T2"),
                            "EK-FAC summed over checkpoints (lr x steps weights), as ht-source"),
    "ht-source-all": Method("harmtrace", _unrolled("source", every_stored=True), ("T1", "T2"),
                            "SOURCE over every stored checkpoint (T1 16, T2 18)", slow=True),
    "ht-ekfac-ckpt-all": Method("harmtrace", _unrolled("sum", every_stored=True),
                                ("T1", "T2"), "EK-FAC summed over every stored checkpoint",
                                slow=True),
    "ht-trak": Method("harmtrace", _trak, ("T1", "T2"), "TRAK, one model"),
    "ht-repsim": Method("harmtrace", _repsim, ("T1", "T2"), "representation similarity"),
    "ht-logra": Method("harmtrace", _logra, ("T1", "T2"), "LoGra projected influence"),
    "ht-graddot": Method("harmtrace", _lm_gradient("graddot"), ("T2",),
                         "gradient dot product, exact gradients"),
    "ht-gradcos": Method("harmtrace", _lm_gradient("gradcos"), ("T2",), "gradient cosine"),
    "ht-tracin": Method("harmtrace", _lm_gradient("tracin"), ("T2",),
                        "TracInCP over 3 checkpoints"),
}


def _register_peers() -> None:
    from benchmarks.lds.peers import PEER_METHODS

    for name, method in PEER_METHODS.items():
        METHODS[name] = method


_register_peers()
