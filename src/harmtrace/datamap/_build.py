"""Build the data map: every signal per record, a summary per signal, aggregates per group."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd

from harmtrace._logging import get_logger
from harmtrace.datamap._settings import DatamapSettings
from harmtrace.datamap.clusters import Clusters, cluster_records
from harmtrace.datamap.signals import (
    Signal,
    exact_duplicates,
    language_signal,
    length_signal,
    near_duplicates,
    pii_signal,
    presidio_analyzer,
)
from harmtrace.hashing import sha256_json
from harmtrace.report.redact import mask_text

__all__ = ["DATAMAP_FORMAT", "SIGNAL_COLUMNS", "Attribution", "DataMap", "DatamapResult",
           "build_datamap", "suppressed_groups"]

log = get_logger(__name__)

#: Layout version of the datamap artifact; part of its identity, so a new layout recomputes.
DATAMAP_FORMAT = 2
#: Columns of the long signal table, one row per (record, signal).
SIGNAL_COLUMNS = ("record_id", "source", "signal", "score", "flag", "detail")
#: Exemplars per cluster and the characters kept of each (after masking).
N_EXEMPLARS, EXEMPLAR_CHARS = 3, 100

Progress = Callable[[str, int, int], None]


class MapRecord(Protocol):
    record_id: str
    source: str
    text: str


@dataclass(frozen=True)
class Attribution:
    """``scores`` has a ``record_id`` column and one column per method holding each record's
    mean attribution score over queries (positive: made the behaviour more likely); ``k`` is
    the top-k size the attribute stage used."""

    scores: pd.DataFrame
    k: int


@dataclass(frozen=True)
class DataMap:
    """The map: ``signals`` (columns :data:`SIGNAL_COLUMNS`, no text), ``summary`` (per
    signal, duplicates, PII and metadata) and ``aggregates`` (per source, domain and cluster,
    small groups suppressed). ``exemplar_ids`` are the records whose masked text the
    aggregates show."""

    signals: pd.DataFrame
    summary: dict[str, Any]
    aggregates: dict[str, Any]
    exemplar_ids: tuple[str, ...]


def build_datamap(records: Sequence[MapRecord], settings: DatamapSettings, *,
                  scorer: Callable[[Sequence[str]], np.ndarray] | None = None,
                  threshold: float = 0.5,
                  perplexity: Callable[[Sequence[str]], np.ndarray] | None = None,
                  labels: Sequence[int] | None = None, attribution: Attribution | None = None,
                  skipped: dict[str, str] | None = None,
                  progress: Progress | None = None) -> DataMap:
    """Compute the data map of ``records``.

    ``scorer`` maps texts to a harm probability (toxicity signal, flagged at ``threshold``);
    ``perplexity`` maps texts to each record's mean token NLL under the model (perplexity
    signal); ``labels`` (1 = labelled harmful) and ``attribution`` add columns to the
    aggregates. A ``None`` leaves its signal or column out; ``skipped`` names signals left
    out on purpose, with the reason, for the metadata.
    """
    texts = [r.text for r in records]
    skipped = dict(skipped or {})
    analyzer, pii_note = presidio_analyzer()
    step = progress or (lambda *_: None)

    signals = [length_signal(texts, min_chars=settings.min_chars, max_chars=settings.max_chars),
               language_signal(texts, languages=settings.languages)]
    step("data map", 1, 6)
    exact = exact_duplicates(texts)
    signals += [exact, _near_signal(records, exact, settings)]
    step("data map", 2, 6)
    signals.append(pii_signal(texts, presidio=analyzer))
    if scorer is not None:
        score = np.asarray(scorer(texts), dtype=np.float64)
        signals.append(Signal("toxicity", score, score >= threshold, [""] * len(texts)))
    if perplexity is not None:
        signals.append(_perplexity_signal(perplexity(texts), settings.perplexity_quantile))
    step("data map", 3, 6)
    clusters = cluster_records(texts, n_clusters=settings.n_clusters,
                               embedding=settings.embedding, seed=settings.seed,
                               progress=progress)
    signals.append(Signal("cluster", clusters.distance, np.zeros(len(texts), dtype=bool),
                          [str(c) for c in clusters.label]))
    step("data map", 5, 6)

    metadata = {"n_records": len(texts), "embedding": clusters.embedding,
                "embedding_reason": clusters.reason, "pii_recognizers": pii_note,
                "skipped": skipped, "toxicity_threshold": threshold if scorer else None,
                "min_group_size": settings.min_group_size,
                "cluster_flag": "never set: the cluster signal only records membership",
                "n_clusters": len(clusters.names)}
    if len(clusters.names) < settings.n_clusters:
        metadata["n_clusters_note"] = (
            f"datamap.n_clusters = {settings.n_clusters} but there are only {len(texts)} "
            f"records: {len(clusters.names)} clusters were made")
        log.info("data map: %s", metadata["n_clusters_note"])
    summary = _summary(signals, metadata, labels)
    aggregates, shown = _aggregates(records, signals, clusters, settings, labels, attribution)
    step("data map", 6, 6)
    return DataMap(_long_table(records, signals), summary, aggregates, shown)


def _near_signal(records: Sequence[MapRecord], exact: Signal,
                 settings: DatamapSettings) -> Signal:
    found = near_duplicates([r.text for r in records],
                            threshold=settings.near_duplicate_threshold,
                            num_perm=settings.num_perm, shingle_size=settings.shingle_size,
                            seed=settings.seed)
    members: dict[int, list[str]] = {}
    for i, c in enumerate(found.component):
        if c >= 0:
            members.setdefault(int(c), []).append(records[i].record_id)
    group = {c: "nd-" + sha256_json(sorted(ids))[:16] for c, ids in members.items()}
    detail = [group.get(int(c), "") for c in found.component]

    # near-only: a pair whose normalised texts differ (the exact signal does not see it)
    near_only = [(i, j) for i, j, _ in found.pairs if exact.detail[i] != exact.detail[j]]
    near_only_records = {i for pair in near_only for i in pair}
    flag = found.best >= settings.near_duplicate_threshold
    info = {"n_pairs": len(found.pairs), "n_near_only_pairs": len(near_only),
            "n_duplicate_records": int(flag.sum()),
            "n_near_only_records": len(near_only_records),
            "n_groups": len(members), "threshold": settings.near_duplicate_threshold}
    return Signal("near_duplicate", found.best, flag, detail, info)


def _perplexity_signal(nll: np.ndarray, quantile: float) -> Signal:
    score = np.exp(np.asarray(nll, dtype=np.float64))
    cut = float(np.nanquantile(score, quantile)) if np.isfinite(score).any() else np.inf
    flag = np.nan_to_num(score, nan=-np.inf) > cut
    return Signal("perplexity", score, flag, [""] * len(score),
                  {"quantile": quantile, "cut": cut})


def _long_table(records: Sequence[MapRecord], signals: list[Signal]) -> pd.DataFrame:
    n = len(records)
    ids = [r.record_id for r in records]
    sources = [r.source for r in records]
    frames = [pd.DataFrame({"record_id": ids, "source": sources, "signal": [s.name] * n,
                            "score": s.score.astype(np.float64), "flag": s.flag.astype(bool),
                            "detail": s.detail})
              for s in signals]
    return pd.concat(frames, ignore_index=True)[list(SIGNAL_COLUMNS)]


def _stats(signal: Signal) -> dict[str, Any]:
    finite = signal.score[np.isfinite(signal.score)]
    n_flagged = int(signal.flag.sum())
    return {"n_records": len(signal.score), "n_flagged": n_flagged,
            "flag_rate": n_flagged / max(len(signal.score), 1),
            "score_mean": float(finite.mean()) if len(finite) else None,
            "score_median": float(np.median(finite)) if len(finite) else None,
            "score_p95": float(np.quantile(finite, 0.95)) if len(finite) else None,
            **signal.info}


def _summary(signals: list[Signal], metadata: dict, labels: Sequence[int] | None) -> dict:
    by_name = {s.name: s for s in signals}
    summary: dict[str, Any] = {
        "signals": {s.name: _stats(s) for s in signals},
        "duplicates": {"exact": by_name["exact_duplicate"].info,
                       "near": by_name["near_duplicate"].info},
        "pii": by_name["pii"].info,
        "metadata": metadata,
    }
    if labels is not None:
        summary["labels"] = {"n_labelled": int(np.sum(labels)),
                             "base_rate": float(np.mean(labels)) if len(labels) else 0.0}
    return summary


def _aggregates(records: Sequence[MapRecord], signals: list[Signal], clusters: Clusters,
                settings: DatamapSettings, labels: Sequence[int] | None,
                attribution: Attribution | None) -> tuple[dict, tuple[str, ...]]:
    ids = [r.record_id for r in records]
    keys = {"source": [r.source for r in records],
            "domain": [settings.domain_of(r.source) for r in records],
            "cluster": [int(c) for c in clusters.label]}
    attr = _attribution_columns(ids, attribution) if attribution is not None else None
    label_arr = None if labels is None else np.asarray(labels, dtype=np.float64)
    out: dict[str, Any] = {}
    shown: list[str] = []
    for kind, key in keys.items():
        groups = []
        members = {value: np.flatnonzero(np.asarray(key, dtype=object) == value)
                   for value in sorted(set(key))}
        primary, hidden = suppressed_groups({v: len(i) for v, i in members.items()},
                                            settings.min_group_size)
        for value, index in members.items():
            if value in hidden:
                continue  # its name, counts and exemplars are all left out
            row = _group_row(index, signals, label_arr, attr)
            if kind == "cluster":
                exemplars = _exemplars(index, records, clusters.distance)
                row = {"cluster": value, "name": clusters.names[value], **row,
                       "exemplars": exemplars}
                shown += [e["record_id"] for e in exemplars]
            else:
                row = {kind: value, **row}
            groups.append(row)
        groups.sort(key=lambda g: -g["n_records"])
        out[kind] = {"groups": groups, "suppressed": {
            "n_groups": len(hidden), "n_primary": len(primary),
            "n_secondary": len(hidden) - len(primary),
            "n_records": int(sum(len(members[v]) for v in hidden)),
            "secondary": len(hidden) > len(primary),
            "label": f"suppressed (n < {settings.min_group_size})"}}
    if attribution is not None:
        out["attribution"] = {"k": attribution.k, "methods": sorted(attr["top"]),
                              "normalisation": "z-score of each method's mean record scores"}
    return out, tuple(shown)


def suppressed_groups(sizes: dict[Any, int], min_group_size: int) -> tuple[set, set]:
    """The groups to leave out of a table of groups of one kind: ``(primary, all)``.

    Primary: every group with fewer than ``min_group_size`` records. Since the totals are
    shown too, the suppressed groups together must also hold at least ``min_group_size``
    records, or subtracting the visible rows from the totals would reveal them; so while they
    hold fewer, the smallest visible group (ties by name) is suppressed as well (secondary,
    or complementary, suppression), until they do or every group is suppressed.
    """
    primary = {v for v, n in sizes.items() if n < min_group_size}
    hidden = set(primary)
    visible = sorted((v for v in sizes if v not in hidden), key=lambda v: (sizes[v], str(v)))
    while hidden and visible and sum(sizes[v] for v in hidden) < min_group_size:
        hidden.add(visible.pop(0))
    return primary, hidden


def _group_row(index: np.ndarray, signals: list[Signal], labels: np.ndarray | None,
               attr: dict | None) -> dict[str, Any]:
    row: dict[str, Any] = {"n_records": len(index), "signals": {}}
    for s in signals:
        if s.name == "cluster":
            continue
        scores = s.score[index]
        finite = scores[np.isfinite(scores)]
        row["signals"][s.name] = {"flag_rate": float(s.flag[index].mean()),
                                  "mean_score": float(finite.mean()) if len(finite) else None}
    if labels is not None:
        row["labelled_share"] = float(labels[index].mean())
    if attr is not None:
        row["attribution"] = {
            m: {"topk_share": float(attr["top"][m][index].sum() / max(attr["k"], 1)),
                "mean_normalised_score": float(np.nanmean(attr["z"][m][index]))
                if np.isfinite(attr["z"][m][index]).any() else None}
            for m in attr["top"]}
    return row


def _attribution_columns(ids: list[str], attribution: Attribution) -> dict:
    """Per method: whether each record is in the top k, and its z-scored mean score."""
    frame = attribution.scores.set_index("record_id").reindex(ids)
    methods = [c for c in frame.columns if c != "source"]
    top, z = {}, {}
    for m in methods:
        score = frame[m].to_numpy(dtype=np.float64)
        filled = np.nan_to_num(score, nan=-np.inf)
        order = np.lexsort((np.arange(len(score)), -filled))  # ties by index, as top_k
        in_top = np.zeros(len(score), dtype=bool)
        in_top[order[: attribution.k]] = True
        top[m] = in_top
        std = np.nanstd(score)
        z[m] = (score - np.nanmean(score)) / (std if std > 0 else 1.0)
    return {"top": top, "z": z, "k": attribution.k}


def _exemplars(index: np.ndarray, records: Sequence[MapRecord], distance: np.ndarray
               ) -> list[dict[str, str]]:
    """The records nearest the cluster centre, masked and cut to :data:`EXEMPLAR_CHARS`."""
    nearest = index[np.argsort(distance[index], kind="stable")[:N_EXEMPLARS]]
    out = []
    for i in nearest:
        text = mask_text(records[i].text)
        if len(text) > EXEMPLAR_CHARS:
            text = text[: EXEMPLAR_CHARS - 1] + "…"
        out.append({"record_id": records[i].record_id, "text": text})
    return out


@dataclass(frozen=True)
class DatamapResult:
    """What the datamap stage returns: the artifact's ``summary`` and ``aggregates``, its
    ``folder``, and ``disclosed`` (record id -> raw text) only when raw text was asked for
    and its disclosure was written to the ledger."""

    summary: dict[str, Any]
    aggregates: dict[str, Any]
    folder: Any
    disclosed: dict[str, str] | None = None
