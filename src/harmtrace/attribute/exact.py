"""The exact mode: replay a small model's whole training and differentiate through it.

For a model small enough to train in seconds, the quality ceiling of data attribution is the
*metagradient*: give every train record ``j`` a weight ``w_j`` in the training loss, replay
the training exactly (same initial parameters, same data order, same optimiser), and take
the derivative of each query's final loss with respect to the weights,

    scores[i, j] = - d query_loss_i(theta_T(w)) / d w_j   at w = 1.

A positive score means that up-weighting record ``j`` lowers query ``i``'s loss, so that
removing it (``w_j = 0``) raises the loss by about ``scores[i, j]``: the project's sign
convention. The replay differentiates through every optimiser step (``create_graph``), so
second-order effects of the whole trajectory are included, unlike a single-checkpoint
approximation. This follows the exact replay of Engstrom et al. 2025, "Optimizing ML Training
with Metagradient Descent" (MAGIC), with SGD-influence (Hara et al. 2019, "Data Cleansing
for Models Trained with SGD") as background; we unroll the graph instead of replaying it
backwards, which limits the mode to small models and short trainings (checked up front).

Training is described by a :class:`ReplaySpec`. The batch loss is
``sum_i w_i * l_i / len(batch)`` over the records of the batch, and which records form each
batch is fixed by the data-order seed whatever the weights, so ``w_j = 0`` is record ``j``
removed and everything else unchanged. :func:`train_weighted` performs the same training
without the graph; it is deterministic: the same spec and weights give a bit-identical model
on the same machine and thread count. For many small trainings on a busy machine (a
leave-some-out benchmark), ``torch.set_num_threads(1)`` is often many times faster.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.func import functional_call

from harmtrace.attribute.task import (
    AttributionTask,
    LMTask,
    as_enum,
    check_examples,
    check_train_and_queries,
    per_example,
)
from harmtrace.errors import ConfigError, NumericalError

__all__ = [
    "LRSchedule",
    "Normalisation",
    "Optimizer",
    "ReplaySpec",
    "exact_scores",
    "replay_memory_bytes",
    "train_weighted",
]

log = logging.getLogger(__name__)

ModelFactory = Callable[[], torch.nn.Module]


class LRSchedule(enum.Enum):
    """Learning rate at step ``t`` of ``T`` (after warm-up): constant, linear or cosine decay
    to zero."""

    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


class Optimizer(enum.Enum):
    """``sgd`` (with momentum, L2 weight decay), ``adam`` (L2 weight decay added to the
    gradient) or ``adamw`` (decoupled weight decay), each as its ``torch.optim`` namesake."""

    SGD = "sgd"
    ADAM = "adam"
    ADAMW = "adamw"


class Normalisation(enum.Enum):
    """The batch loss's denominator: ``records`` (``sum_i w_i l_i / len(batch)``) or
    ``tokens`` (divided by the batch's labelled target tokens, the token mean a Hugging Face
    causal LM's ``loss`` takes; :class:`LMTask` only). Either is fixed by the batch's
    composition, never by the weights."""

    RECORDS = "records"
    TOKENS = "tokens"


@dataclass(frozen=True)
class ReplaySpec:
    """A training run that can be replayed exactly.

    Parameters
    ----------
    lr:
        Peak learning rate (> 0).
    epochs:
        Passes over the train records (>= 1).
    batch_size:
        Records per step (>= 1); the last batch of an epoch is smaller unless ``drop_last``.
    seed:
        Data-order seed: epoch ``e`` visits the records in a fixed permutation drawn from
        ``(seed, e)``. ``shuffle=False`` keeps the given order in every epoch.
    init_seed:
        ``torch.manual_seed(init_seed)`` is set before calling the model factory (the global
        RNG is restored afterwards), unless ``initial_state`` is given.
    initial_state:
        A state dict loaded into the model after the factory built it (optional).
    optimizer:
        :class:`Optimizer` (default SGD). SGD is ``torch.optim.SGD`` with dampening 0:
        ``g = grad + wd * theta``, ``buf = momentum * buf + g``, ``theta -= lr_t * buf``.
        Adam and AdamW follow ``torch.optim.Adam`` / ``AdamW`` (bias-corrected, ``eps``
        outside the square root); the square root is given derivative 0 where the second
        moment is exactly 0 (a parameter that never received a gradient), where the true
        derivative does not exist.
    momentum, weight_decay, betas, eps:
        Optimiser constants; ``momentum`` is for SGD only.
    max_grad_norm:
        Clip the batch gradient to this global norm first, as
        ``torch.nn.utils.clip_grad_norm_`` (optional).
    normalisation:
        :class:`Normalisation` of the batch loss (default ``RECORDS``).
    batch_order:
        Explicit record indices of every step (optional), to replay a training whose order
        came from elsewhere; then ``epochs``, ``batch_size``, ``seed`` and ``shuffle`` are
        not used for the order.
    schedule, warmup_steps:
        Learning-rate schedule; ``warmup_steps`` ramps linearly from ``lr / warmup_steps``.

    ``initial_state`` is left out of equality comparisons (tensors have no single truth
    value); identify a run by its fingerprints, not by the spec alone.
    """

    lr: float
    epochs: int = 1
    batch_size: int = 32
    seed: int = 0
    init_seed: int = 0
    initial_state: Mapping[str, torch.Tensor] | None = field(default=None, compare=False)
    optimizer: Optimizer = Optimizer.SGD
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = None
    schedule: LRSchedule = LRSchedule.CONSTANT
    warmup_steps: int = 0
    shuffle: bool = True
    drop_last: bool = False
    normalisation: Normalisation = Normalisation.RECORDS
    batch_order: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"ReplaySpec.lr must be a finite number > 0, got {self.lr}")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"ReplaySpec.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"ReplaySpec.momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"ReplaySpec.weight_decay must be >= 0, got {self.weight_decay}")
        object.__setattr__(self, "optimizer",
                           as_enum(Optimizer, self.optimizer, "ReplaySpec.optimizer"))
        if self.momentum and self.optimizer is not Optimizer.SGD:
            raise ConfigError("ReplaySpec.momentum applies to SGD only; for Adam set betas")
        if not all(0.0 <= b < 1.0 for b in self.betas) or not self.eps > 0:
            raise ConfigError(f"ReplaySpec.betas must be in [0, 1) and eps > 0, got "
                              f"{self.betas}, {self.eps}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"ReplaySpec.max_grad_norm must be > 0 or None, got "
                              f"{self.max_grad_norm}")
        object.__setattr__(self, "normalisation",
                           as_enum(Normalisation, self.normalisation, "ReplaySpec.normalisation"))
        if self.batch_order is not None:
            order = tuple(tuple(int(i) for i in rows) for rows in self.batch_order)
            if not order or not all(order):
                raise ConfigError("ReplaySpec.batch_order must list at least one non-empty "
                                  "batch of record indices")
            object.__setattr__(self, "batch_order", order)
        if self.warmup_steps < 0:
            raise ConfigError(f"ReplaySpec.warmup_steps must be >= 0, got {self.warmup_steps}")
        object.__setattr__(self, "schedule",
                           as_enum(LRSchedule, self.schedule, "ReplaySpec.schedule"))

    def batches(self, n_train: int) -> list[np.ndarray]:
        """The record indices of every step, in order; independent of any weights."""
        if self.batch_order is not None:
            flat = [i for rows in self.batch_order for i in rows]
            if min(flat) < 0 or max(flat) >= n_train:
                raise ConfigError(f"ReplaySpec.batch_order names record {max(flat)} or "
                                  f"{min(flat)}, outside 0..{n_train - 1}")
            return [np.asarray(rows) for rows in self.batch_order]
        steps = []
        for epoch in range(self.epochs):
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(n_train)
            else:
                order = np.arange(n_train)
            for start in range(0, n_train, self.batch_size):
                rows = order[start : start + self.batch_size]
                if self.drop_last and len(rows) < self.batch_size:
                    break
                steps.append(rows)
        if not steps:
            raise ConfigError(f"ReplaySpec.batch_size = {self.batch_size} with drop_last and "
                              f"{n_train} train records gives no step; lower batch_size")
        return steps

    def lr_at(self, step: int, n_steps: int) -> float:
        """Learning rate of step ``step`` (0-based) of ``n_steps``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(n_steps - self.warmup_steps, 1)
        frac = (step - self.warmup_steps) / span
        if self.schedule is LRSchedule.LINEAR:
            return self.lr * (1.0 - frac)
        if self.schedule is LRSchedule.COSINE:
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.lr


class _Bound(torch.nn.Module):
    """Calls ``module`` with the given parameter tensors, so a task can use it as a model."""

    def __init__(self, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.inner = module
        self.tensors = tensors

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.inner, self.tensors, args, kwargs)


def _cast_batch(batch: dict, dtype: torch.dtype) -> dict:
    """Floating tensors of ``batch`` in the model's dtype (tasks collate float32)."""
    return {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in batch.items()}


def _check_replayable(model: torch.nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            raise ConfigError(f"module {name!r} is a batch norm: its running statistics make "
                              "training not replayable here; use LayerNorm or GroupNorm")
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            raise ConfigError(f"module {name!r} is dropout with p={module.p}: random masks "
                              "make training not replayable here; set p=0")


def _build(spec: ReplaySpec, model_factory: ModelFactory) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        model = model_factory()
    if spec.initial_state is not None:
        model.load_state_dict(spec.initial_state)
    _check_replayable(model)
    return model.eval()


def _as_weights(weights: Any, n_train: int, dtype: torch.dtype) -> torch.Tensor:
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64)).to(dtype)
    if w.shape != (n_train,):
        raise ConfigError(f"weights must have shape ({n_train},), one per train record, got "
                          f"{tuple(w.shape)}")
    bad = ~torch.isfinite(w)
    if bad.any():
        raise ConfigError(f"the weight of train record {int(bad.nonzero()[0])} is not finite; "
                          "give one finite weight per record")
    return w


