"""Influence functions over the linear layers of any torch model (EK-FAC, K-FAC, ...).

``scores[i, j] = <H^-1 g_query_i, g_train_j>`` summed over the tracked modules, where
``g`` are per-example gradients (:mod:`harmtrace.attribute.layers`) and ``H`` is a
curvature estimate of the **mean** train loss. Sign (whole project): ``scores[i, j] > 0``
means upweighting train record ``j`` makes query ``i``'s loss smaller (the record helped;
for a harm query it made the harmful tokens more likely). This is ``-d L_query / d eps``
for the objective ``mean_j L_j + eps L_j`` (Koh and Liang 2017, "Understanding Black-box
Predictions via Influence Functions"). Removing record ``j`` from ``n`` changes the query
loss by about ``+scores[i, j] / n``.

Strategies (:class:`Strategy`) for ``H`` per module with ``G`` the ``(d_out, d_in')``
gradient matrix of one example (bias as the last column):

* ``identity``: ``H = I`` (plain gradient dot product, no damping);
* ``diagonal``: ``H = diag(E_examples[G^2]) + damping``;
* ``kfac``: ``H = S (x) A + damping I``, ``A = E_tokens[a a^T]`` (mean over real tokens),
  ``S = E_examples[sum_t g_t g_t^T]`` (summed over an example's tokens, averaged over
  examples), so that for one token per example ``S (x) A`` approximates the Fisher of the
  mean per-example loss (Martens and Grosse 2015, "Optimizing Neural Networks with
  Kronecker-factored Approximate Curvature"; Grosse et al. 2023, "Studying Large Language
  Model Generalization with Influence Functions", section 2.2);
* ``ekfac``: the eigenbasis ``Q_S (x) Q_A`` of K-FAC with the eigenvalues replaced by
  ``Lambda[i, j] = E_examples[(Q_S^T G Q_A)[i, j]^2]`` from a second pass (George et al.
  2018, "Fast Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis");
* ``dense``: the exact Hessian of the mean train loss over all tracked parameters, in
  float64 via ``torch.func`` (cross-module blocks included), for small models and as the
  reference the others approximate. For a linear model with squared or cross-entropy loss
  the Hessian equals the Gauss-Newton matrix, so with ``damping`` equal to an L2 penalty
  ``(damping / 2) ||theta||^2`` on the same parameters it is the exact Hessian of the
  regularised objective at its optimum.

Fisher (:class:`Fisher`) for the diagonal, K-FAC and EK-FAC statistics: ``true`` uses
gradients of ``task.sampled_loss`` (targets drawn from the model, seeded per record by
``settings.seed`` and the record's index, so the estimate does not depend on batching);
``empirical`` uses the train loss's own gradients. ``dense`` ignores it (exact Hessian).

Damping ``None`` (default) is the heuristic of Grosse et al. 2023: ``0.1 x`` the mean
eigenvalue of the module's curvature estimate (the mean of ``Lambda`` for EK-FAC, of
``lambda_S lambda_A`` for K-FAC, of the diagonal, of the dense Hessian's spectrum), stated
per module in the metadata. Damping 0 on a singular estimate raises :class:`NumericalError`
naming the module and its smallest eigenvalue; no pseudo-inverse is taken.
"""

from __future__ import annotations

import copy
import enum
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harmtrace.attribute.layers import (
    GradientCapture,
    ModuleInfo,
    eval_mode,
    module_info,
    tracked_modules,
)
from harmtrace.attribute.task import LMTask, as_enum, check_examples
from harmtrace.errors import ArtifactError, ConfigError, NumericalError

__all__ = [
    "Fisher",
    "InfluenceFactors",
    "InfluenceResult",
    "InfluenceSettings",
    "Strategy",
    "fit_factors",
    "influence_scores",
    "query_features",
    "score",
    "self_influence",
    "train_feature_blocks",
]

log = logging.getLogger(__name__)

#: Relative size below which an eigenvalue counts as zero (float64 round-off).
_SINGULAR_RTOL = 1e-10

