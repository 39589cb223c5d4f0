"""LoGra: low-rank Kronecker-factored projection of per-layer gradients.

Choe et al. 2024, "What is Your Data Worth to GPT? LLM-Scale Data Valuation with Influence
Functions" (LoGra). For a linear layer with input activations ``a`` ``(T, d_in)`` and output
gradients ``g`` ``(T, d_out)`` of one example's summed loss, the weight gradient is
``G = sum_t g_t a_t^T`` ``(d_out, d_in)``. LoGra projects it with two seeded Gaussian
matrices ``P_in`` ``(d_in, k_in)`` and ``P_out`` ``(d_out, k_out)``::

    P_out^T G P_in = sum_t (P_out^T g_t) (P_in^T a_t)^T        (k_out, k_in)

and the right-hand side is what is computed: the ``d_out x d_in`` gradient is never formed,
only the ``T x k`` projected activations and gradients. Flattened row-major, the result is
``(P_out (x) P_in)^T vec(G)``, a Gaussian projection with Kronecker structure; entries of
``P`` are N(0, 1/k) so that inner products are preserved in expectation
(Johnson-Lindenstrauss). A side whose width ``d <= k`` is kept exact (identity), so the
dimension actually used per module is ``min(d_out, k_out) * min(d_in, k_in)``.

The Kronecker structure costs accuracy: for a gradient of one token (rank 1, ``g a^T``) the
projection is ``(P_out^T g)(P_in^T a)^T``, so each factor is a JL projection of its own
side, and inner products keep the Johnson-Lindenstrauss tolerance of ``min(k_out, k_in)``
dimensions, not of ``k_out * k_in`` (the tests check exactly this); gradients summed over
many tokens behave closer to a plain Gaussian projection of the full dimension.

An embedding is the same form with a one-hot input: for ``E[x_t]`` with output gradient
``e_t`` the gradient of ``E`` ``(V, D)`` is ``sum_t onehot(x_t) e_t^T``, projected as
``sum_t P_out[x_t] (P_in^T e_t)^T``: a row lookup, never a ``V x D`` matrix. A weight tied
between an embedding and an output head (GPT-2's ``wte`` / ``lm_head``) is one parameter: it
gets one projection and the two contributions are summed, so it is counted once.

Sign: features are loss gradients; ``<f_query, f_train> > 0`` means a descent step on the
train record lowers the query's loss (makes its harmful tokens more likely).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from harmtrace._logging import get_logger
from harmtrace.attribute.layers import GradientCapture, eval_mode, module_info, tracked_modules
from harmtrace.attribute.task import LMTask, check_examples, per_example
from harmtrace.attribute.tokens import check_query_tokens, token_metadata
from harmtrace.errors import ArtifactError, ConfigError, NumericalError

__all__ = [
    "LograProjector",
    "LograResult",
    "LograSettings",
    "LowProjectionDimWarning",
    "ModuleProjection",
    "check_projection_dim",
    "logra_features",
    "logra_projector",
    "logra_scores",
    "logra_store_scores",
    "logra_token_scores",
    "min_projection_dim",
    "write_logra_store",
]

log = get_logger(__name__)


class LowProjectionDimWarning(UserWarning):
    """The projection dimension is far too small for the number of records compared."""


@dataclass(frozen=True)
class LograSettings:
    """Settings of the LoGra projection.

    k_in, k_out:
        Projection width of each module's input and output side (>= 1, default 16 and 16:
        256 features per module). A side narrower than its ``k`` is kept exact.
    seed:
        Projection seed; each module's matrices are drawn from a seed derived from this and
        the parameter's name, so they do not depend on the order modules are visited.
    modules:
        Substrings of module names to include; ``()`` includes every supported module.
    embeddings:
        Also project every trainable ``nn.Embedding`` (default False), with any output
        head tied to it: the tied weight is one parameter, projected once.
    batch_size:
        Examples per forward/backward pass (>= 1, default 16); features do not depend on it.
    max_bytes:
        Budget for one module's projection matrices (default 1 GiB): a module whose
        ``(d_in * k_in + d_out * k_out) * 4`` bytes exceed it is refused, naming it.
    """

    k_in: int = 16
    k_out: int = 16
    seed: int = 0
    modules: tuple[str, ...] = ()
    embeddings: bool = False
    batch_size: int = 16
    max_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        for name in ("k_in", "k_out", "batch_size", "max_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"LograSettings.{name} must be an integer >= 1, got "
                                  f"{value!r}")
        object.__setattr__(self, "modules", tuple(self.modules))

    def as_dict(self) -> dict:
        return asdict(self)


def _name_seed(seed: int, name: str, side: str) -> int:
    digest = hashlib.sha256(f"logra:{seed}:{name}:{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _gaussian(rows: int, k: int, seed: int) -> torch.Tensor | None:
    """``(rows, k)`` with N(0, 1/k) entries, or None (identity) when ``rows <= k``."""
    if rows <= k:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=gen) / math.sqrt(k)


@dataclass(frozen=True)
class ModuleProjection:
    """The two projection matrices of one weight ``(d_out, d_in)``.

    ``p_in`` ``(d_in, k_in)`` and ``p_out`` ``(d_out, k_out)``; ``None`` for an exact side.
    ``aliases`` are the other module names that share the weight (a tied head).
    """

    name: str
    d_out: int
    d_in: int
    p_in: torch.Tensor | None
    p_out: torch.Tensor | None
    aliases: tuple[str, ...] = ()

    @property
    def k_in(self) -> int:
        return self.d_in if self.p_in is None else self.p_in.shape[1]

    @property
    def k_out(self) -> int:
        return self.d_out if self.p_out is None else self.p_out.shape[1]

    @property
    def dim(self) -> int:
        return self.k_out * self.k_in

    def _in(self, a: torch.Tensor) -> torch.Tensor:
        return a if self.p_in is None else a @ self.p_in

    def _out(self, g: torch.Tensor) -> torch.Tensor:
        return g if self.p_out is None else g @ self.p_out

    def linear(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Projected weight gradient of a linear layer, ``(B, k_out * k_in)``.

        ``a`` ``(B, T, d_in)`` or ``(B, d_in)``: inputs (with a trailing 1 column when the
        layer's bias is part of the weight); ``g`` ``(B, T, d_out)`` or ``(B, d_out)``:
        gradients of each example's summed loss with respect to the layer's output.
        """
        a, g = _tokens(a, self.d_in, f"{self.name} input"), \
            _tokens(g, self.d_out, f"{self.name} output gradient")
        pa = self._in(a.float())  # (B, T, k_in)
        pg = self._out(g.float())  # (B, T, k_out)
        return torch.einsum("bto,bti->boi", pg, pa).reshape(a.shape[0], -1)

    def embedding(self, ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Projected gradient of an embedding ``(V, D)`` = ``(d_out, d_in)``, ``(B, dim)``.

        ``ids`` ``(B, T)`` looked-up rows, ``g`` ``(B, T, D)`` the gradient with respect to
        the looked-up vectors; ``onehot(ids)`` is never formed (a row lookup of ``p_out``).
        """
        if ids.dim() != 2 or g.shape[:2] != ids.shape or g.shape[2] != self.d_in:
            raise ConfigError(f"embedding {self.name}: ids (B, T) and gradients (B, T, "
                              f"{self.d_in}) expected, got {tuple(ids.shape)} and "
                              f"{tuple(g.shape)}")
        if self.p_out is None:  # exact rows: scatter into (B, V, D) only when V <= k_out
            rows = torch.nn.functional.one_hot(ids, self.d_out).float()  # (B, T, V)
        else:
            rows = self.p_out[ids]  # (B, T, k_out)
        pg = self._in(g.float())  # (B, T, k_in)
        return torch.einsum("bto,bti->boi", rows, pg).reshape(ids.shape[0], -1)

    def dense(self, grad: torch.Tensor) -> torch.Tensor:
        """Reference: ``P_out^T G P_in`` of materialised gradients ``(B, d_out, d_in)``."""
        out = grad.float()
        if self.p_out is not None:
            out = torch.einsum("boi,ok->bki", out, self.p_out)
        if self.p_in is not None:
            out = out @ self.p_in
        return out.reshape(grad.shape[0], -1)


def _tokens(x: torch.Tensor, width: int, what: str) -> torch.Tensor:
    if x.dim() == 2:
        x = x.unsqueeze(1)  # (B, 1, width): one "token" per example
    if x.dim() != 3 or x.shape[2] != width:
        raise ConfigError(f"{what} must be (B, T, {width}) or (B, {width}), got "
                          f"{tuple(x.shape)}")
    return x


class LograProjector:
    """One :class:`ModuleProjection` per weight, and the concatenation of their features.

    ``shapes`` maps a weight's name to ``(d_out, d_in)`` (``d_in`` counting a bias column
    when the caller appends one); ``aliases`` maps a name to other module names sharing it;
    ``plan`` (set by :func:`logra_projector`) records which model modules feed it.
    Features of :meth:`project` are the modules' blocks in the order of ``shapes``.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, int]], settings: LograSettings, *,
                 aliases: Mapping[str, Sequence[str]] | None = None,
                 plan: _Plan | None = None) -> None:
        if not shapes:
            raise ConfigError("LograProjector needs at least one module to project")
        self.settings = settings
        self.plan = plan  # which model modules feed it; set by logra_projector
        self.modules: dict[str, ModuleProjection] = {}
        for name, (d_out, d_in) in shapes.items():
            # only the Gaussian sides are stored; an exact side (d <= k) costs nothing
            need = 4 * (d_in * settings.k_in * (d_in > settings.k_in)
                        + d_out * settings.k_out * (d_out > settings.k_out))
            if need > settings.max_bytes:
                raise ConfigError(
                    f"the projection of {name} ({d_out} x {d_in}) needs {need / 2**30:.2f} "
                    f"GiB, over LograSettings.max_bytes; lower k_in / k_out or exclude it")
            self.modules[name] = ModuleProjection(
                name=name, d_out=d_out, d_in=d_in,
                p_in=_gaussian(d_in, settings.k_in, _name_seed(settings.seed, name, "in")),
                p_out=_gaussian(d_out, settings.k_out, _name_seed(settings.seed, name, "out")),
                aliases=tuple((aliases or {}).get(name, ())))
        self.dim = sum(m.dim for m in self.modules.values())

    def project(self, captured: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``captured[name]`` is that module's ``(B, dim_m)`` block (from
        :meth:`ModuleProjection.linear` / ``embedding``); returns ``(B, dim)``."""
        missing = [n for n in self.modules if n not in captured]
        if missing:
            raise ConfigError(f"no gradient was captured for module(s) {missing[:3]}; they "
                              "did not take part in the loss")
        return torch.cat([captured[n] for n in self.modules], dim=1)

    def metadata(self) -> dict:
        """What was projected: per module its shape, projection dims and tied aliases."""
        return {
            "method": "logra",
            "settings": self.settings.as_dict(),
            "dim": self.dim,
            "parameters": list(self.plan.parameters) if self.plan is not None else None,
            "modules": {n: {"shape": [m.d_out, m.d_in], "k_out": m.k_out, "k_in": m.k_in,
                            "exact_out": m.p_out is None, "exact_in": m.p_in is None,
                            "tied_with": list(m.aliases)}
                        for n, m in self.modules.items()},
        }


def min_projection_dim(n_records: int) -> int:
    """``ceil(8 ln n)``: the Johnson-Lindenstrauss dimension ``8 ln(n) / eps^2`` at
    ``eps = 1``, below which projected inner products among ``n`` records may be off by as
    much as the product of the norms (the ranking of close records is then noise)."""
    return math.ceil(8 * math.log(max(n_records, 2)))


def check_projection_dim(dim: int, n_records: int, *, stacklevel: int = 1) -> bool:
    """Warn (:class:`LowProjectionDimWarning`) when ``dim < min_projection_dim(n_records)``;
    returns whether it warned. ``stacklevel`` 1 points the warning at the caller of this
    function, 2 at its caller's caller (for a public function that calls it)."""
    need = min_projection_dim(n_records)
    if dim >= need:
        return False
    warnings.warn(
        f"projection dimension {dim} is far too small for {n_records} records (the JL bound "
        f"at eps = 1 is {need}): rankings of similar records are mostly noise. Assumed: "
        f"Gaussian projection. Raise k_in / k_out so that k_in * k_out per module is at "
        f"least {need}", LowProjectionDimWarning, stacklevel=stacklevel + 1)
    return True


