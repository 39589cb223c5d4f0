"""Database schema and access: sources, records, dataset versions and models.

``Database(url)`` works the same on a SQLite file and on PostgreSQL. Record ids, keys and
dataset version ids are defined in :mod:`harmtrace.store._values`::

    record_id  = f"{source}-{sha256(text)[:16]}"
    version_id = RFC 6962 Merkle root over f"{record_id}\\n{content_hash}", sorted by record_id
"""

from harmtrace.store._database import Database
from harmtrace.store._values import (
    AttributionRun,
    Checkpoint,
    InclusionProof,
    ModelInfo,
    Record,
    RecordRef,
    SourceInfo,
    VersionInfo,
    current_user,
    make_record_id,
    record_leaf,
    utc_now,
    version_fingerprint,
)

__all__ = [
    "AttributionRun",
    "Checkpoint",
    "Database",
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
]
