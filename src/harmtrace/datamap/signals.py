"""Per-record signals of the data map, as pure functions of the record texts.

Every signal gives, for each record, a ``score`` (float), a ``flag`` (bool) and a ``detail``
(a short string that never holds record text: a language code, a group hash, recognizer
counts). :class:`Signal` holds the three arrays; the data map stacks them into one long
table ``record_id, source, signal, score, flag, detail``.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from harmtrace.report.redact import find_pii, normalise_text

__all__ = [
    "NearDuplicates",
    "Signal",
    "exact_duplicates",
    "language_signal",
    "length_signal",
    "near_duplicates",
    "normalise_for_hash",
    "pii_signal",
    "presidio_analyzer",
]

_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Signal:
    """``score[i]``, ``flag[i]`` and ``detail[i]`` describe record ``i``."""

    name: str
    score: np.ndarray
    flag: np.ndarray
    detail: list[str]
    info: dict = field(default_factory=dict)  # dataset-level counts for the summary


def normalise_for_hash(text: str) -> str:
    """``text`` lower-cased with runs of whitespace collapsed to one space and ends trimmed."""
    return _SPACE.sub(" ", text.lower()).strip()


def length_signal(texts: Sequence[str], *, min_chars: int, max_chars: int) -> Signal:
    """Score: characters; flag: outside ``[min_chars, max_chars]``; detail: chars and tokens
    (whitespace-separated)."""
    chars = np.array([len(t) for t in texts], dtype=np.float64)
    tokens = [len(t.split()) for t in texts]
    flag = (chars < min_chars) | (chars > max_chars)
    detail = [f"chars={int(c)},tokens={n}" for c, n in zip(chars, tokens, strict=True)]
    return Signal("length", chars, flag, detail, {"tokens_mean": float(np.mean(tokens or [0]))})


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_signal(texts: Sequence[str], *, languages: Sequence[str]) -> Signal:
    """Score: py3langid's probability of its best language; flag: that language is not in
    ``languages``; detail: the language code."""
    identifier = _identifier()
    found = [identifier.classify(t) for t in texts]
    codes = [code for code, _ in found]
    score = np.array([conf for _, conf in found], dtype=np.float64)
    flag = np.array([code not in languages for code in codes], dtype=bool)
    return Signal("language", score, flag, codes, {"languages": dict(Counter(codes))})


def exact_duplicates(texts: Sequence[str]) -> Signal:
    """Score: copies of the record's normalised text (1 = unique); flag: more than one;
    detail: the group id, the first 16 hex digits of the SHA-256 of the normalised text."""
    digests = [hashlib.sha256(normalise_for_hash(t).encode("utf-8")).hexdigest()[:16]
               for t in texts]
    counts = Counter(digests)
    score = np.array([counts[d] for d in digests], dtype=np.float64)
    flag = score > 1
    n_groups = sum(1 for c in counts.values() if c > 1)
    info = {"n_groups": n_groups, "n_duplicate_records": int(flag.sum()),
            "n_redundant": int(flag.sum()) - n_groups}
    return Signal("exact_duplicate", score, flag, digests, info)


def _shingles(text: str, size: int) -> set[bytes]:
    words = normalise_for_hash(text).split()
    if not words:
        return set()
    if len(words) < size:  # a short text is one shingle, so equal short texts still match
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i : i + size]).encode("utf-8") for i in range(len(words) - size + 1)}


@dataclass(frozen=True)
class NearDuplicates:
    """Near-duplicate pairs and their connected components.

    ``best[i]`` is the highest estimated Jaccard similarity of record ``i`` to another
    record among its LSH candidates (0 when it has none); ``component[i]`` numbers the
    connected component of pairs at or above the threshold (-1: no such pair);
    ``pairs`` holds ``(i, j, similarity)`` with ``i < j`` at or above the threshold.
    """

    best: np.ndarray
    component: np.ndarray
    pairs: list[tuple[int, int, float]]


def near_duplicates(texts: Sequence[str], *, threshold: float, num_perm: int, shingle_size: int,
                    seed: int) -> NearDuplicates:
    """MinHash LSH over word shingles of the normalised texts (Broder 1997)."""
    from datasketch import MinHash, MinHashLSH

    shingles = [_shingles(t, shingle_size) for t in texts]
    hashes = MinHash.bulk([sorted(s) for s in shingles], num_perm=num_perm, seed=seed)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    for i, (m, s) in enumerate(zip(hashes, shingles, strict=True)):
        if s:  # an empty text has no shingles and no neighbours
            lsh.insert(i, m)

    best = np.zeros(len(texts))
    pairs: list[tuple[int, int, float]] = []
    for i, (m, s) in enumerate(zip(hashes, shingles, strict=True)):
        if not s:
            continue
        for j in lsh.query(m):
            if j <= i:
                continue
            similarity = float(m.jaccard(hashes[j]))
            best[i] = max(best[i], similarity)
            best[j] = max(best[j], similarity)
            if similarity >= threshold:
                pairs.append((i, j, similarity))
    return NearDuplicates(best, _components(len(texts), pairs), pairs)


def _components(n: int, pairs: list[tuple[int, int, float]]) -> np.ndarray:
    """Connected components of the pair graph (scipy), numbered 0.. in order of first
    record; -1 for records in no pair."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    component = np.full(n, -1, dtype=np.int64)
    if not pairs:
        return component
    rows = np.array([i for i, _, _ in pairs])
    cols = np.array([j for _, j, _ in pairs])
    graph = coo_matrix((np.ones(len(pairs)), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    numbers: dict[int, int] = {}
    for i in sorted(set(rows.tolist()) | set(cols.tolist())):
        component[i] = numbers.setdefault(int(labels[i]), len(numbers))
    return component


def pii_signal(texts: Sequence[str], *, presidio: object | None = None) -> Signal:
    """Score: spans of personal detail (:func:`harmtrace.report.redact.find_pii` on the
    normalised text, plus a Presidio analyzer's findings when given); flag: any; detail:
    spans per recognizer, e.g. ``"user:2,url:1"``."""
    score = np.zeros(len(texts))
    details: list[str] = []
    spans_per_kind: Counter[str] = Counter()
    records_per_kind: Counter[str] = Counter()
    for i, text in enumerate(texts):
        clean = normalise_text(text)
        kinds = [span.kind.value for span in find_pii(clean)]
        if presidio is not None:
            kinds += [f"presidio:{r.entity_type}" for r in presidio.analyze(clean, language="en")]
        counts = Counter(kinds)
        score[i] = len(kinds)
        details.append(",".join(f"{k}:{n}" for k, n in sorted(counts.items())))
        spans_per_kind.update(counts)
        records_per_kind.update(counts.keys())
    info = {"spans": dict(sorted(spans_per_kind.items())),
            "records": dict(sorted(records_per_kind.items()))}
    return Signal("pii", score, score > 0, details, info)


def presidio_analyzer() -> tuple[object | None, str]:
    """A Presidio ``AnalyzerEngine`` when ``presidio_analyzer`` imports and builds, else
    ``None``; and a sentence saying which recognizers the PII signal used.

    Untested here: Presidio is not a dependency of harmtrace.
    """
    try:
        from presidio_analyzer import AnalyzerEngine
    except ImportError:
        return None, "patterns only (presidio_analyzer is not installed)"
    try:
        return AnalyzerEngine(), "patterns plus presidio_analyzer (prefixed 'presidio:')"
    except Exception as err:  # noqa: BLE001 - any failure to build means: patterns only
        return None, f"patterns only (presidio_analyzer did not build: {type(err).__name__})"