# -- features from a model ----------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Which modules are projected: hooked linear layers, embeddings and their tied heads."""

    linear: tuple[str, ...]
    embeddings: tuple[str, ...]
    tied_heads: dict  # embedding name -> tuple of Linear module names sharing its weight
    parameters: tuple[str, ...]  # the parameters whose gradients are projected


def _plan(model: torch.nn.Module, settings: LograSettings) -> _Plan:
    modules = dict(model.named_modules())
    embeds = [n for n, m in modules.items() if isinstance(m, torch.nn.Embedding)
              and m.weight.requires_grad] if settings.embeddings else []
    # a head tied to an embedding is not tracked by layers, so it does not count here
    embedding_weights = {id(m.weight) for m in modules.values()
                         if isinstance(m, torch.nn.Embedding)}
    has_linear = any(_is_linear(m) and m.weight.requires_grad
                     and id(m.weight) not in embedding_weights for m in modules.values())
    linear = tracked_modules(model) if has_linear else []
    if settings.modules:
        subs = settings.modules
        for sub in subs:  # a name matching nothing gets layers' explanatory error
            if not any(sub in n for n in [*linear, *embeds]):
                tracked_modules(model, [sub])
        linear = [n for n in linear if any(s in n for s in subs)]
        embeds = [n for n in embeds if any(s in n for s in subs)]
    if not linear and not embeds:
        raise ConfigError("LoGra found no module to project; the model needs a trainable "
                          "Linear/Conv1D layer, or set LograSettings.embeddings=True")
    heads = {e: tuple(n for n, m in modules.items() if _is_linear(m) and n not in linear
                      and m.weight is modules[e].weight) for e in embeds}
    params = [f"{n}.{p}" for n in linear for p in ("weight", "bias")
              if p == "weight" or module_info(modules[n]).has_bias]  # trainable bias only
    params += [f"{e}.weight" for e in embeds]
    log.info("LoGra projects %d parameters: %s", len(params), ", ".join(params))
    return _Plan(tuple(linear), tuple(embeds), heads, tuple(params))


