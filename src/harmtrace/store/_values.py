"""Value objects held by the store: records, sources, dataset versions and models.

Identities
----------
record_id
    ``f"{source}-{content_hash[:16]}"``: the source name, a dash and the first 16 hex digits
    of the SHA-256 of the record's UTF-8 text. It is stable: the same text in the same source
    gets the same id on every run, whatever its row position, so re-ingesting a file is a
    no-op and a record keeps its id when its file is reordered.
version fingerprint
    ``harmtrace.hashing.combine`` over, for each record id in ascending string order, the
    SHA-256 of the record id followed by the record's content hash. The same set of records
    gives the same version id whatever order they were listed or inserted in; a duplicated
    id counts once. The record id is hashed alongside the content so that the same text
    under two sources makes two different versions.
"""

from __future__ import annotations

import getpass
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from harmtrace.hashing import combine, sha256_text

__all__ = [
    "Checkpoint",
    "ModelInfo",
    "Record",
    "SourceInfo",
    "VersionInfo",
    "current_user",
    "make_record_id",
    "utc_now",
    "version_fingerprint",
]

RECORD_ID_HASH_CHARS = 16


def utc_now() -> str:
    """Now as ISO-8601 UTC text with microseconds: ``2025-01-31T12:00:00.000001+00:00``."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def current_user() -> str:
    """The login name of the running user, or ``"unknown"`` where the OS cannot tell."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def make_record_id(source: str, content_hash: str) -> str:
    """The stable id of a record: ``f"{source}-{content_hash[:16]}"``."""
    return f"{source}-{content_hash[:RECORD_ID_HASH_CHARS]}"


def version_fingerprint(records: Iterable[tuple[str, str]]) -> str:
    """The dataset version id of ``(record_id, content_hash)`` pairs; see the module docstring."""
    pairs = dict(records)
    return combine(
        digest
        for record_id in sorted(pairs)
        for digest in (sha256_text(record_id), pairs[record_id])
    )


@dataclass(frozen=True)
class Record:
    """One training record.

    ``position`` is the 0-based row (or passage) index within the source file; ``meta`` holds
    the row's other fields as strings. Build new records with :meth:`Record.create`, which
    computes ``content_hash`` and ``record_id``.
    """

    record_id: str
    source: str
    position: int
    text: str
    content_hash: str
    meta: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def create(
        cls, *, source: str, position: int, text: str, meta: Mapping[str, str] | None = None
    ) -> Record:
        """A record whose hash and id are computed from ``source`` and ``text``."""
        content_hash = sha256_text(text)
        record_id = make_record_id(source, content_hash)
        return cls(record_id, source, position, text, content_hash, dict(meta or {}))


@dataclass(frozen=True, kw_only=True)
class SourceInfo:
    """Provenance of one source: where its records came from and under which licence."""

    name: str
    origin: str
    licence: str
    description: str = ""
    n_records: int = 0
    added_by: str = field(default_factory=current_user)
    added_at: str = field(default_factory=utc_now)


@dataclass(frozen=True, kw_only=True)
class VersionInfo:
    """A dataset version: an immutable set of records with the transform that made it."""

    version_id: str
    parent: str | None
    transform: str
    args: Mapping[str, Any]
    n_records: int
    created_by: str
    created_at: str


@dataclass(frozen=True)
class Checkpoint:
    """One saved model checkpoint: training step, file path and the file's SHA-256."""

    step: int
    path: str
    sha256: str


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """A model trained (or fine-tuned) on one dataset version."""

    model_id: str
    dataset_version: str
    base_model: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    checkpoints: tuple[Checkpoint, ...] = ()
    created_at: str = field(default_factory=utc_now)
