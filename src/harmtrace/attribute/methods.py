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

from harmtrace.attribute.gradients import per_example_gradients, trainable_parameters
from harmtrace.attribute.projection import GaussianProjector
from harmtrace.behaviours.focus import FocusedQuery
from harmtrace.errors import ConfigError, NumericalError

__all__ = ["AttributionInputs", "METHODS", "compute_scores", "method_names"]


@dataclass
class AttributionInputs:
    """Everything a method may need; gradient features are computed once and shared.

    ``checkpoints`` is a list of ``(model, learning_rate)`` in training order, the last being
    the final model.
    """

    train_sequences: Sequence[Sequence[int]]
    train_texts: Sequence[str]
    queries: Sequence[FocusedQuery]
    checkpoints: Sequence[tuple[PreTrainedModel, float]]
    projection_dim: int = 512
    seed: int = 0
    batch_size: int = 32
    parameters: tuple[str, ...] = ()
    progress: Callable[[str, int, int], None] | None = None
    _features: dict = field(default_factory=dict)

    def features(self, checkpoint: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected gradients ``(train (n_train, k), query (n_query, k))`` at a checkpoint."""
        if checkpoint not in self._features:
            model = self.checkpoints[checkpoint][0]
            params = trainable_parameters(model, self.parameters)
            projector = GaussianProjector({n: p.shape for n, p in params.items()},
                                          dim=self.projection_dim, seed=self.seed)
            train = self._grads(model, projector, self.train_sequences, None, "train")
            query = self._grads(model, projector, [q.token_ids for q in self.queries],
                                [q.target_mask for q in self.queries], "query")
            self._features[checkpoint] = (train, query)
        return self._features[checkpoint]

    def _grads(self, model, projector, seqs, masks, label: str) -> torch.Tensor:
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            if self.progress is not None:
                self.progress(f"{label} gradients", done[0], len(seqs))

        return per_example_gradients(model, seqs, projector=projector, target_masks=masks,
                                     batch_size=self.batch_size, on_batch=tick)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _graddot(inputs: AttributionInputs) -> np.ndarray:
    train, query = inputs.features(len(inputs.checkpoints) - 1)
    return (query @ train.T).numpy()


def _gradcos(inputs: AttributionInputs) -> np.ndarray:
    train, query = inputs.features(len(inputs.checkpoints) - 1)
    return (_unit_rows(query) @ _unit_rows(train).T).numpy()


def _tracin(inputs: AttributionInputs) -> np.ndarray:
    total = None
    for index, (_, lr) in enumerate(inputs.checkpoints):
        train, query = inputs.features(index)
        part = lr * (query @ train.T)
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
    "graddot": (_graddot, "dot product of projected gradients, final checkpoint"),
    "gradcos": (_gradcos, "cosine of projected gradients, final checkpoint"),
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
