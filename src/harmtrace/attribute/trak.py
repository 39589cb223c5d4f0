"""TRAK: attribution through a kernel of projected output gradients (Park et al. 2023, "TRAK:
Attributing Model Behavior at Scale").

For one model with parameters ``theta``, each example gets the gradient of an *output
function* ``f`` (not the loss), randomly projected to ``k`` dimensions (Sec. 3.2):
``phi(z) = P^T grad_theta f(z; theta)``. With the train features ``Phi`` ``(n_train, k)``,
the train weights ``Q = diag(q_j)`` (``q_j = -dL/df`` at record ``j``) and the damping
``lambda``, the score of one model is (Sec. 3, eq. for tau with the linearised model)

    scores[i, j] = phi(query_i)^T (Phi^T Phi + lambda I)^-1 phi(train_j) * q_j,

solved in float64. Ensembling (Sec. 3.3) averages the scores of several models
(checkpoints or independently trained models); the paper averages the ``Q`` factor
separately, we average the complete per-model estimates, which is the same when the models
agree on ``Q`` and makes the ensemble exactly the mean of single-model runs.

Output functions, by task (:func:`output_function`, :func:`train_weight`,
:func:`query_output`):

* :class:`ClassificationTask`: the margin ``log p_y - log(1 - p_y)``, ``q = 1 - p_y``
  (the paper's choice for classification);
* :class:`LMTask`: the sum over labelled tokens of the per-token margin; ``q`` is the mean
  over those tokens of ``1 - p_t`` (one scalar per sequence approximates the per-token
  weights);
* :class:`RegressionTask`: ``f`` is the prediction, ``q = y - f``, and a query's feature is
  the gradient of minus its loss, so the score equals the Gauss-Newton influence of ridge
  regression in closed form;
* any other task: ``f = -train_loss`` and ``q = 1``, unless the task defines methods
  ``trak_output(model, batch) -> (B,)`` and ``trak_weight(model, batch) -> (B,)``.

Sign: **positive means train record ``j`` increases query ``i``'s output (margin), i.e.
lowers its loss**, which is the project's convention. When the task overrides
``query_loss`` (a harm measurement), a query's feature is the gradient of minus that loss.
"""

from __future__ import annotations

import enum
import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.func import grad, vmap

from harmtrace.attribute.exact import _Bound, _cast_batch
from harmtrace.attribute.gradients import trainable_parameters
from harmtrace.attribute.projection import GaussianProjector
from harmtrace.attribute.task import (
    AttributionTask,
    ClassificationTask,
    LMTask,
    RegressionTask,
    as_enum,
    check_train_and_queries,
    per_example,
)
from harmtrace.errors import ConfigError, HarmtraceError, NumericalError

__all__ = [
    "DampingScale",
    "LowDimensionWarning",
    "PerExample",
    "TrakMetadata",
    "TrakResult",
    "TrakSettings",
    "output_function",
    "query_output",
    "trak_scores",
    "train_weight",
]

log = logging.getLogger(__name__)


class LowDimensionWarning(UserWarning):
    """The projection dimension is too small for the scores to rank records reliably."""


class DampingScale(enum.Enum):
    """How ``TrakSettings.damping`` becomes ``lambda``: ``relative`` multiplies it by the mean
    eigenvalue ``trace(Phi^T Phi) / k`` (scale-free), ``absolute`` uses it as is."""

    RELATIVE = "relative"
    ABSOLUTE = "absolute"


class PerExample(enum.Enum):
    """How per-example gradients are taken: ``vmap`` (``torch.func``), ``loop`` (one
    autograd call per example, works for any module), or ``auto`` (vmap, else loop)."""

    AUTO = "auto"
    VMAP = "vmap"
    LOOP = "loop"