def _params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError("the model has no trainable parameter; nothing to replay")
    return params


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """``sqrt(v)`` for ``v >= 0`` whose derivative is 0 (not infinite) where ``v == 0``."""
    positive = v > 0
    return torch.where(positive, v.clamp(min=torch.finfo(v.dtype).tiny).sqrt(),
                       torch.zeros_like(v))


def _clipped(grads: dict, max_norm: float) -> dict:
    """``clip_grad_norm_``'s rule, out of place: scale by ``min(1, max_norm / (norm +
    1e-6))``."""
    norm = _safe_sqrt(sum((g**2).sum() for g in grads.values()))
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    return {n: g * scale for n, g in grads.items()}


def _update(spec: ReplaySpec, params: dict, grads: dict, state: dict, lr: float,
            t: int) -> tuple[dict, dict]:
    """One optimiser update (``t`` counts from 1), out of place so it can be differentiated;
    ``state`` maps ``"m"``/``"v"`` (or ``"buf"`` for SGD) to per-parameter tensors."""
    if spec.max_grad_norm is not None:
        grads = _clipped(grads, spec.max_grad_norm)
    new_params: dict = {}
    new_state: dict = {"m": {}, "v": {}, "buf": {}}
    beta1, beta2 = spec.betas
    for name, theta in params.items():
        g = grads[name]
        if spec.weight_decay and spec.optimizer is not Optimizer.ADAMW:
            g = g + spec.weight_decay * theta  # L2, coupled
        if spec.optimizer is Optimizer.SGD:
            if spec.momentum:
                old = state.get("buf", {}).get(name)
                g = g if old is None else spec.momentum * old + g
                new_state["buf"][name] = g
            new_params[name] = theta - lr * g
            continue
        if spec.optimizer is Optimizer.ADAMW and spec.weight_decay:
            theta = theta * (1 - lr * spec.weight_decay)  # decoupled
        m = state["m"][name] * beta1 + (1 - beta1) * g if t > 1 else (1 - beta1) * g
        v = state["v"][name] * beta2 + (1 - beta2) * g * g if t > 1 else (1 - beta2) * g * g
        new_state["m"][name], new_state["v"][name] = m, v
        denom = _safe_sqrt(v) / math.sqrt(1 - beta2**t) + spec.eps
        new_params[name] = theta - (lr / (1 - beta1**t)) * m / denom
    return new_params, new_state


