"""Database schema and access: sources, records, dataset versions and models.

``Database(url)`` works the same on a SQLite file and on PostgreSQL. Record ids and dataset
version fingerprints are defined in :mod:`harmtrace.store._values`::

    record_id  = f"{source}-{sha256(text)[:16]}"
    version_id = combine(sha256(record_id), content_hash  for record_id in sorted(ids))
"""

from harmtrace.store._database import Database
from harmtrace.store._values import (
    Checkpoint,
    ModelInfo,
    Record,
    SourceInfo,
    VersionInfo,
    current_user,
    make_record_id,
    utc_now,
    version_fingerprint,
)

__all__ = [
    "Checkpoint",
    "Database",
    "ModelInfo",
    "Record",
    "SourceInfo",
    "VersionInfo",
    "current_user",
    "make_record_id",
    "utc_now",
    "version_fingerprint",
]
