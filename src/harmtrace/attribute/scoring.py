"""Scores from features, streamed in blocks: the score matrix on disk, top-k, aggregation.

``scores[i, j] = <q_i, f_j>`` is the inner product of query ``i``'s features (a projected
loss gradient, possibly preconditioned) with train record ``j``'s features, shape
``(n_query, n_train)``. With gradient features, **a positive score means one descent step on
record j lowers query i's loss**: the record made the query's (harmful) tokens more likely.

Train features arrive in blocks of ``block_rows`` rows (from a :class:`FeatureStore` or any
iterator of ``(rows, features)``), so peak memory follows the block size, never the number
of train records; with ``out`` the score matrix is written to a memory-mapped ``.npy`` file
instead of memory. A score is one float32 inner product of two rows, computed the same way
whatever the block size (bit-identical in the tests; a BLAS that changed its summation order
with the matrix width could differ in the last bit).

Top-k runs through FAISS (Johnson et al. 2019, "Billion-scale similarity search with GPUs")
with an exact inner-product index (``IndexFlatIP``) per block, or an inverted-file index
(``IndexIVFFlat``) when the store is larger than ``TopKSettings.approximate_above``; a plain
torch path gives the same results when FAISS is not installed.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harmtrace._logging import get_logger
from harmtrace.attribute.store import FeatureStore
from harmtrace.errors import ArtifactError, ConfigError, MissingExtraError, NumericalError

__all__ = [
    "TopK",
    "TopKBackend",
    "TopKSettings",
    "aggregate_queries",
    "per_token_scores",
    "score_blocks",
    "token_examples",
    "topk",
]

log = get_logger(__name__)

Blocks = Iterable[tuple[Sequence[int], torch.Tensor]]


# -- the score matrix ---------------------------------------------------------------------


def score_blocks(query: torch.Tensor, train: FeatureStore | Blocks, *,
                 out: str | Path | None = None, block_rows: int = 4096,
                 n_train: int | None = None, max_bytes: int = 2 << 30) -> np.ndarray:
    """The score matrix ``(n_query, n_train)``; ``scores[i, j] = <query[i], f_j>``.

    Parameters
    ----------
    query:
        Query features ``(n_query, d)``.
    train:
        A :class:`FeatureStore` (read ``block_rows`` rows at a time) or an iterable of
        ``(rows, features)`` with ``features`` of shape ``(len(rows), d)``, rows in any order,
        each of ``range(n_train)`` exactly once.
    out:
        A ``.npy`` path: the matrix is written there as float32 through a memory map (first
        under a temporary name, renamed only when every score is finite), and returned
        opened read-only. ``None`` keeps it in memory.
    block_rows:
        Train rows per block when reading a store (>= 1).
    n_train:
        Number of train records; required for an iterable, read from a store.
    max_bytes:
        Memory budget (default 2 GiB). An estimate above it raises :class:`ConfigError`
        naming the setting to lower (``block_rows``), before anything is computed.

    Non-finite query or train features, or an overflowing score, raise
    :class:`NumericalError` naming the query or record; a NaN never reaches ``out``.
    """
    q = _as_matrix(query, "query")
    if isinstance(train, FeatureStore):
        n_train = train.n_rows
        _check_dim(train.dim, q.shape[1])
        blocks: Blocks = train.iter_blocks(block_rows)
    elif n_train is None:
        raise ConfigError("score_blocks needs n_train when train is an iterator of blocks")
    else:
        blocks = train
    if block_rows < 1:
        raise ConfigError(f"block_rows must be >= 1, got {block_rows}")
    _check_budget(q.shape, n_train, block_rows, in_memory=out is None, max_bytes=max_bytes)
    _check_finite_rows(q, list(range(q.shape[0])), "query")

    target, tmp = _open_target(out, (q.shape[0], n_train))
    try:
        seen = np.zeros(n_train, dtype=bool)
        for rows, features in blocks:
            rows = np.asarray(list(rows), dtype=np.int64)
            f = _as_matrix(features, "train features")
            _check_dim(f.shape[1], q.shape[1])
            _check_rows(rows, f.shape[0], n_train, seen)
            _check_finite_rows(f, rows, "train record")
            block = q @ f.T  # (n_query, len(rows)) float32
            _check_finite_scores(block, rows)
            _put_columns(target, rows, block)
            del block  # else two blocks live while the next one is computed
        if not seen.all():
            raise ArtifactError(f"train features for record {int(np.flatnonzero(~seen)[0])} "
                                f"never arrived ({int((~seen).sum())} of {n_train} missing); "
                                "the feature source is incomplete")
    except BaseException:
        if tmp is not None:
            del target
            tmp.unlink(missing_ok=True)
        raise
    if tmp is None:
        return target
    target.flush()
    del target
    os.replace(tmp, out)
    log.info("scores (%d x %d) written to %s", q.shape[0], n_train, out)
    return np.load(out, mmap_mode="r")


def _as_matrix(x: Any, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 2:
        raise ConfigError(f"{name} must have shape (rows, d), got {tuple(arr.shape)}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _check_dim(got: int, want: int) -> None:
    if got != want:
        raise ConfigError(f"train features have dimension {got} but the query features {want};"
                          " build both with the same projection settings")


def _check_budget(q_shape: tuple[int, int], n_train: int, block_rows: int, *,
                  in_memory: bool, max_bytes: int) -> None:
    n_query, d = q_shape
    # query + a decoded block and its float32 copy + the block of scores and one temporary
    fixed = 4 * n_query * d + (4 * n_query * n_train if in_memory else 0)
    per_row = 4 * (2 * d + 2 * n_query)
    need = fixed + per_row * min(block_rows, max(n_train, 1))
    if need <= max_bytes:
        return
    if in_memory and 4 * n_query * n_train > max_bytes // 2:
        raise ConfigError(
            f"the score matrix ({n_query} x {n_train}) needs "
            f"{4 * n_query * n_train / 2**30:.2f} GiB, over the budget of "
            f"{max_bytes / 2**30:.2f} GiB; pass out=PATH to stream it to disk")
    fit = (max_bytes - fixed) // per_row
    if fit < 1:
        raise ConfigError(
            f"{n_query} queries of dimension {d} alone exceed the memory budget of "
            f"{max_bytes / 2**30:.2f} GiB; score fewer queries at a time or lower the "
            "projection dimension")
    raise ConfigError(
        f"block_rows = {block_rows} needs about {need / 2**30:.2f} GiB with {n_query} queries "
        f"of dimension {d}, over the budget of {max_bytes / 2**30:.2f} GiB; lower block_rows "
        f"to {int(fit)} or less")


def _check_rows(rows: np.ndarray, n_features: int, n_train: int, seen: np.ndarray) -> None:
    if len(rows) != n_features:
        raise ConfigError(f"a block has {len(rows)} rows but {n_features} feature rows")
    if len(rows) and (rows.min() < 0 or rows.max() >= n_train):
        raise ConfigError(f"train row {int(rows.min() if rows.min() < 0 else rows.max())} is "
                          f"outside [0, {n_train})")
    unique, counts = np.unique(rows, return_counts=True)
    again = np.concatenate([unique[counts > 1], rows[seen[rows]]])
    if len(again):
        raise ConfigError(f"train row {int(again[0])} arrived twice; each record must "
                          "appear in exactly one block")
    seen[rows] = True


def _check_finite_rows(x: np.ndarray, rows: Sequence[int], what: str) -> None:
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise NumericalError(f"the features of {what} {int(rows[int(np.flatnonzero(bad)[0])])} "
                             "are not finite; check that record and the model's weights")


def _check_finite_scores(block: np.ndarray, rows: np.ndarray) -> None:
    if not np.isfinite(block).all():
        i, j = np.argwhere(~np.isfinite(block))[0]
        raise NumericalError(f"the score of query {int(i)} and train record {int(rows[j])} "
                             "overflows float32; rescale the features (e.g. a smaller "
                             "learning-rate weight) or check them for extreme values")


def _open_target(out: str | Path | None, shape: tuple[int, int]):
    if out is None:
        return np.zeros(shape, dtype=np.float32), None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    return np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape), tmp


def _put_columns(target: np.ndarray, rows: np.ndarray, block: np.ndarray) -> None:
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
        target[:, rows[0] : rows[-1] + 1] = block  # contiguous: a plain slice write
    else:
        target[:, rows] = block


# -- top-k --------------------------------------------------------------------------------


class TopKBackend(enum.Enum):
    """How :func:`topk` searches features: FAISS when installed (``AUTO``), or forced."""

    AUTO = "auto"
    FAISS = "faiss"
    TORCH = "torch"


@dataclass(frozen=True)
class TopKSettings:
    """Settings of :func:`topk` over features.

    backend:
        :class:`TopKBackend`; ``AUTO`` uses FAISS when it imports, else torch.
    approximate_above:
        With FAISS, stores of more rows than this (default 2,000,000) use an approximate
        inverted-file index (``IndexIVFFlat``, inner product); below, an exact flat index.
        The IVF index holds every train vector in memory (``n_train * d * 4`` bytes).
    nlist:
        IVF cells (default 1024), trained (k-means) on the first ``train_rows`` rows.
    nprobe:
        Cells visited per query (default 64); ``nprobe = nlist`` is exact.
    train_rows:
        Rows used to train the IVF cells (default 100,000).
    """

    backend: TopKBackend = TopKBackend.AUTO
    approximate_above: int = 2_000_000
    nlist: int = 1024
    nprobe: int = 64
    train_rows: int = 100_000

    def __post_init__(self) -> None:
        if not isinstance(self.backend, TopKBackend):
            object.__setattr__(self, "backend", _backend(self.backend))
        for name in ("approximate_above", "nlist", "nprobe", "train_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TopKSettings.{name} must be >= 1, got "
                                  f"{getattr(self, name)}")


def _backend(value: Any) -> TopKBackend:
    try:
        return TopKBackend(value)
    except ValueError as err:
        raise ConfigError(f"top-k backend {value!r} is unknown; use one of "
                          f"{', '.join(b.value for b in TopKBackend)}") from err


@dataclass(frozen=True)
class TopK:
    """Per query, the ``k`` best train records: ``indices[i, r]`` is the train row ranked
    ``r`` (0 = highest score) for query ``i`` and ``values[i, r]`` its score; both
    ``(n_query, k)``. ``approximate`` is True when an IVF index was used."""

    values: np.ndarray
    indices: np.ndarray
    backend: str
    approximate: bool = False


def topk(source: np.ndarray | FeatureStore | torch.Tensor, k: int, *,
         query: torch.Tensor | None = None, block_rows: int = 4096,
         settings: TopKSettings | None = None) -> TopK:
    """The ``k`` highest-scoring train records of each query.

    ``source`` is a score matrix ``(n_query, n_train)`` (an array or a memory map from
    :func:`score_blocks`, read ``block_rows`` columns at a time), or train features (a
    :class:`FeatureStore` or a tensor ``(n_train, d)``) searched by inner product with
    ``query`` ``(n_query, d)``. Equal scores rank the lower train row first (exact paths).
    """
    settings = settings or TopKSettings()
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be an integer >= 1, got {k!r}")
    if block_rows < 1:
        raise ConfigError(f"block_rows must be >= 1, got {block_rows}")
    if isinstance(source, (FeatureStore, torch.Tensor)):
        if query is None:
            raise ConfigError("topk over train features needs query features (query=...)")
        return _topk_features(_as_matrix(query, "query"), source, k, block_rows, settings)
    if query is not None:
        raise ConfigError("topk got a score matrix and query features; give one of them")
    return _topk_scores(source, k, block_rows)


def _merge(best: tuple[np.ndarray, np.ndarray] | None, values: np.ndarray,
           indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the ``k`` best of two candidate sets, ties to the lower index."""
    if best is not None:
        values = np.concatenate([best[0], values], axis=1)
        indices = np.concatenate([best[1], indices], axis=1)
    order = np.lexsort((indices, -values), axis=1)[:, :k]
    return np.take_along_axis(values, order, 1), np.take_along_axis(indices, order, 1)


