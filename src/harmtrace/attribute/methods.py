"""Attribution methods, registered by name.

Every method returns ``scores`` of shape ``(n_query, n_train)``: ``scores[i, j]`` is the
attribution of train record ``j`` to query ``i``. **Sign convention, shared by all methods:
a positive score means the record made the query's harmful tokens more likely**; for the
gradient methods, one gradient-descent step on record ``j`` lowers query ``i``'s loss, to
first order, by ``lr * <g_query_i, g_train_j>``. Larger is more to blame.

Methods
-------
``graddot``
    Dot product of projected loss gradients at the final checkpoint
    (Pruthi et al. 2020, "Estimating Training Data Influence by Tracing Gradient Descent",
    the single-checkpoint case; projection as in Park et al. 2023, TRAK).
``gradcos``
    Cosine similarity of the same projected gradients (Akyurek et al. 2022, "Towards
    Tracing Factual Knowledge in Language Models Back to the Training Data").
``tracin``
    TracInCP: the learning-rate-weighted sum of gradient dot products over the saved
    checkpoints (Pruthi et al. 2020, eq. 3).
``bm25``
    Okapi BM25 between each query's focus words and each record's text (Robertson and
    Zaragoza 2009), through the ``bm25s`` package; a lexical baseline, non-negative.
``ekfac``, ``kfac``
    Influence functions ``g_query^T (H + damping)^-1 g_train`` at the final checkpoint, with
    the EK-FAC or K-FAC curvature of the linear layers (:mod:`~harmtrace.attribute.influence`;
    Grosse et al. 2023, "Studying Large Language Model Generalization with Influence
    Functions"). The diagonal curvature is not registered separately: it is ``graddot`` with
    ``preconditioner = "diagonal"``.
``trak``
    TRAK over the final model or the saved checkpoints (Park et al. 2023, "TRAK: Attributing
    Model Behavior at Scale"; :mod:`~harmtrace.attribute.trak`).
``logra``
    Gradient dot products after LoGra's per-layer Kronecker projection (Choe et al. 2024;
    :mod:`~harmtrace.attribute.logra`).
``repsim``
    Cosine of last hidden states, a gradient-free baseline (Hanawa et al. 2021;
    :mod:`~harmtrace.attribute.repsim`).
``exact``
    Metagradients through the replayed training of the pipeline's own model (Engstrom et
    al. 2025; :mod:`~harmtrace.attribute.exact`); small models only.

:func:`run_method` returns the scores with the metadata of what was actually used (damping,
projection dimension, parameters, normalisation, citation); :func:`compute_scores` the
scores alone. A method is added by writing its adapter (see
:mod:`~harmtrace.attribute.engines`) and registering it in :data:`METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from transformers import PreTrainedModel

from harmtrace.attribute import engines
from harmtrace.attribute.engines import LMTraining
from harmtrace.attribute.gradients import (
    iter_example_gradients,
    per_example_gradients,
    trainable_parameters,
)
from harmtrace.attribute.influence import Strategy
from harmtrace.attribute.projection import GaussianProjector
from harmtrace.behaviours.focus import FocusedQuery
from harmtrace.errors import ConfigError, NumericalError

__all__ = [
    "METHODS",
    "SIGN",
    "AttributionInputs",
    "Kernel",
    "LMTraining",
    "Method",
    "MethodResult",
    "compute_scores",
    "method_names",
    "run_method",
]

SIGN = ("scores[i, j] > 0: train record j made query i's harmful (focus) tokens more likely, "
        "i.e. lowered its loss; larger is more to blame")


@dataclass(frozen=True)
class Kernel:
    """Gradient inner products at one checkpoint.

    ``dot[i, j] = <g_query_i, g_train_j>`` (shape ``(n_query, n_train)``), and the gradient
    norms ``query_norm`` ``(n_query,)`` and ``train_norm`` ``(n_train,)``; all in the
    projected space, or exact when the projection dimension is 0.
    """

    dot: torch.Tensor
    query_norm: torch.Tensor
    train_norm: torch.Tensor
    dim: int
    parameters: tuple[str, ...]


@dataclass
class AttributionInputs:
    """Everything a method may need; gradient kernels are computed once and shared.

    ``checkpoints`` is a list of ``(model, learning_rate)`` in training order, the last being
    the final model. ``projection_dim = 0`` keeps gradients exact: query gradients are held
    in memory (``n_query * n_params * 4`` bytes, at most ``max_bytes``) and train gradients
    are streamed past them, so memory never grows with the number of train records.

    ``preconditioner`` sets the inner product ``<a, b>_W = sum_p w_p a_p b_p`` used by every
    gradient method, from the diagonal empirical Fisher ``F_p = mean_j g_jp^2`` over the
    train records (one extra pass over them):

    * ``"none"``: ``w = 1``;
    * ``"diagonal"``: ``w = 1 / (F + damping * mean(F))``, the diagonal approximation of
      the inverse Hessian in influence functions (Koh and Liang 2017);
    * ``"adam"``: ``w = 1 / (sqrt(F) + damping * mean(sqrt(F)))``, the normalisation Adam
      applies to each update, as in LESS (Xia et al. 2024, "LESS: Selecting Influential
      Data for Targeted Instruction Tuning").

    Both damp by a fraction of the mean so that the default does not depend on the scale
    of the loss. In the projected space the diagonal is that of the projected features.

    The engines (:mod:`~harmtrace.attribute.engines`) read more fields: ``pad_id`` (the
    tokenizer's pad token, for padded batches), ``influence_damping`` (``ekfac``/``kfac``;
    ``None``: 0.1 x the mean eigenvalue per module), ``trak_projection_dim`` and
    ``trak_ensemble`` (``"checkpoints"``: every saved checkpoint, or ``"final"``), ``damping``
    (TRAK's relative ``lambda`` too), ``logra_k_in`` / ``logra_k_out``, ``training`` (an
    :class:`~harmtrace.attribute.engines.LMTraining`, needed by ``exact``) and
    ``exact_max_bytes`` (the largest unrolled training graph ``exact`` builds).
    """

    train_sequences: Sequence[Sequence[int]]
    train_texts: Sequence[str]
    queries: Sequence[FocusedQuery]
    checkpoints: Sequence[tuple[PreTrainedModel, float]]
    projection_dim: int = 0
    seed: int = 0
    batch_size: int = 32
    parameters: tuple[str, ...] = ()
    preconditioner: str = "none"
    damping: float = 1e-3
    max_bytes: int = 4 << 30
    progress: Callable[[str, int, int], None] | None = None
    pad_id: int = 0
    influence_damping: float | None = None
    trak_projection_dim: int = 2048
    trak_ensemble: str = "checkpoints"
    logra_k_in: int = 16
    logra_k_out: int = 16
    training: LMTraining | None = None
    exact_max_bytes: int = 4 << 30
    _kernels: dict = field(default_factory=dict)

    def kernel(self, checkpoint: int) -> Kernel:
        """The :class:`Kernel` at checkpoint index ``checkpoint`` (cached)."""
        if checkpoint not in self._kernels:
            self._kernels[checkpoint] = self._compute_kernel(checkpoint)
        return self._kernels[checkpoint]

    def _compute_kernel(self, checkpoint: int) -> Kernel:
        model = self.checkpoints[checkpoint][0]
        params = trainable_parameters(model, self.parameters)
        projector = GaussianProjector({n: p.shape for n, p in params.items()},
                                      dim=self.projection_dim, seed=self.seed,
                                      max_bytes=self.max_bytes)
        need = len(self.queries) * projector.dim * 4
        if need > self.max_bytes:
            raise ConfigError(
                f"{len(self.queries)} query gradients of dimension {projector.dim:,} need "
                f"{need / 2**30:.1f} GiB; set attribute.projection_dim (e.g. 1024) or "
                "restrict attribute.parameters"
            )
        query = per_example_gradients(
            model, [q.token_ids for q in self.queries], projector=projector,
            target_masks=[q.target_mask for q in self.queries], batch_size=self.batch_size)
        weights = self._weights(model, projector, checkpoint)  # (dim,)
        weighted = query * weights  # (n_query, dim)
        n_train = len(self.train_sequences)
        dot = torch.zeros(len(self.queries), n_train)
        train_norm = torch.zeros(n_train)
        for rows, grads in self._train_pass(model, projector, f"checkpoint {checkpoint + 1}"):
            dot[:, rows] = weighted @ grads.T  # (n_query, len(rows))
            train_norm[rows] = (grads * grads * weights).sum(dim=1).sqrt()
        query_norm = (weighted * query).sum(dim=1).sqrt()
        return Kernel(dot=dot, query_norm=query_norm, train_norm=train_norm,
                      dim=projector.dim, parameters=tuple(projector.names))

    def _train_pass(self, model, projector, label: str):
        done, n_train = 0, len(self.train_sequences)
        for rows, grads in iter_example_gradients(model, self.train_sequences,
                                                  projector=projector,
                                                  batch_size=self.batch_size):
            yield rows, grads
            done += len(rows)
            if self.progress is not None:
                self.progress(f"train gradients, {label}", done, n_train)

    def _weights(self, model, projector, checkpoint: int) -> torch.Tensor:
        if self.preconditioner == "none":
            return torch.ones(projector.dim)
        if self.preconditioner not in ("diagonal", "adam"):
            raise ConfigError(f"attribute.preconditioner = {self.preconditioner!r} is unknown; "
                              "use 'none', 'diagonal' or 'adam'")
        fisher = torch.zeros(projector.dim, dtype=torch.float64)
        for _, grads in self._train_pass(model, projector, f"curvature {checkpoint + 1}"):
            fisher += (grads.double() ** 2).sum(dim=0)
        fisher /= len(self.train_sequences)
        base = fisher if self.preconditioner == "diagonal" else fisher.sqrt()
        damped = base + self.damping * base.mean()
        if not bool(damped.min() > 0):
            raise NumericalError(
                f"the {self.preconditioner} preconditioner has a zero entry; raise "
                f"attribute.damping (now {self.damping})")
        return (1.0 / damped).float()


_GRADIENT_LOSS = ("query loss: summed token NLL over its focus tokens; train loss: summed "
                  "token NLL over all tokens of the record; no 1/n factor")


def _kernel_meta(inputs: AttributionInputs, checkpoints: Sequence[int]) -> dict:
    kernel = inputs.kernel(checkpoints[-1])
    damping = None
    if inputs.preconditioner != "none":
        base = "F" if inputs.preconditioner == "diagonal" else "sqrt(F)"
        damping = {"relative": inputs.damping,
                   "rule": f"weights 1 / ({base} + damping x mean({base}))"}
    return {"damping": damping, "projection_dim": kernel.dim,
            "projected": inputs.projection_dim > 0, "parameters": list(kernel.parameters),
            "details": {"preconditioner": inputs.preconditioner,
                        "checkpoints": [int(c) for c in checkpoints]}}


def _graddot(inputs: AttributionInputs) -> MethodResult:
    last = len(inputs.checkpoints) - 1
    meta = {**_kernel_meta(inputs, [last]),
            "normalisation": f"{_GRADIENT_LOSS}; scores = <g_query, W g_train>"}
    return MethodResult(inputs.kernel(last).dot.numpy(), meta)


def _gradcos(inputs: AttributionInputs) -> MethodResult:
    last = len(inputs.checkpoints) - 1
    k = inputs.kernel(last)
    scale = torch.outer(k.query_norm, k.train_norm).clamp_min(1e-12)
    meta = {**_kernel_meta(inputs, [last]),
            "normalisation": f"{_GRADIENT_LOSS}; cosine in the W inner product, in [-1, 1]"}
    return MethodResult((k.dot / scale).numpy(), meta)


def _tracin(inputs: AttributionInputs) -> MethodResult:
    total = None
    for index, (_, lr) in enumerate(inputs.checkpoints):
        part = lr * inputs.kernel(index).dot
        total = part if total is None else total + part
    meta = _kernel_meta(inputs, range(len(inputs.checkpoints)))
    meta["normalisation"] = (f"{_GRADIENT_LOSS}; sum over checkpoints of the learning rate "
                             "x <g_query, W g_train>")
    meta["details"]["learning_rates"] = [float(lr) for _, lr in inputs.checkpoints]
    return MethodResult(total.numpy(), meta)


def _bm25(inputs: AttributionInputs) -> MethodResult:
    import bm25s

    corpus = bm25s.tokenize(list(inputs.train_texts), stopwords="en", show_progress=False)
    retriever = bm25s.BM25()
    retriever.index(corpus, show_progress=False)
    scores = np.zeros((len(inputs.queries), len(inputs.train_texts)))
    for i, query in enumerate(inputs.queries):
        tokens = bm25s.tokenize([query.words], stopwords="en", show_progress=False,
                                return_ids=False)[0]
        if tokens:
            scores[i] = retriever.get_scores(tokens)
    meta = {"normalisation": ("Okapi BM25 of the query's focus words against the record's "
                              "text (bm25s defaults, English stop words); non-negative"),
            "damping": None, "projection_dim": None, "projected": False, "parameters": [],
            "details": {"model_free": True}}
    return MethodResult(scores, meta)


@dataclass(frozen=True)
class MethodResult:
    """``scores`` ``(n_query, n_train)`` (sign: :data:`SIGN`) and ``metadata``: what was
    actually used (``normalisation``, ``damping``, ``projection_dim``, ``projected``,
    ``parameters``, ``details``), plus the method's ``citation`` and the sign."""

    scores: np.ndarray
    metadata: dict


class Method(NamedTuple):
    """A registered method: ``run(inputs) -> MethodResult``, a one-line description and
    the work it follows."""

    run: Callable[[AttributionInputs], MethodResult]
    description: str
    citation: str


def _engine(adapter: Callable[[AttributionInputs], tuple]) -> Callable:
    def run(inputs: AttributionInputs) -> MethodResult:
        scores, meta = adapter(inputs)
        return MethodResult(scores, meta)

    return run


_PRUTHI = ("Pruthi et al. 2020, \"Estimating Training Data Influence by Tracing Gradient "
           "Descent\", NeurIPS")
_GROSSE = ("Grosse et al. 2023, \"Studying Large Language Model Generalization with "
           "Influence Functions\"; Koh and Liang 2017, \"Understanding Black-box Predictions "
           "via Influence Functions\", ICML")

METHODS: dict[str, Method] = {
    "graddot": Method(_graddot, "dot product of loss gradients, final checkpoint", _PRUTHI),
    "gradcos": Method(_gradcos, "cosine of loss gradients, final checkpoint",
                      "Akyurek et al. 2022, \"Towards Tracing Factual Knowledge in Language "
                      "Models Back to the Training Data\", EMNLP Findings"),
    "tracin": Method(_tracin, "TracInCP: lr-weighted gradient dot products over checkpoints",
                     _PRUTHI),
    "bm25": Method(_bm25, "BM25 between the harmful words of each query and each record",
                   "Robertson and Zaragoza 2009, \"The Probabilistic Relevance Framework: "
                   "BM25 and Beyond\""),
    "ekfac": Method(_engine(engines.influence(Strategy.EKFAC)),
                    "influence functions with EK-FAC curvature, final checkpoint",
                    f"{_GROSSE}; George et al. 2018, \"Fast Approximate Natural Gradient "
                    "Descent in a Kronecker-factored Eigenbasis\", NeurIPS"),
    "kfac": Method(_engine(engines.influence(Strategy.KFAC)),
                   "influence functions with K-FAC curvature, final checkpoint",
                   f"{_GROSSE}; Martens and Grosse 2015, \"Optimizing Neural Networks with "
                   "Kronecker-factored Approximate Curvature\", ICML"),
    "trak": Method(_engine(engines.trak),
                   "TRAK: projected output-gradient kernel, ensembled over checkpoints",
                   "Park et al. 2023, \"TRAK: Attributing Model Behavior at Scale\", ICML"),
    "logra": Method(_engine(engines.logra),
                    "dot product of LoGra-projected loss gradients, final checkpoint",
                    "Choe et al. 2024, \"What is Your Data Worth to GPT? LLM-Scale Data "
                    "Valuation with Influence Functions\""),
    "tokeninf": Method(_engine(engines.token_influence),
                       "token-level K-FAC influence of the output head; a record's best token",
                       f"{_GROSSE} (section 3.3, token-wise attribution)"),
    "repsim": Method(_engine(engines.repsim),
                     "cosine of last hidden states (no gradient), final checkpoint",
                     "Hanawa et al. 2021, \"Evaluation of Similarity-based Explanations\", "
                     "ICLR"),
    "exact": Method(_engine(engines.exact),
                    "metagradient through the replayed training (small models only)",
                    "Engstrom et al. 2025, \"Optimizing ML Training with Metagradient "
                    "Descent\"; Hara et al. 2019, \"Data Cleansing for Models Trained with "
                    "SGD\", NeurIPS"),
}


def method_names() -> list[str]:
    """Every registered method name, in registration order."""
    return list(METHODS)


def run_method(name: str, inputs: AttributionInputs) -> MethodResult:
    """Scores ``(n_query, n_train)`` of method ``name`` and their metadata.

    ``scores[i, j]`` is the attribution of train record ``j`` to query ``i``; positive
    means the record made the query's harmful tokens more likely (see :data:`SIGN`). A
    non-finite score raises :class:`NumericalError` naming the query and the record.
    """
    if name not in METHODS:
        raise ConfigError(
            f"attribute method {name!r} is unknown; choose from {', '.join(METHODS)}"
        )
    method = METHODS[name]
    result = method.run(inputs)
    scores = np.asarray(result.scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        bad = np.argwhere(~np.isfinite(scores))[0]
        raise NumericalError(
            f"method {name} gave a non-finite score for query {bad[0]}, train record {bad[1]}"
        )
    # bm25 needs texts only; every other method reads the token sequences
    expected = (len(inputs.queries), len(inputs.train_sequences) or len(inputs.train_texts))
    if scores.shape != expected:
        raise NumericalError(f"method {name} gave scores of shape {scores.shape}, not "
                             f"(n_query, n_train) = {expected}")
    meta = {"method": name, "description": method.description,
            "citation": method.citation, "sign": SIGN, **result.metadata}
    return MethodResult(scores, meta)


def compute_scores(name: str, inputs: AttributionInputs) -> np.ndarray:
    """Scores ``(n_query, n_train)`` of method ``name``; see :func:`run_method` for sign."""
    return run_method(name, inputs).scores