NORMALISATION = (
    "curvature is that of the mean train loss (A: mean over real tokens; S, Lambda, the "
    "diagonal and the dense Hessian: means over train examples); per-example gradients are "
    "of each record's summed token loss; scores[i, j] = g_query_i^T (H + damping)^-1 "
    "g_train_j is -d(query loss)/d(weight of record j) for the objective mean_j L_j; "
    "multiply by 1/n_train for the leave-one-out change in query loss"
)


class Strategy(enum.StrEnum):
    """Curvature estimate; see the module docstring."""

    IDENTITY = "identity"
    DIAGONAL = "diagonal"
    KFAC = "kfac"
    EKFAC = "ekfac"
    DENSE = "dense"


class Fisher(enum.StrEnum):
    """``true``: gradients of model-sampled targets; ``empirical``: of the train targets."""

    TRUE = "true"
    EMPIRICAL = "empirical"


@dataclass(frozen=True)
class InfluenceSettings:
    """Settings of the influence engine, validated on construction.

    strategy: :class:`Strategy` or its name, default ``ekfac``.
    damping: ``None`` (default: 0.1 x mean eigenvalue per module) or a float >= 0 added
        to every eigenvalue (``identity`` ignores it).
    fisher: :class:`Fisher` or its name, default ``true``.
    seed: int >= 0, seeds the sampled targets of the true Fisher.
    batch_size: int >= 1 records per forward pass; scores do not depend on it.
    modules: substrings selecting tracked modules (empty: every trainable Linear/Conv1D).
    dense_max_params: largest parameter count the ``dense`` strategy accepts.
    reuse_bytes: int >= 0, default 1 GiB. EK-FAC's eigenvalue pass needs the same
        activations and gradients as the covariance pass; while they fit in this many bytes
        they are kept from the first pass instead of recomputed by a second forward and
        backward pass (the factors are identical either way). 0 always recomputes, so that
        memory never depends on the number of records.
    """

    strategy: Strategy = Strategy.EKFAC
    damping: float | None = None
    fisher: Fisher = Fisher.TRUE
    seed: int = 0
    batch_size: int = 16
    modules: tuple[str, ...] = ()
    dense_max_params: int = 4096
    reuse_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "strategy", as_enum(Strategy, self.strategy, "influence strategy"))
        set_(self, "fisher", as_enum(Fisher, self.fisher, "influence fisher"))
        if self.damping is not None:
            if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)):
                raise ConfigError(f"influence damping must be a number >= 0 or None, got "
                                  f"{self.damping!r}")
            if not math.isfinite(self.damping) or self.damping < 0:
                raise ConfigError(f"influence damping must be finite and >= 0, got "
                                  f"{self.damping}; use None for the default heuristic")
            set_(self, "damping", float(self.damping))
        for name, low in (("seed", 0), ("batch_size", 1), ("dense_max_params", 1),
                          ("reuse_bytes", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"influence {name} must be an integer >= {low}, got "
                                  f"{value!r}")
        modules = (self.modules,) if isinstance(self.modules, str) else self.modules
        if not all(isinstance(m, str) and m for m in modules):
            raise ConfigError(f"influence modules must be non-empty strings, got "
                              f"{self.modules!r}")
        set_(self, "modules", tuple(modules))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["strategy"] = self.strategy.value
        out["fisher"] = self.fisher.value
        out["modules"] = list(self.modules)
        return out


@dataclass
class InfluenceFactors:
    """Fitted curvature of the tracked modules; reusable for many queries.

    ``tensors[name]`` holds, per strategy (all float64): ``kfac``: ``q_a (d_in', d_in')``,
    ``l_a (d_in',)``, ``q_s (d_out, d_out)``, ``l_s (d_out,)``; ``ekfac``: the same plus
    ``lam (d_out, d_in')``; ``diagonal``: ``diag (d_out, d_in')``; ``dense``: one entry
    ``"*"`` with ``q (P, P)`` and ``l (P,)``, the eigendecomposition of the Hessian over the
    tracked modules flattened in order. ``damping[name]`` is the damping actually used and
    ``min_eigenvalue[name]`` the smallest eigenvalue of the undamped estimate.
    """

    settings: InfluenceSettings
    modules: list[str]
    info: dict[str, ModuleInfo]
    tensors: dict[str, dict[str, torch.Tensor]]
    damping: dict[str, float]
    min_eigenvalue: dict[str, float]
    n_examples: int
    n_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        """Settings, damping per module, normalisation and smallest eigenvalues (JSON)."""
        return {
            "strategy": self.settings.strategy.value,
            "fisher": self.settings.fisher.value,
            "settings": self.settings.to_dict(),
            "modules": list(self.modules),
            "parameters": _parameter_names(self.modules, self.info),
            "damping": dict(self.damping),
            "damping_rule": ("given" if self.settings.damping is not None
                             else "0.1 x mean eigenvalue per module"),
            "min_eigenvalue": dict(self.min_eigenvalue),
            "n_train_fitted": self.n_examples,
            "n_tokens_fitted": self.n_tokens,
            "normalisation": NORMALISATION,
            "sign": "scores[i, j] > 0: train record j made query i's loss smaller",
        }

    def save(self, folder: str | Path) -> Path:
        """Write ``factors.safetensors`` and ``factors.json`` into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        flat = {f"{m}::{k}": t.contiguous() for m, d in self.tensors.items()
                for k, t in d.items()}
        save_file(flat, str(folder / "factors.safetensors"))
        meta = self.metadata()
        meta["info"] = {n: asdict(i) for n, i in self.info.items()}
        (folder / "factors.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> InfluenceFactors:
        """Read factors written by :meth:`save`; missing or partial files raise."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_path, data_path = folder / "factors.json", folder / "factors.safetensors"
        if not meta_path.exists() or not data_path.exists():
            raise ArtifactError(f"influence factors in {folder} are incomplete: need "
                                f"factors.json and factors.safetensors; refit them")
        meta = json.loads(meta_path.read_text())
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in load_file(str(data_path)).items():
            module, name = key.rsplit("::", 1)
            tensors.setdefault(module, {})[name] = value
        s = meta["settings"]
        settings = InfluenceSettings(**{**s, "modules": tuple(s["modules"])})
        return cls(settings=settings, modules=list(meta["modules"]),
                   info={n: ModuleInfo(**i) for n, i in meta["info"].items()},
                   tensors=tensors, damping={k: float(v) for k, v in meta["damping"].items()},
                   min_eigenvalue=meta["min_eigenvalue"], n_examples=meta["n_train_fitted"],
                   n_tokens=meta["n_tokens_fitted"])


def _parameter_names(modules: Sequence[str], info: dict[str, ModuleInfo]) -> list[str]:
    """Names of the parameters attributed: each tracked module's weight and trainable bias."""
    return [f"{m}.{p}" for m in modules for p in ("weight", "bias")
            if p == "weight" or info[m].has_bias]


@dataclass
class InfluenceResult:
    """``scores (n_query, n_train)`` float64; ``scores[i, j] > 0``: record j helped query i.

    ``per_module[name]`` (when asked) has the same shape and the modules sum to ``scores``.
    """

    scores: np.ndarray
    per_module: dict[str, np.ndarray] | None
    metadata: dict[str, Any]


# --------------------------------------------------------------------------- fitting


def fit_factors(model: torch.nn.Module, task, train_examples: Sequence[Any], *,
                settings: InfluenceSettings | None = None) -> InfluenceFactors:
    """Fit the curvature of ``settings.strategy`` over ``train_examples``.

    Train records are streamed in batches of ``settings.batch_size``; memory depends on
    the module sizes, not on ``len(train_examples)``. The model is used in eval mode and its
    mode, weights and buffers are left as they were.
    """
    settings = settings or InfluenceSettings()
    check_examples(train_examples, argument="train_examples")
    if len(train_examples) == 0:
        raise ConfigError("fit_factors needs at least one train example")
    names = tracked_modules(model, settings.modules)
    modules = dict(model.named_modules())
    info = {n: module_info(modules[n]) for n in names}
    strategy = settings.strategy
    if strategy is Strategy.IDENTITY:
        ones = {n: 1.0 for n in names}
        return InfluenceFactors(settings, names, info, {}, {n: 0.0 for n in names}, ones,
                                len(train_examples))
    if strategy is Strategy.DENSE:
        return _fit_dense(model, task, train_examples, names, info, settings)

    with eval_mode(model), GradientCapture(model, names) as cap:
        if strategy is Strategy.DIAGONAL:
            sums = _accumulate(cap, task, train_examples, settings, _diag_stats(names))
            tensors = {n: {"diag": sums[n]["g2"] / len(train_examples)} for n in names}
            return _finish(settings, names, info, tensors, len(train_examples), 0)
        kept = _Kept(settings.reuse_bytes if strategy is Strategy.EKFAC else 0)
        sums = _accumulate(cap, task, train_examples, settings, _kron_stats(names), kept)
        n_tok = int(sums[names[0]]["n_tok"])
        tensors = {}
        for n in names:
            a_cov = sums[n]["a"] / max(sums[n]["n_tok"], 1.0)
            s_cov = sums[n]["s"] / len(train_examples)
            l_a, q_a = _eigh(a_cov, n, "A")
            l_s, q_s = _eigh(s_cov, n, "S")
            tensors[n] = {"q_a": q_a, "l_a": l_a.clamp_min(0), "q_s": q_s,
                          "l_s": l_s.clamp_min(0)}
        if strategy is Strategy.EKFAC:
            lam = _accumulate(cap, task, train_examples, settings, _lambda_stats(tensors),
                              replay=kept.batches)
            for n in names:
                tensors[n]["lam"] = lam[n]["lam"] / len(train_examples)
    return _finish(settings, names, info, tensors, len(train_examples), n_tok)


def _eigh(matrix: torch.Tensor, module: str, factor: str):
    if not torch.isfinite(matrix).all():
        raise NumericalError(f"factor {factor} of module {module} has non-finite entries")
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return values, vectors


class _Kept:
    """The ``(rows, captured)`` batches of one pass, while they fit in ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used = budget, 0
        self.batches: list | None = [] if budget > 0 else None

    def add(self, rows: list[int], captured: dict) -> None:
        if self.batches is None:
            return
        self.used += sum(c.a.nbytes + c.g.nbytes + c.mask.nbytes for c in captured.values())
        if self.used > self.budget:
            self.batches = None  # over budget: the next pass recomputes
        else:
            self.batches.append((rows, captured))


def _accumulate(cap: GradientCapture, task, examples, settings, stats,
                kept: _Kept | None = None, replay: list | None = None):
    """Run every train record once through ``cap`` (or take the batches of ``replay``)
    and fold each ``(rows, captured)`` into ``stats`` (an object with ``add(captured)`` and
    ``.sums``); ``kept`` keeps the batches for a later pass."""
    batches = replay if replay is not None else _captures(cap, task, examples, settings,
                                                           kind="fit")
    for rows, captured in batches:
        if kept is not None:
            kept.add(rows, captured)
        stats.add(captured)
        # a non-finite activation or gradient anywhere in the batch makes its (small)
        # contribution non-finite; only then are the batch's rows scanned to name them
        if not all(_finite(v) for sums in stats.sums.values() for v in sums.values()):
            _raise_non_finite(captured, rows)
    return stats.sums


def _finite(value) -> bool:
    return bool(torch.isfinite(value).all()) if torch.is_tensor(value) else math.isfinite(value)


def _raise_non_finite(captured, rows: list[int]) -> None:
    for name, c in captured.items():
        for label, t in (("activations", c.a), ("output gradients", c.g)):
            if not torch.isfinite(t).all():
                raise NumericalError(f"non-finite {label} of module {name} at train records "
                                     f"{_bad_rows(t, rows)}")
    raise NumericalError(f"the curvature statistics became non-finite at train records "
                         f"{rows[0]}-{rows[-1]} although their activations and gradients are "
                         "finite (overflow); lower the learning rate or check those records")


def _captures(cap, task, examples, settings, *, kind: str):
    """Yield ``(rows, captured)``; the true Fisher samples each record with its own seed."""
    sampled = kind == "fit" and settings.fisher is Fisher.TRUE
    if not sampled:
        loss = "query" if kind == "query" else "train"
        for rows, batch in task.batches(examples, settings.batch_size):
            yield rows, cap.run(task, batch, loss=loss, rows=rows)
        return
    def generator(row: int) -> torch.Generator:
        return torch.Generator().manual_seed(settings.seed * 1_000_003 + row)

    if getattr(task, "row_generators", False):  # one batched pass, one stream per record
        for rows, batch in task.batches(examples, settings.batch_size):
            yield rows, cap.run(task, batch, loss="sampled",
                                generator=[generator(r) for r in rows], rows=rows)
        return
    for rows, _ in _row_blocks(len(examples), settings.batch_size):
        for row in rows:
            batch = task.collate([examples[row]])
            if hasattr(task, "check_batch"):
                task.check_batch(batch, [row])
            yield [row], cap.run(task, batch, loss="sampled", generator=generator(row),
                                 rows=[row])


def _row_blocks(n: int, size: int):
    for start in range(0, n, size):
        yield list(range(start, min(start + size, n))), None


def _bad_rows(t: torch.Tensor, rows: list[int]) -> list[int]:
    finite = torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
    return [rows[i] for i in torch.nonzero(~finite)[:, 0].tolist()][:5]


class _kron_stats:
    def __init__(self, names):
        self.sums = {n: {"a": 0.0, "s": 0.0, "n_tok": 0.0} for n in names}

    def add(self, captured):
        # products in the model's precision, sums over batches in float64
        for n, c in captured.items():
            mask = c.mask.to(c.a.dtype)[..., None]
            a = (c.a * mask).flatten(0, 1)  # (B*T, d_in'), padding zeroed
            g = c.g.flatten(0, 1)  # (B*T, d_out)
            acc = self.sums[n]
            acc["a"] = acc["a"] + (a.T @ a).double()
            acc["s"] = acc["s"] + (g.T @ g).double()
            acc["n_tok"] += float(c.mask.sum())


class _diag_stats:
    def __init__(self, names):
        self.sums = {n: {"g2": 0.0} for n in names}

    def add(self, captured):
        for n, c in captured.items():
            grad = torch.einsum("bto,bti->boi", c.g.double(), c.a.double())
            self.sums[n]["g2"] = self.sums[n]["g2"] + (grad ** 2).sum(dim=0)


class _lambda_stats:
    def __init__(self, tensors):
        self.tensors = tensors
        self.sums = {n: {"lam": 0.0} for n in tensors}

    def add(self, captured):
        for n, c in captured.items():
            q_s = self.tensors[n]["q_s"].to(c.g.dtype)
            q_a = self.tensors[n]["q_a"].to(c.a.dtype)
            # Q_S^T (sum_t g_t a_t^T) Q_A = sum_t (Q_S^T g_t)(Q_A^T a_t)^T: rotate each
            # token's vectors first, then form one (d_out, d_in') matrix per example
            rotated = torch.bmm((c.g @ q_s).transpose(1, 2), c.a @ q_a)  # (B, d_out, d_in')
            self.sums[n]["lam"] = self.sums[n]["lam"] + (rotated ** 2).sum(dim=0).double()


def _spectrum(strategy: Strategy, t: dict[str, torch.Tensor]) -> torch.Tensor:
    if strategy is Strategy.DIAGONAL:
        return t["diag"]
    if strategy is Strategy.KFAC:
        return torch.outer(t["l_s"], t["l_a"])
    if strategy is Strategy.EKFAC:
        return t["lam"]
    return t["l"]


def _finish(settings, names, info, tensors, n_examples, n_tokens) -> InfluenceFactors:
    damping, smallest = {}, {}
    keys = ["*"] if settings.strategy is Strategy.DENSE else names
    for key in keys:
        values = _spectrum(settings.strategy, tensors[key])
        if not torch.isfinite(values).all():
            raise NumericalError(f"curvature of module {key} has non-finite eigenvalues")
        low, high = float(values.min()), float(values.abs().max())
        delta = (0.1 * float(values.mean()) if settings.damping is None
                 else settings.damping)
        what = "all tracked modules" if key == "*" else f"module {key}"
        if high == 0 and settings.damping is None:
            raise NumericalError(
                f"the gradient of {what} is zero on every train record, so its curvature is "
                f"zero and the default damping (0.1 x its mean eigenvalue) is 0 too; a LoRA "
                f"lora_A whose lora_B is still all zeros is one cause. Leave it out with "
                f"InfluenceSettings.modules or set a positive damping")
        if delta == 0 and low <= _SINGULAR_RTOL * max(high, 1e-300):
            raise NumericalError(
                f"curvature of {what} is singular with damping 0: smallest eigenvalue "
                f"{low:.3e} (largest {high:.3e}); set a positive damping or damping=None")
        if low + delta <= 0:
            raise NumericalError(
                f"damped curvature of {what} is not positive definite: smallest eigenvalue "
                f"{low:.3e} + damping {delta:.3e} <= 0; raise the damping")
        damping[key], smallest[key] = delta, low
    if settings.strategy is Strategy.DENSE:
        damping = {n: damping["*"] for n in names}
        smallest = {n: smallest["*"] for n in names}
    log.info("fitted %s factors on %d records for %d modules", settings.strategy.value,
             n_examples, len(names))
    return InfluenceFactors(settings, names, info, tensors, damping, smallest, n_examples,
                            n_tokens)


# --------------------------------------------------------------------------- dense


class _Bound:
    """Calls ``model`` with some parameters replaced (for ``torch.func`` transforms)."""

    def __init__(self, model, params):
        self.model, self.params = model, params

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.model, self.params, args, kwargs)


def _canonical(module: torch.nn.Module, info: ModuleInfo) -> torch.Tensor:
    weight = module.weight.T if info.transposed else module.weight  # (d_out, d_in)
    if info.has_bias:
        weight = torch.cat([weight, module.bias[:, None]], dim=1)  # (d_out, d_in + 1)
    return weight


def _params_from(theta: torch.Tensor, names, info) -> dict[str, torch.Tensor]:
    params, start = {}, 0
    for n in names:
        i = info[n]
        block = theta[start:start + i.n_params].reshape(i.d_out, i.d_in_aug)
        start += i.n_params
        weight = block[:, : i.d_in]
        params[f"{n}.weight"] = weight.T if i.transposed else weight
        if i.has_bias:
            params[f"{n}.bias"] = block[:, i.d_in]
    return params


def _fit_dense(model, task, examples, names, info, settings) -> InfluenceFactors:
    total = sum(info[n].n_params for n in names)
    if total > settings.dense_max_params:
        raise ConfigError(f"strategy 'dense' needs a {total} x {total} Hessian, more than "
                          f"dense_max_params={settings.dense_max_params}; use 'ekfac' or "
                          f"select fewer modules")
    model64 = copy.deepcopy(model).double().eval()
    modules = dict(model64.named_modules())
    with torch.no_grad():
        theta = torch.cat([_canonical(modules[n], info[n]).reshape(-1) for n in names])

    def batch_loss(flat, batch):
        return task.train_loss(_Bound(model64, _params_from(flat, names, info)), batch).sum()

    hessian = torch.zeros(total, total, dtype=torch.float64)
    for rows, batch in task.batches(examples, settings.batch_size):
        batch = {k: v.double() if torch.is_floating_point(v) else v for k, v in batch.items()}
        block = torch.func.hessian(batch_loss)(theta, batch)  # (P, P)
        if not torch.isfinite(block).all():
            raise NumericalError(f"non-finite Hessian from train records {rows[:5]}...")
        hessian += block
    hessian /= len(examples)
    values, vectors = _eigh(hessian, "all tracked modules", "Hessian")
    return _finish(settings, names, info, {"*": {"q": vectors, "l": values}}, len(examples),
                   0)


# --------------------------------------------------------------------------- scoring


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The floating dtype of ``model``'s first floating parameter (float32 if none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _precondition(factors: InfluenceFactors, grads: dict[str, torch.Tensor]):
    """``(H + damping)^-1`` applied to ``grads[name] (N, d_out, d_in')`` (float64)."""
    strategy = factors.settings.strategy
    if strategy is Strategy.IDENTITY:
        return grads
    if strategy is Strategy.DENSE:
        t = factors.tensors["*"]
        delta = factors.damping[factors.modules[0]]
        flat = torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in factors.modules],
                         dim=1)  # (N, P)
        solved = (flat @ t["q"]) / (t["l"] + delta) @ t["q"].T  # (N, P)
        out, start = {}, 0
        for n in factors.modules:
            size = factors.info[n].n_params
            out[n] = solved[:, start:start + size].reshape(grads[n].shape)
            start += size
        return out
    out = {}
    for n in factors.modules:
        t, delta = factors.tensors[n], factors.damping[n]
        if strategy is Strategy.DIAGONAL:
            out[n] = grads[n] / (t["diag"] + delta)
            continue
        rotated = t["q_s"].T @ grads[n] @ t["q_a"]  # (N, d_out, d_in') in the eigenbasis
        rotated = rotated / (_spectrum(strategy, t) + delta)
        out[n] = t["q_s"] @ rotated @ t["q_a"].T
    return out