def _block_topk(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    # a stable descending sort keeps equal scores in row order, so ties go to the lower row
    t = torch.from_numpy(np.ascontiguousarray(scores))
    order = torch.sort(t, dim=1, descending=True, stable=True).indices[:, :k].numpy()
    return np.take_along_axis(scores, order, 1), rows[order]


def _topk_scores(scores: np.ndarray, k: int, block_rows: int) -> TopK:
    if scores.ndim != 2:
        raise ConfigError(f"scores must have shape (n_query, n_train), got {scores.shape}")
    best = None
    for start in range(0, scores.shape[1], block_rows):
        block = np.asarray(scores[:, start : start + block_rows], dtype=np.float32)
        rows = np.arange(start, start + block.shape[1])
        best = _merge(best, *_block_topk(block, rows, k), k)
    return TopK(values=best[0], indices=best[1], backend="torch")


def _feature_blocks(source: FeatureStore | torch.Tensor, block_rows: int):
    if isinstance(source, FeatureStore):
        for rows, features in source.iter_blocks(block_rows):
            yield np.asarray(rows, dtype=np.int64), _as_matrix(features, "train features")
        return
    feats = _as_matrix(source, "train features")
    for start in range(0, feats.shape[0], block_rows):
        block = feats[start : start + block_rows]
        yield np.arange(start, start + block.shape[0]), block


def _faiss():
    try:
        import faiss
    except ImportError as err:
        raise MissingExtraError("TopKBackend.FAISS needs faiss: pip install faiss-cpu") from err
    return faiss


def _topk_features(q: np.ndarray, source, k: int, block_rows: int,
                   settings: TopKSettings) -> TopK:
    n_train = source.n_rows if isinstance(source, FeatureStore) else source.shape[0]
    backend = settings.backend
    if backend is TopKBackend.AUTO:
        try:
            _faiss()
            backend = TopKBackend.FAISS
        except MissingExtraError:
            backend = TopKBackend.TORCH
    if backend is TopKBackend.FAISS and n_train > settings.approximate_above:
        return _topk_ivf(q, source, k, block_rows, settings)
    faiss = _faiss() if backend is TopKBackend.FAISS else None
    best = None
    for rows, feats in _feature_blocks(source, block_rows):
        _check_dim(feats.shape[1], q.shape[1])
        _check_finite_rows(feats, rows, "train record")
        if faiss is None:
            part = _block_topk(q @ feats.T, rows, k)
        else:
            index = faiss.IndexFlatIP(feats.shape[1])
            index.add(feats)
            values, local = index.search(q, min(k, feats.shape[0]))  # (n_query, k')
            part = (values, rows[local])
        best = _merge(best, *part, k)
    return TopK(values=best[0], indices=best[1], backend=backend.value)


def _topk_ivf(q: np.ndarray, source, k: int, block_rows: int, settings: TopKSettings) -> TopK:
    faiss = _faiss()
    d = q.shape[1]
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, settings.nlist, faiss.METRIC_INNER_PRODUCT)
    sample = []
    for _rows, feats in _feature_blocks(source, block_rows):
        sample.append(feats)
        if sum(len(s) for s in sample) >= settings.train_rows:
            break
    index.train(np.concatenate(sample)[: settings.train_rows])
    for rows, feats in _feature_blocks(source, block_rows):
        _check_finite_rows(feats, rows, "train record")
        index.add_with_ids(feats, rows)
    index.nprobe = min(settings.nprobe, settings.nlist)
    values, indices = index.search(q, k)
    log.info("top-%d over %d rows with IVF (nlist %d, nprobe %d): approximate", k,
             index.ntotal, settings.nlist, index.nprobe)
    return TopK(values=values, indices=indices, backend="faiss-ivf", approximate=True)


