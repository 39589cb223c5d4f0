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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedModel

from harmtrace.attribute.gradients import (
    iter_example_gradients,
    per_example_gradients,
    trainable_parameters,
)
from harmtrace.attribute.projection import GaussianProjector
from harmtrace.behaviours.focus import FocusedQuery
from harmtrace.errors import ConfigError, NumericalError

__all__ = ["AttributionInputs", "Kernel", "METHODS", "compute_scores", "method_names"]


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


def _graddot(inputs: AttributionInputs) -> np.ndarray:
    return inputs.kernel(len(inputs.checkpoints) - 1).dot.numpy()


def _gradcos(inputs: AttributionInputs) -> np.ndarray:
    k = inputs.kernel(len(inputs.checkpoints) - 1)
    scale = torch.outer(k.query_norm, k.train_norm).clamp_min(1e-12)
    return (k.dot / scale).numpy()


def _tracin(inputs: AttributionInputs) -> np.ndarray:
    total = None
    for index, (_, lr) in enumerate(inputs.checkpoints):
        part = lr * inputs.kernel(index).dot
        total = part if total is None else total + part
    return total.numpy()


def _bm25(inputs: AttributionInputs) -> np.ndarray:
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
    return scores


METHODS: dict[str, tuple[Callable[[AttributionInputs], np.ndarray], str]] = {
    "graddot": (_graddot, "dot product of loss gradients, final checkpoint"),
    "gradcos": (_gradcos, "cosine of loss gradients, final checkpoint"),
    "tracin": (_tracin, "TracInCP: lr-weighted gradient dot products over checkpoints"),
    "bm25": (_bm25, "BM25 between the harmful words of each query and each record"),
}


def method_names() -> list[str]:
    return list(METHODS)


def compute_scores(name: str, inputs: AttributionInputs) -> np.ndarray:
    """Scores ``(n_query, n_train)`` of method ``name``; see the module docstring for sign."""
    if name not in METHODS:
        raise ConfigError(
            f"attribute method {name!r} is unknown; choose from {', '.join(METHODS)}"
        )
    scores = np.asarray(METHODS[name][0](inputs), dtype=np.float64)
    if not np.isfinite(scores).all():
        bad = np.argwhere(~np.isfinite(scores))[0]
        raise NumericalError(
            f"method {name} gave a non-finite score for query {bad[0]}, train record {bad[1]}"
        )
    return scores