@dataclass(frozen=True)
class TrakSettings:
    """Settings of :func:`trak_scores`.

    Parameters
    ----------
    projection_dim:
        ``k`` >= 1 (default 2048). When ``k`` is at least the number of parameters included,
        gradients are used unprojected and ``k`` becomes that number (reported). 0 also means
        unprojected.
    seed:
        Projection seed, the same for every model of the ensemble.
    damping:
        ``lambda`` added to the kernel's diagonal, >= 0 (default 1e-3); see ``damping_scale``.
        0 is refused when the kernel is singular.
    damping_scale:
        :class:`DampingScale`, default ``RELATIVE``.
    parameters:
        Keep only parameters whose names contain one of these substrings (default: all
        trainable parameters).
    batch_size:
        Examples per gradient batch (>= 1); scores do not depend on it.
    per_example:
        :class:`PerExample`, default ``AUTO``.
    reweight:
        Multiply by the train weights ``q_j`` (default True, as the paper).
    """

    projection_dim: int = 2048
    seed: int = 0
    damping: float = 1e-3
    damping_scale: DampingScale = DampingScale.RELATIVE
    parameters: tuple[str, ...] = ()
    batch_size: int = 32
    per_example: PerExample = PerExample.AUTO
    reweight: bool = True

    def __post_init__(self) -> None:
        if self.projection_dim < 0:
            raise ConfigError(f"TrakSettings.projection_dim must be >= 0, got "
                              f"{self.projection_dim}")
        if not self.damping >= 0:
            raise ConfigError(f"TrakSettings.damping must be >= 0, got {self.damping}")
        if self.batch_size < 1:
            raise ConfigError(f"TrakSettings.batch_size must be >= 1, got {self.batch_size}")
        object.__setattr__(self, "damping_scale",
                           as_enum(DampingScale, self.damping_scale, "TrakSettings.damping_scale"))
        object.__setattr__(self, "per_example",
                           as_enum(PerExample, self.per_example, "TrakSettings.per_example"))
        object.__setattr__(self, "parameters", tuple(self.parameters))


@dataclass(frozen=True)
class TrakMetadata:
    """What was actually used: ``projection_dim`` (``k``), ``projected`` (False when the
    gradients were exact), ``damping`` (absolute ``lambda`` per model), the smallest
    eigenvalue of each model's ``Phi^T Phi``, the parameter names, their count, the number
    of models, the per-example mode of each model and, for an :class:`LMTask`, the scored
    ``positions`` and ``token_ids`` of each query."""

    projection_dim: int
    projected: bool
    damping: tuple[float, ...]
    smallest_eigenvalue: tuple[float, ...]
    parameters: tuple[str, ...]
    n_params: int
    n_models: int
    per_example: tuple[str, ...]
    settings: dict = field(default_factory=dict)
    query_tokens: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrakResult:
    """``scores`` ``(n_query, n_train)`` float64 (positive: record ``j`` raised query ``i``'s
    output, lowered its loss) and the :class:`TrakMetadata`."""

    scores: np.ndarray
    metadata: TrakMetadata


# ---- output functions -------------------------------------------------------------------