# -- aggregation and per-token scores -----------------------------------------------------


def aggregate_queries(scores: np.ndarray, groups: Sequence[str], *,
                      out: str | Path | None = None,
                      block_rows: int = 4096) -> tuple[list[str], np.ndarray]:
    """Mean score over each group's queries (e.g. a behaviour's harmful generations).

    ``scores`` ``(n_query, n_train)``; ``groups[i]`` names query ``i``'s group. Returns the
    sorted group names and ``(n_groups, n_train)`` means (row ``g`` for ``names[g]``, same
    sign as the scores), streamed over ``block_rows`` columns, written to ``out`` if given.
    """
    if len(groups) != scores.shape[0]:
        raise ConfigError(f"groups has {len(groups)} labels for {scores.shape[0]} queries")
    names = sorted(set(groups))
    labels = np.asarray(groups)
    member = np.stack([labels == n for n in names]).astype(np.float64)  # (G, n_query)
    member /= member.sum(axis=1, keepdims=True)
    shape = (len(names), scores.shape[1])
    target, tmp = _open_target(out, shape)
    for start in range(0, shape[1], block_rows):
        block = np.asarray(scores[:, start : start + block_rows], dtype=np.float64)
        target[:, start : start + block.shape[1]] = member @ block
    if tmp is None:
        return names, target
    target.flush()
    del target
    os.replace(tmp, out)
    return names, np.load(out, mmap_mode="r")