def _is_linear(module: torch.nn.Module) -> bool:
    try:
        module_info(module)
    except ConfigError:
        return False
    return True


def logra_projector(model: torch.nn.Module, settings: LograSettings) -> LograProjector:
    """The :class:`LograProjector` of ``model``'s included modules (see :class:`_Plan`):
    the trainable Linear/Conv1D layers of :func:`~harmtrace.attribute.layers.tracked_modules`
    (a bias is a last input column), plus, with ``settings.embeddings``, every trainable
    embedding together with any output head tied to it (one weight, projected once)."""
    plan = _plan(model, settings)
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, int]] = {}
    for name in plan.linear:
        info = module_info(modules[name])
        shapes[name] = (info.d_out, info.d_in_aug)
    for name in plan.embeddings:
        weight = modules[name].weight  # (V, D) = (d_out, d_in) of a tied head
        shapes[name] = (int(weight.shape[0]), int(weight.shape[1]))
    return LograProjector(shapes, settings, aliases=plan.tied_heads, plan=plan)


class _EmbeddingCapture:
    """Forward hooks keeping each embedding's ids and output, and each tied head's input
    and output, so one ``autograd.grad`` call gives their per-example gradients.

    :class:`~harmtrace.attribute.layers.GradientCapture` tracks Linear/Conv1D only, so
    embeddings (and the heads tied to them) are read here, in a pass of their own.
    """

    def __init__(self, model: torch.nn.Module, plan: _Plan) -> None:
        modules = dict(model.named_modules())
        self.model = model
        self.names = [*plan.embeddings, *(h for e in plan.embeddings
                                          for h in plan.tied_heads[e])]
        self.seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.handles = [modules[n].register_forward_hook(self._keep(n)) for n in self.names]

    def _keep(self, name: str):
        def hook(module, inputs, output):
            self.seen.setdefault(name, []).append((inputs[0].detach(), output))
        return hook

    def run(self, task, batch: dict, loss: str) -> dict[str, list[tuple]]:
        """Name -> list of ``(input, output_grad)`` per call, each ``(B, T, ...)``."""
        self.seen = {}
        try:
            with torch.enable_grad():
                losses = _task_loss(task, self.model, batch, loss)  # (B,)
                calls = [(n, x, out) for n in self.names for x, out in self.seen.get(n, [])]
                grads = torch.autograd.grad(losses.sum(), [c[2] for c in calls],
                                            allow_unused=True)
        finally:
            for handle in self.handles:
                handle.remove()
        result: dict[str, list[tuple]] = {}
        for (name, x, out), g in zip(calls, grads, strict=True):
            if out.shape[0] != losses.shape[0]:
                raise ConfigError(
                    f"module {name} is broadcast over the batch (output {tuple(out.shape)} "
                    f"for {losses.shape[0]} examples), so its per-example gradients cannot be "
                    "read from its output; leave it out with LograSettings.modules")
            g = torch.zeros_like(out) if g is None else g.detach()
            result.setdefault(name, []).append((x, g))
        return result


