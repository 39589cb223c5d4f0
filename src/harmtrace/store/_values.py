"""Value objects held by the store: records, sources, dataset versions and models.

Identities
----------
record_id
    ``f"{source}-{content_hash[:16]}"``: the source name, a dash and the first 16 hex digits
    of the SHA-256 of the record's UTF-8 text. It is stable: the same text in the same source
    gets the same id on every run, whatever its row position, so re-ingesting a file is a
    no-op and a record keeps its id when its file is reordered.
key
    The record's stable logical identity across edits: at ingest ``key = record_id``; an
    edit stores the new text as a new record (new ``record_id``) with the old record's
    ``key`` and ``supersedes = old record_id``.
version id
    The RFC 6962 Merkle root (:mod:`harmtrace.merkle`), as 64 hex digits, of the version's
    records sorted by ``record_id`` (ascending string order), where leaf ``i`` holds the
    UTF-8 bytes of ``f"{record_id}\\n{content_hash}"``. The same set of records gives the same
    id whatever order they were listed or inserted in; a duplicated id counts once. The
    record id is hashed alongside the content so that the same text under two sources makes
    two different versions, and an inclusion proof (``O(log n)`` hashes) shows that one
    record belongs to a version without revealing the others. Erasing a record's text keeps
    its content hash, so the root and every proof stay valid.
"""

from __future__ import annotations

import getpass
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from harmtrace.hashing import sha256_text
from harmtrace.merkle import leaf_hash, range_hash

__all__ = [
    "AttributionRun",
    "Checkpoint",
    "InclusionProof",
    "ModelInfo",
    "Record",
    "RecordRef",
    "SourceInfo",
    "VersionInfo",
    "current_user",
    "make_record_id",
    "record_leaf",
    "utc_now",
    "version_fingerprint",
    "version_leaves",
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


def record_leaf(record_id: str, content_hash: str) -> bytes:
    """The Merkle leaf hash of one record in a version: ``leaf_hash(f"{id}\\n{hash}")``."""
    return leaf_hash(f"{record_id}\n{content_hash}".encode())


def version_leaves(records: Iterable[tuple[str, str]]) -> tuple[list[str], list[bytes]]:
    """The sorted, de-duplicated record ids of ``(record_id, content_hash)`` pairs and their
    leaf hashes, in leaf order."""
    pairs = dict(records)
    ids = sorted(pairs)
    return ids, [record_leaf(rid, pairs[rid]) for rid in ids]


def version_fingerprint(records: Iterable[tuple[str, str]]) -> str:
    """The dataset version id (Merkle root, hex) of ``(record_id, content_hash)`` pairs; see
    the module docstring."""
    return range_hash(version_leaves(records)[1]).hex()


@dataclass(frozen=True)
class Record:
    """One training record.

    ``position`` is the 0-based row (or passage) index within the source file; ``meta`` holds
    the row's other fields as strings. Build new records with :meth:`Record.create`, which
    computes ``content_hash`` and ``record_id``.

    ``key`` (default: the record id) and ``supersedes`` (the record an edit replaced) are
    described in the module docstring. An erased record has ``text = ""`` and ``erased_at``
    / ``erased_by`` set; its ``content_hash`` is the hash of the text it had.
    """

    record_id: str
    source: str
    position: int
    text: str
    content_hash: str
    meta: Mapping[str, str] = field(default_factory=dict)
    key: str = ""
    supersedes: str | None = None
    erased_at: str | None = None
    erased_by: str | None = None

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", self.record_id)

    @property
    def erased(self) -> bool:
        """Whether the record's text was erased (see ``harmtrace data erase``)."""
        return self.erased_at is not None

    @classmethod
    def create(
        cls,
        *,
        source: str,
        position: int,
        text: str,
        meta: Mapping[str, str] | None = None,
        key: str | None = None,
        supersedes: str | None = None,
    ) -> Record:
        """A record whose hash and id are computed from ``source`` and ``text``."""
        content_hash = sha256_text(text)
        record_id = make_record_id(source, content_hash)
        return cls(record_id, source, position, text, content_hash, dict(meta or {}),
                   key or record_id, supersedes)


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
class RecordRef:
    """A record's identity without its text: what version roots, proofs and diffs need."""

    record_id: str
    key: str
    source: str
    content_hash: str
    erased: bool = False


@dataclass(frozen=True)
class InclusionProof:
    """That one record belongs to a version: RFC 6962 audit path of its leaf.

    Check it with ``harmtrace.merkle.verify_inclusion(index, size, record_leaf(record_id,
    content_hash), [bytes.fromhex(h) for h in proof], bytes.fromhex(version_id))``, or with
    :meth:`verify`.
    """

    version_id: str
    record_id: str
    content_hash: str
    index: int
    size: int
    proof: tuple[str, ...]

    def verify(self) -> bool:
        """Whether the proof shows the record in the version whose id is ``version_id``."""
        from harmtrace.merkle import verify_inclusion

        leaf = record_leaf(self.record_id, self.content_hash)
        hashes = [bytes.fromhex(h) for h in self.proof]
        return verify_inclusion(self.index, self.size, leaf, hashes,
                                bytes.fromhex(self.version_id))


@dataclass(frozen=True, kw_only=True)
class AttributionRun:
    """One attribution method run on a model: its settings and the digest of its scores."""

    run_id: str
    model_id: str
    dataset_version: str
    method: str
    settings: Mapping[str, Any]
    scores_sha256: str
    created_at: str = field(default_factory=utc_now)


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