def _denominator(spec: ReplaySpec, task: AttributionTask, batch: dict) -> int:
    if spec.normalisation is Normalisation.RECORDS:
        return next(iter(batch.values())).shape[0]
    if not isinstance(task, LMTask):
        raise ConfigError("ReplaySpec.normalisation = 'tokens' needs an LMTask; use 'records'")
    return max(int((task.targets(batch) != -100).sum()), 1)


def _split(model: torch.nn.Module) -> tuple[dict, dict]:
    """Trainable parameters (detached copies) and the constants: buffers, frozen weights."""
    params = _params_of(model)
    constants = {n: t.detach() for n, t in model.named_buffers()}
    constants.update({n: p.detach() for n, p in model.named_parameters() if n not in params})
    return {n: p.detach().clone() for n, p in params.items()}, constants


def _trajectory(spec: ReplaySpec, model: torch.nn.Module, task: AttributionTask,
                train: Sequence[Any], w: torch.Tensor, *,
                create_graph: bool) -> Iterator[tuple[int, dict]]:
    """Yield ``(step, params)`` after every step of the training weighted by ``w``.

    With ``create_graph`` every update stays in the autograd graph, so the final parameters
    are differentiable functions of ``w``; without it each step is detached (plain training).
    """
    params, constants = _split(model)
    params = {n: p.requires_grad_(True) for n, p in params.items()}
    dtype = next(iter(params.values())).dtype
    names = list(params)
    steps = spec.batches(len(train))
    # collated once and sliced per step: a record's loss never depends on its batch (task.py)
    every = _cast_batch(task.collate(list(train)), dtype)
    if hasattr(task, "check_batch"):
        task.check_batch(every, list(range(len(train))))
    state: dict = {}
    for step, rows in enumerate(steps):
        index = torch.as_tensor(rows)
        batch = {k: v[index] for k, v in every.items()}
        losses = per_example(task.train_loss(_Bound(model, {**constants, **params}), batch),
                             batch, what="the task's train loss")  # (B,)
        finite = torch.isfinite(losses.detach())
        if not finite.all():
            bad = int(rows[int((~finite).nonzero()[0])])
            raise NumericalError(f"the loss of train record {bad} is not finite at step {step}; "
                                 "check that record for extreme values, or lower ReplaySpec.lr")
        loss = (w[index] * losses).sum() / _denominator(spec, task, batch)
        found = torch.autograd.grad(loss, [params[n] for n in names],
                                    create_graph=create_graph, allow_unused=True)
        grads = {n: torch.zeros_like(params[n]) if g is None else g
                 for n, g in zip(names, found, strict=True)}
        lr = spec.lr_at(step, len(steps))
        if create_graph:
            params, state = _update(spec, params, grads, state, lr, step + 1)
        else:
            with torch.no_grad():
                params, state = _update(spec, params, grads, state, lr, step + 1)
            params = {n: p.requires_grad_(True) for n, p in params.items()}
        yield step, params