def _task_loss(task, model, batch: dict, loss: str) -> torch.Tensor:
    if loss not in ("train", "query"):
        raise ConfigError(f"loss must be 'train' or 'query', got {loss!r}")
    out = task.train_loss(model, batch) if loss == "train" else task.query_loss(model, batch)
    return per_example(out, batch, what=f"the task's {loss} loss")


def _embedding_blocks(model, task, batch, projector: LograProjector, loss: str) -> dict:
    plan: _Plan = projector.plan
    seen = _EmbeddingCapture(model, plan).run(task, batch, loss)
    blocks = {}
    for name in plan.embeddings:
        proj = projector.modules[name]
        parts = [proj.embedding(ids, g) for ids, g in seen.get(name, [])]
        for head in plan.tied_heads[name]:
            # the head's bias, if any, is a separate parameter and is not part of this weight
            parts += [proj.linear(_as_tokens(a), _as_tokens(g)) for a, g in seen.get(head, [])]
        if not parts:
            raise ConfigError(f"embedding {name} was not called by the forward pass; leave "
                              "it out with LograSettings.modules")
        blocks[name] = torch.stack(parts).sum(dim=0)  # (B, dim_m): summed over uses
    return blocks


def _as_tokens(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])


def logra_features(model: torch.nn.Module, task, examples: Sequence, *,
                   settings: LograSettings, projector: LograProjector | None = None,
                   loss: str = "train", start: int = 0) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(rows, features)``: LoGra features ``(len(rows), projector.dim)`` of
    ``examples[rows]``, in order, ``settings.batch_size`` at a time; feeds
    :class:`~harmtrace.attribute.store.FeatureStoreWriter` and
    :func:`~harmtrace.attribute.scoring.score_blocks` directly.

    ``loss`` is ``"train"`` (train records) or ``"query"`` (the measured behaviour).
    ``start`` skips the first rows (to resume a store at ``writer.next_row``). Gradients
    are taken in eval mode and the model's flags restored; its weights are never written.
    A non-finite feature raises :class:`NumericalError` naming the example.
    """
    check_examples(examples, argument="examples")
    projector = projector or logra_projector(model, settings)
    plan = projector.plan
    if plan is None:
        raise ConfigError("logra_features needs a projector made by logra_projector(model, "
                          "settings), which knows the model's modules")
    # positions, not a slice: a map-style dataset need not support slicing
    rest = examples if start == 0 else [examples[i] for i in range(start, len(examples))]
    for rows, batch in task.batches(rest, settings.batch_size):
        rows = [start + r for r in rows]
        blocks: dict[str, torch.Tensor] = {}
        with eval_mode(model):
            if plan.linear:
                with GradientCapture(model, plan.linear) as cap:
                    for name, c in cap.run(task, batch, loss=loss, rows=rows).items():
                        blocks[name] = projector.modules[name].linear(c.a, c.g)
            if plan.embeddings:
                blocks.update(_embedding_blocks(model, task, batch, projector, loss))
        features = projector.project(blocks)  # (B, dim)
        bad = ~torch.isfinite(features).all(dim=1)
        if bad.any():
            raise NumericalError(f"the LoGra features of example {rows[int(bad.nonzero()[0])]} "
                                 "are not finite; check that record and the model's weights")
        yield rows, features


@dataclass(frozen=True)
class LograResult:
    """``scores`` ``(n_query, n_train)``: ``scores[i, j] = <f_query_i, f_train_j>``, positive
    when a descent step on train record ``j`` lowers query ``i``'s loss; ``metadata`` says
    what was projected (:meth:`LograProjector.metadata`) and whether the dimension warned."""

    scores: object
    metadata: dict


def _query_tokens(task, queries: Sequence, tokenizer) -> dict:
    """``{"query_tokens": ...}``: what each LM query's score measures (positions, token ids
    and, with a tokenizer, the decoded text); empty for other tasks."""
    if not isinstance(task, LMTask):
        return {}
    scored = task.scored_token_ids(queries)
    if tokenizer is not None:
        for entry in scored:
            entry["text"] = tokenizer.decode(entry["token_ids"])
    return {"query_tokens": scored}


def logra_scores(model: torch.nn.Module, task, train: Sequence, queries: Sequence, *,
                 settings: LograSettings, out: str | Path | None = None,
                 block_rows: int = 4096, max_bytes: int = 2 << 30,
                 tokenizer=None) -> LograResult:
    """Gradient-dot scores of ``queries`` against ``train`` in LoGra's projected space.

    Query features ``(n_query, dim)`` are held in memory; train features are streamed past
    them batch by batch into :func:`~harmtrace.attribute.scoring.score_blocks` (to the
    ``.npy`` at ``out`` if given), so memory does not grow with ``len(train)``. Warns with
    :class:`LowProjectionDimWarning` when the dimension is far too small for ``len(train)``.
    This is the unpreconditioned (identity-curvature) inner product.

    For an :class:`LMTask` the metadata's ``query_tokens`` lists the scored positions and
    token ids of each query; with the ``tokenizer`` that encoded the records, the queries'
    BOS layout is checked against the records' and the scored tokens are decoded
    (:mod:`harmtrace.attribute.tokens`).
    """
    from harmtrace.attribute.scoring import score_blocks

    check_examples(train, argument="train")
    check_examples(queries, argument="queries")
    projector = logra_projector(model, settings)
    warned = check_projection_dim(projector.dim, len(train), stacklevel=2)
    problems = []
    if tokenizer is not None and isinstance(task, LMTask):
        problems = check_query_tokens(token_metadata(train, tokenizer), queries,
                                      tokenizer=tokenizer)
    query = torch.cat([f for _, f in logra_features(model, task, queries, settings=settings,
                                                   projector=projector, loss="query")])
    scores = score_blocks(query, logra_features(model, task, train, settings=settings,
                                                projector=projector),
                          n_train=len(train), out=out, block_rows=block_rows,
                          max_bytes=max_bytes)
    meta = {**projector.metadata(), "dim_warning": warned, "n_train": len(train),
            "n_query": len(queries), "token_warnings": problems,
            **_query_tokens(task, queries, tokenizer)}
    log.info("LoGra scores: %d queries x %d train records, dimension %d over %d modules",
             len(queries), len(train), projector.dim, len(projector.modules))
    return LograResult(scores=scores, metadata=meta)


def write_logra_store(model: torch.nn.Module, task, examples: Sequence, path: str | Path, *,
                      settings: LograSettings, metadata: Mapping | None = None,
                      dtype: str = "float16", shard_rows: int = 4096, tokenizer=None):
    """Build (or resume) a :class:`~harmtrace.attribute.store.FeatureStore` of the LoGra
    features of ``examples`` at ``path``; the store's metadata holds the caller's
    ``metadata`` (model and data fingerprints) and the projection's. With the
    ``tokenizer`` that encoded LM ``examples``, it also holds the tokenizer's settings and
    the records' BOS layout under ``"tokens"``
    (:func:`~harmtrace.attribute.tokens.token_metadata`), against which queries are checked
    at query time. Returns the store."""
    from harmtrace.attribute.store import FeatureStoreWriter

    check_examples(examples, argument="examples")
    projector = logra_projector(model, settings)
    meta = {"caller": dict(metadata or {}), "projection": projector.metadata()}
    if tokenizer is not None:
        if not isinstance(task, LMTask):
            raise ConfigError(f"write_logra_store got a tokenizer but the task is a "
                              f"{type(task).__name__}; tokenizer settings are for an LMTask")
        meta["tokens"] = token_metadata(examples, tokenizer)
    with FeatureStoreWriter(path, dim=projector.dim, n_rows=len(examples), dtype=dtype,
                            shard_rows=shard_rows, metadata=meta) as writer:
        for rows, features in logra_features(model, task, examples, settings=settings,
                                             projector=projector, start=writer.next_row):
            writer.append(rows, features)
    return writer.finalize()


def logra_store_scores(model: torch.nn.Module, task, store, queries: Sequence, *,
                       settings: LograSettings, tokenizer=None, out: str | Path | None = None,
                       block_rows: int = 4096, max_bytes: int = 2 << 30) -> LograResult:
    """Scores ``(n_query, store.n_rows)`` of ``queries`` against a LoGra feature ``store``
    (from :func:`write_logra_store` with the same ``settings``), read block by block.

    A store made with other projection settings is refused (:class:`ArtifactError`). For an
    :class:`LMTask` the queries' tokens are checked against the store's ``"tokens"``
    metadata (a BOS count the records do not have, another ``tokenizer``) with a
    :class:`~harmtrace.attribute.tokens.TokenizerMismatchWarning`, listed again under the
    metadata's ``token_warnings``; ``query_tokens`` says which tokens each score measures.
    """
    from harmtrace.attribute.scoring import score_blocks

    check_examples(queries, argument="queries")
    projector = logra_projector(model, settings)
    _check_store_matches(store, projector)
    problems = _check_store_tokens(store, task, queries, tokenizer)
    query = torch.cat([f for _, f in logra_features(model, task, queries, settings=settings,
                                                   projector=projector, loss="query")])
    scores = score_blocks(query, store, out=out, block_rows=block_rows, max_bytes=max_bytes)
    meta = {**projector.metadata(), "n_train": store.n_rows, "n_query": len(queries),
            "store": str(store.path), "token_warnings": problems,
            **_query_tokens(task, queries, tokenizer)}
    return LograResult(scores=scores, metadata=meta)


def _check_store_tokens(store, task, queries: Sequence, tokenizer) -> list[str]:
    """The token check of LM ``queries`` against a store's ``"tokens"`` metadata."""
    from harmtrace.attribute.store import FeatureStore

    if not isinstance(store, FeatureStore) or not isinstance(task, LMTask):
        return []
    return check_query_tokens(store.metadata.get("tokens"), queries, tokenizer=tokenizer)


