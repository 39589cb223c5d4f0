"""Token-level Kronecker-factored influence: blame a record by its most influential token.

A record's ordinary influence on a query is a sum over the record's tokens. When the harm
sits in one or two words of a short text (an insult inside an ordinary tweet), the many
ordinary tokens of every tweet dominate that sum, and the ranking follows tweet *style*.
This method scores every train token separately and, by default, gives the record the score
of its highest token.

For a linear layer with input activations ``a_t`` and output gradients ``g_t`` at position
``t``, the gradient of a sequence's loss is ``G = sum_t g_t a_t^T``. With K-FAC curvature
``A (x) S`` (Martens and Grosse 2015, "Optimizing Neural Networks with Kronecker-factored
Approximate Curvature"), ``A = E[a a^T]`` and ``S = E[g g^T]`` over train tokens, the
influence of train token ``t`` on query ``q`` factorises without ever forming a gradient
matrix (the per-token form used by Grosse et al. 2023, "Studying Large Language Model
Generalization with Influence Functions", section 3.3)::

    score(q, t) = sum_s (g_t^T S^-1 g_s) (a_t^T A^-1 a_s)        # s: the query's positions

and ``sum_t score(q, t)`` is exactly the record's K-FAC influence ``<(A (x) S)^-1 G_q, G>``.
Each factor is damped by ``damping`` times its own mean eigenvalue; eigendecompositions are
in float64.

By default only the **output head** (the layer that maps hidden states to token logits) is
included: its per-token gradient ``(p_t - onehot(y_t)) a_t^T`` asks "did this token teach
the model to emit the harmful word in this kind of context", which is the question of a harm
query; the transformer blocks mostly carry style. With an output head tied to the input
embedding, only the head's share of the shared parameter's gradient is used (stated in the
metadata).

Sign: ``scores[i, j] > 0`` means record ``j`` (through its best token) made query ``i``'s
loss smaller, to first order, as for every method of harmtrace. With
``normalise_queries = True`` each query's row is divided by its standard deviation over
records, so that every query weighs the same when scores are averaged over a behaviour's
queries; the sign is unchanged.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from harmtrace.attribute.layers import GradientCapture, eval_mode, module_info
from harmtrace.attribute.task import LMTask
from harmtrace.errors import ConfigError, NumericalError

__all__ = [
    "Aggregation",
    "TokenInfluenceResult",
    "TokenInfluenceSettings",
    "output_head_name",
    "token_influence_scores",
]


class Aggregation(enum.StrEnum):
    """How a record's token scores become the record's score."""

    MAX = "max"  # the record's most influential token
    SUM = "sum"  # every token: exactly the record's K-FAC influence


@dataclass(frozen=True)
class TokenInfluenceSettings:
    """Settings of :func:`token_influence_scores`.

    ``modules``: names of ``Linear``/``Conv1D`` modules to include (default: the output
    head). ``damping`` (> 0): each factor ``A`` and ``S`` gets ``damping * mean eigenvalue``
    added to its eigenvalues. ``aggregation``: ``max`` or ``sum``. ``normalise_queries``:
    divide each query's row by its standard deviation over records. ``max_factor_dim``: a
    factor larger than this (a 50,000-word vocabulary) is replaced by its diagonal, and the
    metadata says so. ``batch_size``: train records per forward pass; scores do not depend
    on it.
    """

    modules: tuple[str, ...] = ()
    damping: float = 0.1
    aggregation: Aggregation = Aggregation.MAX
    normalise_queries: bool = True
    max_factor_dim: int = 8192
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not self.damping > 0:
            raise ConfigError(f"token-influence damping must be > 0, got {self.damping}; "
                              "it is a fraction of each factor's mean eigenvalue (e.g. 0.1)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_factor_dim < 1:
            raise ConfigError(f"max_factor_dim must be >= 1, got {self.max_factor_dim}")
        object.__setattr__(self, "aggregation", Aggregation(self.aggregation))


@dataclass
class TokenInfluenceResult:
    """``scores`` ``(n_query, n_train)`` float64 (sign as in the module docstring);
    ``best_token[j]``: position in record ``j`` of the token with the highest score summed
    over queries (the token it predicts, so ``tokens[j][best_token[j]]`` is the blamed
    word), -1 for a record with no scored token; ``metadata``: settings and factors used."""

    scores: np.ndarray
    best_token: np.ndarray
    metadata: dict = field(default_factory=dict)


def output_head_name(model: torch.nn.Module) -> str:
    """Name of the module that maps hidden states to token logits."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        for name, module in model.named_modules():
            if module is head:
                return name
    raise ConfigError("the model has no output head (get_output_embeddings); name the "
                      "modules to include with attribute.token_modules")