def train_weighted(spec: ReplaySpec, model_factory: ModelFactory, task: AttributionTask,
                   train_examples: Sequence[Any], weights: Any) -> torch.nn.Module:
    """Train a fresh model as ``spec`` describes, record ``j``'s loss weighted by
    ``weights[j]`` (shape ``(n_train,)``; 0 removes the record, 1 is plain training).

    Returns the trained model in eval mode. Deterministic: the same spec, factory, examples
    and weights give a bit-identical model on the same machine and thread count.
    """
    check_examples(train_examples, argument="train_examples")
    model = _build(spec, model_factory)
    dtype = next(iter(_params_of(model).values())).dtype
    w = _as_weights(weights, len(train_examples), dtype)
    final = None
    for step, final in _trajectory(spec, model, task, train_examples, w, create_graph=False):
        _check_params(final, f"step {step} of train_weighted")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in final:
                param.copy_(final[name])
    return model


def _check_params(params: dict, where: str) -> None:
    for name, p in params.items():
        if not torch.isfinite(p).all():
            raise NumericalError(f"parameter {name!r} is not finite after {where}; lower "
                                 "ReplaySpec.lr or check the train records for extreme values")


def replay_memory_bytes(spec: ReplaySpec, model_factory: ModelFactory, task: AttributionTask,
                        train: Sequence[Any]) -> int:
    """Estimated bytes of the unrolled graph of the whole training: the tensors autograd
    saves during the first step, counted by a saved-tensor hook, times the number of steps."""
    model = _build(spec, model_factory)
    dtype = next(iter(_params_of(model).values())).dtype
    w = torch.ones(len(train), dtype=dtype, requires_grad=True)
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, params = next(_trajectory(spec, model, task, train, w, create_graph=True))
    # every step also keeps its new parameters and optimiser state alive
    per_step = saved + sum(p.numel() * p.element_size() for p in params.values()) * 3
    return per_step * len(spec.batches(len(train)))


