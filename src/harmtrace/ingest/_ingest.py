"""The ingest stage: read sources, store their records as one dataset version, log it."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any

from harmtrace._logging import get_logger
from harmtrace.errors import ConfigError
from harmtrace.hashing import sha256_file
from harmtrace.ingest._readers import read_source
from harmtrace.ingest._spec import SourceSpec
from harmtrace.ledger import Ledger
from harmtrace.store import Database, SourceInfo, current_user

__all__ = ["IngestResult", "ingest"]

log = get_logger(__name__)


@dataclass(frozen=True)
class IngestResult:
    """What ingest stored: the dataset version, its size, records per source, ledger seq."""

    version_id: str
    n_records: int
    per_source: Mapping[str, int]
    ledger_seq: int


def ingest(
    db: Database,
    specs: Iterable[SourceSpec],
    *,
    actor: str | None = None,
    ledger: Ledger | None = None,
) -> IngestResult:
    """Ingest ``specs`` into ``db`` as one dataset version (transform ``"ingest"``).

    Every source is read and checked before anything is written; then the sources, their
    records, the version and a ledger entry (stage ``"ingest"``; inputs: each file's
    SHA-256; outputs: the version id, i.e. its Merkle root) are written in one transaction
    under the ledger's lock, so a bad source leaves the database and the ledger untouched.
    Ingesting the same files again stores nothing new and returns the same version id (and
    appends another entry). ``ledger`` defaults to ``Ledger(db)``, with no anchor.
    """
    started = time.perf_counter()
    specs = _check_specs(specs)
    read = {spec.name: read_source(spec) for spec in specs}
    file_hashes = {spec.name: sha256_file(spec.path) for spec in specs}
    actor = actor or current_user()
    settings = {spec.name: _settings(spec) for spec in specs}

    db.create_all()
    per_source = {name: len(recs) for name, recs in read.items()}
    records = list(chain.from_iterable(read.values()))
    # One transaction under the ledger's lock: the records, the version and the ledger
    # entry commit together or not at all.
    with db.transaction(lock="ledger"):
        for spec in specs:
            db.add_source(_source_info(spec, len(read[spec.name])))
        db.add_records(records)
        version_id = db.create_version(
            [rec.record_id for rec in records],
            transform="ingest",
            args={"sources": settings, "file_sha256": file_hashes},
            created_by=actor,
        )
        entry = (ledger or Ledger(db)).append(
            actor=actor,
            stage="ingest",
            settings={"sources": settings},
            inputs={
                spec.name: {"path": str(spec.path), "sha256": file_hashes[spec.name]}
                for spec in specs
            },
            outputs={"version_id": version_id, "n_records": len(records),
                     "per_source": per_source},
        )
    log.info("ingest: %d records from %d sources -> version %s in %.1f s",
             len(records), len(specs), version_id[:12], time.perf_counter() - started)
    return IngestResult(version_id, len(records), per_source, entry.seq)


def _check_specs(specs: Iterable[SourceSpec]) -> list[SourceSpec]:
    specs = list(specs)
    if not specs:
        raise ConfigError("ingest got no sources; give at least one SourceSpec")
    names = [spec.name for spec in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(
            f"source names must be unique, but {', '.join(repeated)} is given more than once; "
            "rename one of them"
        )
    return specs


def _settings(spec: SourceSpec) -> dict[str, Any]:
    return {
        "format": spec.format.value,
        "text_field": spec.text_field,
        "max_records": spec.max_records,
        "on_duplicate": spec.on_duplicate.value,
        "passage_lines": spec.passage_lines,
    }


def _source_info(spec: SourceSpec, n_records: int) -> SourceInfo:
    return SourceInfo(
        name=spec.name,
        origin=spec.origin,
        licence=spec.licence,
        description=spec.description,
        n_records=n_records,
        added_by=spec.added_by,
    )