def _gradient_blocks(model, task, examples, factors, batch_size, *, kind: str,
                     dtype: torch.dtype = torch.float64, check: bool = True):
    """Yield ``(rows, name -> (B, d_out, d_in'))`` over ``examples``, in ``dtype``; with
    ``check``, a non-finite gradient raises naming its records (a caller that checks what
    it computes from them may skip it)."""
    check_examples(examples, argument=f"{kind}_examples")
    names = factors.modules
    modules = dict(model.named_modules())
    for n in names:
        if n not in modules or module_info(modules[n]) != factors.info[n]:
            raise ArtifactError(f"influence factors were fitted for module {n} with shape "
                                f"{factors.info[n]}, which this model does not have; refit")
    settings = InfluenceSettings(**{**factors.settings.to_dict(), "batch_size": batch_size,
                                    "modules": factors.settings.modules})
    with eval_mode(model), GradientCapture(model, names) as cap:
        for rows, captured in _captures(cap, task, examples, settings, kind=kind):
            grads = {n: torch.bmm(c.g.to(dtype).transpose(1, 2), c.a.to(dtype))
                     for n, c in captured.items()}  # sum over tokens of g_t a_t^T
            for n, g in grads.items():
                if check and not torch.isfinite(g).all():
                    raise NumericalError(f"non-finite gradient of module {n} at {kind} "
                                         f"records {_bad_rows(g, rows)}")
            yield rows, grads