def logra_token_scores(model: torch.nn.Module, task, query, train, *,
                       settings: LograSettings, block_rows: int = 4096,
                       n_train: int | None = None,
                       tokenizer=None) -> tuple[list[int], object]:
    """Per-token scores of one LM ``query`` against ``train`` features.

    One gradient per target token: each target token ``t`` of the query becomes an example
    whose only label is ``t`` (:func:`~harmtrace.attribute.scoring.token_examples`), and
    its LoGra features are scored against ``train`` (a
    :class:`~harmtrace.attribute.store.FeatureStore` of the same settings, or an iterator
    of ``(rows, features)`` with ``n_train``). The sequence loss is the sum of its tokens'
    losses and projection is linear, so the rows sum to the query's sequence score.
    Returns the token positions and the ``(n_tokens, n_train)`` scores (row ``r`` for
    ``positions[r]``; positive: the record made that token more likely). A store's
    ``"tokens"`` metadata is checked as by :func:`logra_store_scores`.
    """
    from harmtrace.attribute.scoring import per_token_scores, token_examples

    positions, examples = token_examples(query)
    projector = logra_projector(model, settings)
    _check_store_matches(train, projector)
    _check_store_tokens(train, task, [query], tokenizer)
    feats = torch.cat([f for _, f in logra_features(model, task, examples, settings=settings,
                                                   projector=projector, loss="query")])
    return positions, per_token_scores(feats, train, block_rows=block_rows, n_train=n_train)


def _check_store_matches(train, projector: LograProjector) -> None:
    """Refuse a store of LoGra features made with other projection settings."""
    from harmtrace.attribute.store import FeatureStore

    if not isinstance(train, FeatureStore) or "projection" not in train.metadata:
        return
    stored = train.metadata["projection"]
    wanted = json.loads(json.dumps(projector.metadata()))
    if stored != wanted:
        keys = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        raise ArtifactError(f"feature store {train.path} holds LoGra features made with other "
                            f"projection settings (differing: {keys}); score with the "
                            "settings it was built with, or rebuild it")