def exact_scores(spec: ReplaySpec, model_factory: ModelFactory, task: AttributionTask,
                 train: Sequence[Any], queries: Sequence[Any], *,
                 max_graph_bytes: int = 4 << 30, query_chunk: int = 16) -> np.ndarray:
    """Metagradient scores of the training ``spec`` describes, shape ``(n_query, n_train)``.

    ``scores[i, j] = -d task.query_loss(queries[i]) / d w_j`` at ``w = 1``, through the whole
    replayed training (Engstrom et al. 2025, MAGIC's exact replay). **Positive: record ``j``
    lowered query ``i``'s loss**; removing it raises the loss by about ``scores[i, j]``.
    float64 throughout when the factory builds a float64 model (recommended).

    One replay serves every query: the graph is built once and back-propagated from
    ``query_chunk`` query losses at a time. Refused with :class:`ConfigError` when the
    estimated graph (:func:`replay_memory_bytes`) exceeds ``max_graph_bytes``.
    """
    if query_chunk < 1:
        raise ConfigError(f"query_chunk must be >= 1, got {query_chunk}")
    check_train_and_queries(train, queries, caller="exact_scores")
    need = replay_memory_bytes(spec, model_factory, task, train)
    if need > max_graph_bytes:
        raise ConfigError(
            f"the unrolled training graph needs about {need / 2**30:.2f} GiB, more than "
            f"max_graph_bytes = {max_graph_bytes / 2**30:.2f} GiB; lower ReplaySpec.epochs or "
            "ReplaySpec.batch_size (fewer records per step), use fewer train records, or "
            "raise max_graph_bytes"
        )
    model = _build(spec, model_factory)
    _, constants = _split(model)
    dtype = next(iter(_params_of(model).values())).dtype
    w = torch.ones(len(train), dtype=dtype, requires_grad=True)
    params: dict = {}
    for step, params in _trajectory(spec, model, task, train, w, create_graph=True):
        _check_params(params, f"step {step} of the replay")
    log.info("replayed %d steps over %d train records; %d queries", step + 1, len(train),
             len(queries))

    scores = np.zeros((len(queries), len(train)))
    bound = _Bound(model, {**constants, **params})
    for start in range(0, len(queries), query_chunk):
        rows = list(range(start, min(start + query_chunk, len(queries))))
        batch = _cast_batch(task.collate([queries[i] for i in rows]), dtype)
        losses = per_example(task.query_loss(bound, batch), batch,
                             what="the task's query loss")  # (len(rows),)
        for b, i in enumerate(rows):
            if not torch.isfinite(losses[b]):
                raise NumericalError(f"the final loss of query {i} is not finite")
        scores[rows] = -_jacobian_rows(losses, w).double().numpy()
    _check_scores(scores)
    return scores


def _jacobian_rows(losses: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``d losses / d w`` ``(len(losses), n_train)``: one batched backward pass through the
    retained graph (vmap over the cotangents), or one pass per loss where vmap cannot."""
    try:
        (jac,) = torch.autograd.grad(losses, w, grad_outputs=torch.eye(len(losses),
                                     dtype=losses.dtype), retain_graph=True,
                                     is_grads_batched=True)
        return jac.detach()
    except RuntimeError as err:
        log.debug("batched backward unavailable (%s); one query at a time", err)
    rows = [torch.autograd.grad(loss, w, retain_graph=True)[0] for loss in losses]
    return torch.stack(rows).detach()


def _check_scores(scores: np.ndarray) -> None:
    bad = ~np.isfinite(scores)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise NumericalError(f"the metagradient of query {i} w.r.t. train record {j} is not "
                             "finite; lower ReplaySpec.lr or the number of steps")