def score(model: torch.nn.Module, task, factors: InfluenceFactors,
          train_examples: Sequence[Any], query_examples: Sequence[Any], *,
          per_module: bool = False, batch_size: int | None = None) -> InfluenceResult:
    """Pairwise influence ``scores (n_query, n_train)`` with fitted ``factors``.

    ``scores[i, j] = sum_modules <(H + damping)^-1 G_query_i, G_train_j>``; positive means
    train record ``j`` made query ``i``'s loss (``task.query_loss``) smaller. The query side
    is preconditioned once and held in memory; train gradients are streamed in batches.
    """
    check_examples(train_examples, argument="train_examples")
    check_examples(query_examples, argument="query_examples")
    if len(query_examples) == 0 or len(train_examples) == 0:
        raise ConfigError(f"score needs at least one query and one train example, got "
                          f"{len(query_examples)} query and {len(train_examples)} train")
    size = batch_size or factors.settings.batch_size
    queries: dict[str, list[torch.Tensor]] = {n: [] for n in factors.modules}
    for _, grads in _gradient_blocks(model, task, query_examples, factors, size,
                                     kind="query"):
        for n, g in _precondition(factors, grads).items():
            queries[n].append(g)
    # the train side streams in the model's precision (float32 for most models): the
    # per-example gradients and their products with the preconditioned queries
    dtype = _model_dtype(model)
    n_query, n_train = len(query_examples), len(train_examples)
    pre = {n: torch.cat(v).to(dtype).reshape(n_query, -1)
           for n, v in queries.items()}  # (n_query, d_out * d_in')
    total = np.zeros((n_query, n_train))
    parts = {n: np.zeros((n_query, n_train)) for n in factors.modules} if per_module else None
    for rows, grads in _gradient_blocks(model, task, train_examples, factors, size,
                                        kind="train", dtype=dtype, check=False):
        for n in factors.modules:
            flat = grads[n].reshape(len(rows), -1)  # (B, d_out * d_in')
            block = (pre[n] @ flat.T).double().numpy()  # (n_query, B)
            if not np.isfinite(block).all():  # a non-finite gradient spreads to its column
                _, b = np.argwhere(~np.isfinite(block))[0]
                raise NumericalError(f"non-finite gradient of module {n} at train record "
                                     f"{rows[int(b)]}, or a non-finite preconditioned query")
            total[:, rows] += block
            if parts is not None:
                parts[n][:, rows] = block
    if not np.isfinite(total).all():
        i, j = (int(v) for v in np.argwhere(~np.isfinite(total))[0])
        raise NumericalError(f"the influence score of query {i} and train record {j} is not "
                             "finite; check that record and the model's weights, or raise "
                             "the damping")
    meta = factors.metadata()
    meta.update(n_query=n_query, n_train=n_train)
    if isinstance(task, LMTask):
        meta["query_tokens"] = task.scored_token_ids(query_examples)
    return InfluenceResult(total, parts, meta)


