"""The database schema, as SQLAlchemy Core tables; identical on SQLite and PostgreSQL.

JSON values are stored as canonical JSON text (``harmtrace.hashing.canonical_json``) and
times as ISO-8601 UTC text, so both back ends hold byte-identical values.
"""

from __future__ import annotations

from sqlalchemy import Column, ForeignKey, Integer, MetaData, Table, Text

__all__ = [
    "dataset_versions",
    "ledger",
    "metadata",
    "models",
    "records",
    "sources",
    "version_records",
]

metadata = MetaData()

sources = Table(
    "sources",
    metadata,
    Column("name", Text, primary_key=True),
    Column("origin", Text, nullable=False),
    Column("licence", Text, nullable=False),
    Column("added_by", Text, nullable=False),
    Column("added_at", Text, nullable=False),
    Column("description", Text, nullable=False),
    Column("n_records", Integer, nullable=False),
)

records = Table(
    "records",
    metadata,
    Column("record_id", Text, primary_key=True),
    Column("source", Text, ForeignKey("sources.name"), nullable=False, index=True),
    Column("position", Integer, nullable=False),
    Column("text", Text, nullable=False),
    Column("content_hash", Text, nullable=False),
    Column("meta_json", Text, nullable=False),
)

dataset_versions = Table(
    "dataset_versions",
    metadata,
    Column("version_id", Text, primary_key=True),
    Column("parent", Text, ForeignKey("dataset_versions.version_id"), nullable=True),
    Column("created_at", Text, nullable=False),
    Column("transform", Text, nullable=False),
    Column("args_json", Text, nullable=False),
    Column("n_records", Integer, nullable=False),
    Column("created_by", Text, nullable=False),
)

version_records = Table(
    "version_records",
    metadata,
    Column("version_id", Text, ForeignKey("dataset_versions.version_id"), primary_key=True),
    Column("record_id", Text, ForeignKey("records.record_id"), primary_key=True),
)

models = Table(
    "models",
    metadata,
    Column("model_id", Text, primary_key=True),
    Column("dataset_version", Text, ForeignKey("dataset_versions.version_id"), nullable=False),
    Column("base_model", Text, nullable=True),
    Column("config_json", Text, nullable=False),
    Column("checkpoints_json", Text, nullable=False),
    Column("created_at", Text, nullable=False),
)

ledger = Table(
    "ledger",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("time", Text, nullable=False),
    Column("actor", Text, nullable=False),
    Column("stage", Text, nullable=False),
    Column("settings_json", Text, nullable=False),
    Column("inputs_json", Text, nullable=False),
    Column("outputs_json", Text, nullable=False),
    Column("prev_hash", Text, nullable=False),
    Column("entry_hash", Text, nullable=False),
)