def token_influence_scores(
    model: torch.nn.Module,
    train: Sequence[Sequence[int]],
    queries: Sequence[dict],
    *,
    settings: TokenInfluenceSettings | None = None,
    pad_id: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> TokenInfluenceResult:
    """Token-level influence of each train record on each query.

    ``train[j]``: token ids of record ``j`` (every token after the first is a target).
    ``queries[i]``: ``{"input_ids": [...], "labels": [...]}``, labels -100 at context-only
    tokens. Returns :class:`TokenInfluenceResult` with ``scores`` ``(n_query, n_train)``.
    The model's mode and weights are left as they were.
    """
    settings = settings or TokenInfluenceSettings()
    if not train or not queries:
        raise ConfigError("token influence needs at least one train record and one query")
    names = list(settings.modules) or [output_head_name(model)]
    task = LMTask(pad_id=pad_id)
    with eval_mode(model), GradientCapture(model, names) as cap:
        factors = _fit_factors(cap, task, train, settings, progress)
        query_side = _query_vectors(cap, task, queries, factors)
        raw, best = _score_train(cap, task, train, query_side, len(queries), settings,
                                 progress)
    scores = raw
    if settings.normalise_queries:
        spread = raw.std(axis=1, keepdims=True)  # (n_query, 1)
        scores = raw / np.where(spread > 0, spread, 1.0)
    if not np.isfinite(scores).all():
        bad = np.argwhere(~np.isfinite(scores))[0]
        raise NumericalError(f"token influence of record {bad[1]} on query {bad[0]} is not "
                             "finite; check that record and the model's weights")
    head = names == [output_head_name(model)] if not settings.modules else False
    metadata = {
        "method": "token-level K-FAC influence",
        "aggregation": settings.aggregation.value,
        "normalisation": ("each query's row divided by its standard deviation over records"
                          if settings.normalise_queries else "none"),
        "damping": {n: f.damping for n, f in factors.items()},
        "damping_rule": f"{settings.damping} x mean eigenvalue of each factor",
        "factor_kind": {n: f.kind for n, f in factors.items()},
        "smallest_eigenvalue": {n: f.smallest for n, f in factors.items()},
        "modules": names,
        "tied_output_head": bool(head and _head_is_tied(model)),
        "n_train_tokens": int(next(iter(factors.values())).n_tokens),
    }
    return TokenInfluenceResult(scores=scores, best_token=best, metadata=metadata)


@dataclass
class _Factor:
    """Damped inverses of one module's K-FAC factors."""

    a_inv: torch.Tensor  # (d_in', d_in') or (d_in',) when diagonal
    s_inv: torch.Tensor  # (d_out, d_out) or (d_out,)
    damping: dict
    kind: dict
    smallest: dict
    n_tokens: int


def _live(batch: dict) -> torch.Tensor:
    """``(B, T)`` bool: position ``t`` predicts a labelled token ``t + 1`` (padding, with
    attention mask 0, is never a target; see :meth:`LMTask.targets`)."""
    labels = batch["labels"]
    live = torch.zeros_like(labels, dtype=torch.bool)
    live[:, :-1] = LMTask.targets(batch) != -100
    return live


def _fit_factors(cap, task, train, settings, progress) -> dict[str, _Factor]:
    sums_a: dict[str, torch.Tensor] = {}
    sums_s: dict[str, torch.Tensor] = {}
    n_tokens, done = 0, 0
    diag = {n: {"A": module_info(cap.modules[n]).d_in_aug > settings.max_factor_dim,
                "S": module_info(cap.modules[n]).d_out > settings.max_factor_dim}
            for n in cap.names}
    for rows, batch in task.batches(train, settings.batch_size):
        live = _live(batch)
        captured = cap.run(task, batch, rows=rows)
        for name, c in captured.items():
            a = c.a[live].double()  # (N, d_in')
            g = c.g[live].double()  # (N, d_out)
            sums_a[name] = sums_a.get(name, 0) + (
                (a * a).sum(0) if diag[name]["A"] else a.T @ a)
            sums_s[name] = sums_s.get(name, 0) + (
                (g * g).sum(0) if diag[name]["S"] else g.T @ g)
        n_tokens += int(live.sum())
        done += len(rows)
        if progress is not None:
            progress("token influence: curvature", done, len(train))
    if n_tokens == 0:
        raise ConfigError("no train record has a token after its first; nothing to score")
    factors = {}
    for name in cap.names:
        a_inv, lam_a, min_a = _damped_inverse(sums_a[name] / n_tokens, settings.damping,
                                              f"{name} activation factor A")
        s_inv, lam_s, min_s = _damped_inverse(sums_s[name] / n_tokens, settings.damping,
                                              f"{name} gradient factor S")
        factors[name] = _Factor(
            a_inv, s_inv, {"A": lam_a, "S": lam_s},
            {k: "diagonal" if v else "full" for k, v in diag[name].items()},
            {"A": min_a, "S": min_s}, n_tokens)
    return factors


def _damped_inverse(cov: torch.Tensor, damping: float, what: str):
    """``(cov + lam I)^-1`` with ``lam = damping * mean eigenvalue``; a 1-D ``cov`` is a
    diagonal. Returns the inverse, ``lam`` and the smallest eigenvalue seen."""
    if not torch.isfinite(cov).all():
        raise NumericalError(f"the {what} has non-finite entries; check the model's weights")
    if cov.dim() == 1:
        lam = damping * float(cov.mean())
        if not lam > 0:
            raise NumericalError(f"the {what} is all zeros; this module sees no signal")
        return 1.0 / (cov + lam), lam, float(cov.min())
    eigvals, eigvecs = torch.linalg.eigh(cov)  # float64
    lam = damping * float(eigvals.mean())
    if not lam > 0:
        raise NumericalError(f"the {what} is all zeros; this module sees no signal")
    inverse = (eigvecs / (eigvals.clamp_min(0) + lam)) @ eigvecs.T
    return inverse, lam, float(eigvals.min())


def _apply(inv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` ``(N, d)`` times a symmetric inverse (full ``(d, d)`` or diagonal)."""
    return x * inv if inv.dim() == 1 else x @ inv


def _query_vectors(cap, task, queries, factors):
    """Preconditioned ``(a_s A^-1, g_s S^-1)`` of every query position with a gradient,
    per module, and the query each position belongs to."""
    parts: dict[str, tuple[list, list]] = {n: ([], []) for n in cap.names}
    owners: dict[str, list[int]] = {n: [] for n in cap.names}
    for index, query in enumerate(queries):
        batch = task.collate([query])
        captured = cap.run(task, batch, loss="query", rows=[index])
        for name, c in captured.items():
            g = c.g[0].double()  # (T, d_out)
            keep = g.abs().sum(dim=1) > 0  # positions that carry the query's gradient
            parts[name][0].append(_apply(factors[name].a_inv, c.a[0][keep].double()))
            parts[name][1].append(_apply(factors[name].s_inv, g[keep]))
            owners[name].extend([index] * int(keep.sum()))
    empty = [i for i in range(len(queries))
             if all(i not in set(owners[n]) for n in cap.names)]
    if empty:
        raise ConfigError(f"queries {empty[:5]} have no labelled token after the first; give "
                          "each query at least one target token")
    return {n: (torch.cat(parts[n][0]), torch.cat(parts[n][1]), torch.tensor(owners[n]))
            for n in cap.names}


def _score_train(cap, task, train, query_side, n_query, settings, progress):
    raw = np.zeros((n_query, len(train)))
    best = np.full(len(train), -1, dtype=np.int64)
    done = 0
    for rows, batch in task.batches(train, settings.batch_size):
        live = _live(batch)  # (B, T)
        captured = cap.run(task, batch, rows=rows)
        width = live.shape[1]
        total = torch.zeros(len(rows) * width, n_query, dtype=torch.float64)
        for name, c in captured.items():
            qa, qg, owner = query_side[name]
            a = c.a.reshape(-1, c.a.shape[-1]).double()  # (B*T, d_in')
            g = c.g.reshape(-1, c.g.shape[-1]).double()  # (B*T, d_out)
            kernel = (g @ qg.T) * (a @ qa.T)  # (B*T, n_positions): per-token influence
            total.index_add_(1, owner, kernel)  # (B*T, n_query)
        per_token = total.reshape(len(rows), width, n_query)  # (B, T, n_query)
        if settings.aggregation is Aggregation.SUM:
            record = (per_token * live[..., None]).sum(dim=1)  # (B, n_query)
        else:
            masked = per_token.masked_fill(~live[..., None], float("-inf"))
            record = masked.max(dim=1).values
            record = torch.where(torch.isfinite(record), record, torch.zeros_like(record))
        summed = per_token.sum(dim=2).masked_fill(~live, float("-inf"))  # (B, T)
        position = summed.argmax(dim=1) + 1  # the token predicted at the best position
        has = live.any(dim=1)
        best[rows] = torch.where(has, position, torch.full_like(position, -1)).numpy()
        raw[:, rows] = record.T.numpy()
        done += len(rows)
        if progress is not None:
            progress("token influence: scoring", done, len(train))
    return raw, best


def _head_is_tied(model: torch.nn.Module) -> bool:
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return embed is not None and head is not None and head.weight is embed.weight