def query_features(model: torch.nn.Module, task, factors: InfluenceFactors,
                   query_examples: Sequence[Any], *,
                   batch_size: int | None = None) -> torch.Tensor:
    """Preconditioned query gradients ``(n_query, P)`` float64, modules concatenated in
    ``factors.modules`` order, each flattened row-major from ``(d_out, d_in')``.

    With :func:`train_feature_blocks` this is :func:`score` in feature form:
    ``scores = query_features @ train_features.T``, e.g. through
    :func:`harmtrace.attribute.scoring.score_blocks` to stream the matrix to disk.
    """
    size = batch_size or factors.settings.batch_size
    parts = []
    for _, grads in _gradient_blocks(model, task, query_examples, factors, size,
                                     kind="query"):
        pre = _precondition(factors, grads)
        parts.append(torch.cat([pre[n].reshape(pre[n].shape[0], -1) for n in factors.modules],
                               dim=1))  # (B, P)
    return torch.cat(parts)


def train_feature_blocks(model: torch.nn.Module, task, factors: InfluenceFactors,
                         train_examples: Sequence[Any], *, batch_size: int | None = None):
    """Yield ``(rows, features (len(rows), P))``: flattened train-loss gradients, float64,
    in the layout of :func:`query_features`; one batch at a time."""
    size = batch_size or factors.settings.batch_size
    for rows, grads in _gradient_blocks(model, task, train_examples, factors, size,
                                        kind="train"):
        yield rows, torch.cat([grads[n].reshape(len(rows), -1) for n in factors.modules],
                              dim=1)