def token_examples(example: Any) -> tuple[list[int], list[dict]]:
    """One LM example per target token of ``example``, for per-token scores.

    ``example`` is a token-id list or a dict with ``input_ids`` and optional ``labels``
    (-100 = context), as :class:`~harmtrace.attribute.task.LMTask` takes. Returns the
    positions ``t`` of the target tokens (``t >= 1`` and ``labels[t] != -100``: token 0 is
    never predicted) and, for each, a copy of the example whose only label is token ``t``.

    The loss of a sequence is the sum of its tokens' losses, and both the gradient and the
    projection are linear, so the features of these examples sum to the sequence's
    features and the per-token scores (:func:`per_token_scores`) sum to the sequence score.
    """
    if isinstance(example, dict):
        ids = [int(t) for t in example["input_ids"]]
        labels = [int(t) for t in example.get("labels", ids)]
    else:
        ids = [int(t) for t in example]
        labels = list(ids)
    positions = [t for t in range(1, len(ids)) if labels[t] != -100]
    if not positions:
        raise ConfigError("the query example has no target token (every label after the "
                          "first token is -100); label the tokens to explain")
    copies = []
    for t in positions:
        only = [-100] * len(ids)
        only[t] = labels[t]
        copies.append({"input_ids": list(ids), "labels": only})
    return positions, copies


def per_token_scores(token_features: torch.Tensor, train: FeatureStore | Blocks, *,
                     out: str | Path | None = None, block_rows: int = 4096,
                     n_train: int | None = None, max_bytes: int = 2 << 30) -> np.ndarray:
    """Scores of each target token of one LM query against every train record.

    ``token_features`` ``(n_tokens, d)``: row ``r`` is the projected gradient of the loss of
    target token ``positions[r]`` alone (the examples of :func:`token_examples` fed through
    the same feature extractor as the train records). Returns ``(n_tokens, n_train)``;
    summed over tokens it is the sequence's score row (see :func:`token_examples`).
    """
    return score_blocks(token_features, train, out=out, block_rows=block_rows,
                        n_train=n_train, max_bytes=max_bytes)