def _margin(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``log p_y - log(1 - p_y)`` per row: logits ``(..., C)``, target ``(...)`` -> ``(...)``."""
    index = target.unsqueeze(-1)
    correct = logits.gather(-1, index)[..., 0]
    # -inf at the target class (scatter rather than one_hot, which vmap cannot trace)
    hide = torch.zeros_like(logits).scatter(-1, index, float("-inf"))
    return correct - torch.logsumexp(logits + hide, dim=-1)


def _lm_tokens(task: LMTask, model: torch.nn.Module, batch: dict):
    logits = task._logits(model, batch)[:, :-1]  # (B, T-1, V): predicts token t+1
    targets = task.targets(batch)  # (B, T-1), -100 at context and padding
    keep = targets != -100
    return logits, targets.clamp(min=0), keep


def output_function(task: AttributionTask, model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """TRAK's output ``f`` of each train example, shape ``(B,)`` (see the module docstring);
    a task's ``(B, 1)`` is squeezed, any other shape raises :class:`ConfigError`."""
    if hasattr(task, "trak_output"):
        return per_example(task.trak_output(model, batch), batch, what="task.trak_output")
    if isinstance(task, LMTask):
        logits, targets, keep = _lm_tokens(task, model, batch)
        return (_margin(logits, targets) * keep).sum(dim=1)
    if isinstance(task, ClassificationTask):
        return _margin(task.logits(model, batch), task.labels(batch))
    if isinstance(task, RegressionTask):
        return task._predict(model, batch)
    return -per_example(task.train_loss(model, batch), batch, what="task.train_loss")


def train_weight(task: AttributionTask, model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """TRAK's ``q = -dL/df`` of each train example, shape ``(B,)``, without a graph."""
    with torch.no_grad():
        if hasattr(task, "trak_weight"):
            return per_example(task.trak_weight(model, batch), batch, what="task.trak_weight")
        if isinstance(task, LMTask):
            logits, targets, keep = _lm_tokens(task, model, batch)
            logp = torch.log_softmax(logits.double(), dim=-1)
            p = logp.gather(-1, targets.unsqueeze(-1))[..., 0].exp()  # (B, T-1)
            return ((1 - p) * keep).sum(1) / keep.sum(1).clamp(min=1)
        if isinstance(task, ClassificationTask):
            p = torch.softmax(task.logits(model, batch).double(), dim=-1)
            return 1 - p.gather(1, task.labels(batch)[:, None])[:, 0]
        if isinstance(task, RegressionTask):
            return task.targets(batch).double() - task._predict(model, batch).double()
        return torch.ones(batch[next(iter(batch))].shape[0], dtype=torch.float64)


def _overrides_query_loss(task: AttributionTask) -> bool:
    return type(task).query_loss is not AttributionTask.query_loss


def query_output(task: AttributionTask, model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """What a query's feature differentiates, shape ``(B,)``: the output function for
    classification and LM tasks, minus the query loss otherwise (or when overridden)."""
    if isinstance(task, (LMTask, ClassificationTask)) and not _overrides_query_loss(task):
        return output_function(task, model, batch)
    if hasattr(task, "trak_output") and not _overrides_query_loss(task):
        return per_example(task.trak_output(model, batch), batch, what="task.trak_output")
    return -per_example(task.query_loss(model, batch), batch, what="task.query_loss")


# ---- features ---------------------------------------------------------------------------


def _loop_grads(model: torch.nn.Module, task: AttributionTask, examples: Sequence[Any],
                fn, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Per-example gradients ``name -> (B, *shape)``, one example alone at a time."""
    named = dict(model.named_parameters())
    rows: list[list[torch.Tensor]] = []
    for example in examples:
        batch = _cast_batch(task.collate([example]), dtype)
        found = torch.autograd.grad(fn(task, model, batch)[0], [named[n] for n in names],
                                    allow_unused=True)
        rows.append([torch.zeros_like(named[n]) if g is None else g
                     for n, g in zip(names, found, strict=True)])
    return {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(names)}


def _project(projector: GaussianProjector | None, grads: dict, names: list[str]) -> torch.Tensor:
    batch = grads[names[0]].shape[0]
    if projector is None:  # exact: (B, n_params) in the model's dtype
        return torch.cat([grads[n].reshape(batch, -1) for n in names], dim=1).double()
    return projector.project({n: g.float() for n, g in grads.items()}).double()  # (B, k)


def _features(model: torch.nn.Module, task: AttributionTask, examples: Sequence[Any], fn, *,
              names: list[str], projector: GaussianProjector | None, dim: int,
              settings: TrakSettings, what: str) -> tuple[torch.Tensor, PerExample]:
    """Features ``(len(examples), dim)`` float64: the projected gradient of ``fn`` per
    example; the mode of the per-example gradients actually used."""
    named = dict(model.named_parameters())
    params = {n: named[n].detach() for n in names}
    constants = {n: b.detach() for n, b in model.named_buffers()}
    constants.update({n: p.detach() for n, p in named.items() if n not in params})
    dtype = params[names[0]].dtype

    def single(p: dict, example: dict) -> torch.Tensor:
        one = {k: v.unsqueeze(0) for k, v in example.items()}  # a batch of one
        return fn(task, _Bound(model, {**constants, **p}), one)[0]

    per_example_grad = vmap(grad(single), in_dims=(None, 0))
    mode = settings.per_example
    out = torch.zeros(len(examples), dim, dtype=torch.float64)
    for rows, batch in task.batches(examples, settings.batch_size):
        grads = None
        if mode is not PerExample.LOOP:
            try:
                grads = per_example_grad(params, _cast_batch(batch, dtype))
            except HarmtraceError:
                raise  # the task's own error (a wrong shape): the loop would raise it too
            except (RuntimeError, ValueError, TypeError, NotImplementedError) as err:
                if mode is PerExample.VMAP:
                    raise ConfigError(f"torch.func.vmap cannot differentiate this model per "
                                      f"example ({err}); set per_example = 'loop'") from err
                log.info("vmap failed on this model (%s); using one example at a time", err)
                mode = PerExample.LOOP
        if grads is None:
            grads = _loop_grads(model, task, [examples[i] for i in rows], fn, names, dtype)
        features = _project(projector, grads, names)
        _check_rows(features, rows, what)
        out[rows] = features
    return out, (PerExample.VMAP if mode is PerExample.AUTO else mode)


def _check_rows(values: torch.Tensor, rows: list[int], what: str) -> None:
    bad = ~torch.isfinite(values).reshape(len(rows), -1).all(dim=1)
    if bad.any():
        first = rows[int(bad.nonzero()[0])]
        raise NumericalError(f"the TRAK feature of {what} record {first} is not finite; check "
                             "that record for extreme content and the model for NaN weights")


def _train_weights(model: torch.nn.Module, task: AttributionTask, train: Sequence[Any],
                   settings: TrakSettings, dtype: torch.dtype) -> torch.Tensor:
    q = torch.ones(len(train), dtype=torch.float64)
    if not settings.reweight:
        return q
    for rows, batch in task.batches(train, settings.batch_size):
        values = train_weight(task, model, _cast_batch(batch, dtype)).double().reshape(-1)
        _check_rows(values[:, None], rows, "train")
        q[rows] = values
    return q


# ---- kernel and scores ------------------------------------------------------------------


def _kernel_scores(phi_train: torch.Tensor, phi_query: torch.Tensor,
                   settings: TrakSettings) -> tuple[torch.Tensor, float, float]:
    """``phi_query (Phi^T Phi + lambda I)^-1 Phi^T`` ``(n_query, n_train)`` in float64, with
    ``lambda`` and the smallest eigenvalue of ``Phi^T Phi``.

    When ``n_train < k`` the same matrix is computed as ``phi_query Phi^T (Phi Phi^T +
    lambda I)^-1`` (push-through identity), an ``n_train x n_train`` problem."""
    n_train, k = phi_train.shape
    mean_eig = float((phi_train**2).sum()) / k  # trace(Phi^T Phi) / k
    lam = settings.damping * (mean_eig if settings.damping_scale is DampingScale.RELATIVE
                              else 1.0)
    small = n_train < k
    gram = phi_train @ phi_train.T if small else phi_train.T @ phi_train  # symmetric PSD
    evals, evecs = torch.linalg.eigh(gram)
    smallest = 0.0 if small else max(float(evals[0]), 0.0)
    if lam == 0 and (small or smallest <= 1e-10 * max(float(evals[-1]), 1e-300)):
        raise ConfigError(
            f"TrakSettings.damping = 0 but Phi^T Phi is singular (smallest eigenvalue "
            f"{smallest:.3g}, {n_train} train records, k = {k}); set damping > 0"
        )
    inverse = (evecs / (evals.clamp(min=0) + lam)) @ evecs.T
    if small:
        return (phi_query @ phi_train.T) @ inverse, lam, smallest
    return phi_query @ (inverse @ phi_train.T), lam, smallest


def _as_models(models: Any) -> list[torch.nn.Module]:
    models = [models] if isinstance(models, torch.nn.Module) else list(models)
    if not models:
        raise ConfigError("trak_scores needs at least one model (a checkpoint or a trained "
                          "model); got an empty list")
    return models


def trak_scores(models: Sequence[torch.nn.Module] | torch.nn.Module, task: AttributionTask,
                train: Sequence[Any], queries: Sequence[Any], *,
                settings: TrakSettings | None = None) -> TrakResult:
    """TRAK scores ``(n_query, n_train)`` averaged over ``models`` (Park et al. 2023).

    ``scores[i, j]`` is the attribution of ``train[j]`` to ``queries[i]``; **positive: the
    record raised the query's output (margin), i.e. lowered its loss**. Each model is used
    in eval mode and restored to its own mode afterwards; parameters whose names match
    ``settings.parameters`` (default: all trainable ones) are differentiated.
    """
    settings = settings or TrakSettings()
    models = _as_models(models)
    check_train_and_queries(train, queries, caller="trak_scores")
    names = list(trainable_parameters(models[0], settings.parameters))
    for index, model in enumerate(models[1:], start=1):
        if list(trainable_parameters(model, settings.parameters)) != names:
            raise ConfigError(f"model {index} of the ensemble has other trainable parameters "
                              "than model 0; ensemble checkpoints of one architecture")
    shapes = {n: p.shape for n, p in models[0].named_parameters() if n in names}
    n_params = sum(int(s.numel()) for s in shapes.values())
    projected = 0 < settings.projection_dim < n_params
    dim = settings.projection_dim if projected else n_params
    projector = GaussianProjector(shapes, dim=dim, seed=settings.seed) if projected else None
    if projected and dim < 64:
        warnings.warn(f"TrakSettings.projection_dim = {dim} is far below the hundreds to "
                      "thousands of dimensions TRAK needs to rank records reliably; raise it",
                      LowDimensionWarning, stacklevel=2)

    total = torch.zeros(len(queries), len(train), dtype=torch.float64)
    lams, smallest, modes = [], [], []
    for model in models:
        scores, lam, low, mode = _one_model(model, task, train, queries, names=names,
                                            projector=projector, dim=dim, settings=settings)
        total += scores
        lams.append(lam)
        smallest.append(low)
        modes.append(mode.value)
    log.info("TRAK over %d models, %d parameters projected to k = %d", len(models), n_params,
             dim)
    scores = (total / len(models)).numpy()
    meta = TrakMetadata(projection_dim=dim, projected=projected, damping=tuple(lams),
                        smallest_eigenvalue=tuple(smallest), parameters=tuple(names),
                        n_params=n_params, n_models=len(models), per_example=tuple(modes),
                        settings=_settings_dict(settings),
                        query_tokens=(task.scored_token_ids(queries)
                                      if isinstance(task, LMTask) else []))
    return TrakResult(scores=scores, metadata=meta)


def _settings_dict(settings: TrakSettings) -> dict:
    out = asdict(settings)
    out["damping_scale"] = settings.damping_scale.value
    out["per_example"] = settings.per_example.value
    out["parameters"] = list(settings.parameters)
    return out


def _one_model(model: torch.nn.Module, task: AttributionTask, train: Sequence[Any],
               queries: Sequence[Any], *, names: list[str], projector, dim: int,
               settings: TrakSettings):
    """Scores of one model ``(n_query, n_train)``, lambda, smallest eigenvalue, mode."""
    dtype = dict(model.named_parameters())[names[0]].dtype
    was_training = model.training
    model.eval()
    try:
        common = {"names": names, "projector": projector, "dim": dim, "settings": settings}
        phi_train, mode = _features(model, task, train, output_function, what="train",
                                    **common)
        phi_query, _ = _features(model, task, queries, query_output, what="query", **common)
        q = _train_weights(model, task, train, settings, dtype)
    finally:
        model.train(was_training)
    kernel, lam, smallest = _kernel_scores(phi_train, phi_query, settings)
    scores = kernel * q[None, :]  # (n_query, n_train)
    if not torch.isfinite(scores).all():
        i, j = (int(v) for v in (~torch.isfinite(scores)).nonzero()[0])
        raise NumericalError(f"the TRAK score of query {i} and train record {j} is not "
                             "finite; raise TrakSettings.damping")
    return scores, lam, smallest, mode