def influence_scores(model: torch.nn.Module, task, train_examples: Sequence[Any],
                     query_examples: Sequence[Any], *,
                     settings: InfluenceSettings | None = None,
                     per_module: bool = False) -> InfluenceResult:
    """Fit factors on ``train_examples`` and score ``query_examples`` against them.

    Returns an :class:`InfluenceResult` with ``scores (n_query, n_train)`` float64,
    ``scores[i, j] > 0`` meaning train record ``j`` made query ``i``'s loss smaller.
    """
    factors = fit_factors(model, task, train_examples, settings=settings)
    return score(model, task, factors, train_examples, query_examples, per_module=per_module)


def self_influence(model: torch.nn.Module, task, factors: InfluenceFactors,
                   train_examples: Sequence[Any], *,
                   batch_size: int | None = None) -> np.ndarray:
    """``(n_train,)``: ``<(H + damping)^-1 G_j, G_j>`` with train-loss gradients on both
    sides, the diagonal of the pairwise matrix whose queries are the train records (when
    ``task.query_loss`` is the train loss, its default)."""
    size = batch_size or factors.settings.batch_size
    out = np.zeros(len(train_examples))
    for rows, grads in _gradient_blocks(model, task, train_examples, factors, size,
                                        kind="train"):
        pre = _precondition(factors, grads)
        for n in factors.modules:
            out[rows] += torch.einsum("boi,boi->b", pre[n], grads[n]).numpy()
    return out
