"""The database schema, as SQLAlchemy Core tables; identical on SQLite and PostgreSQL.

JSON values are stored as canonical JSON text (``harmtrace.hashing.canonical_json``) and
times as ISO-8601 UTC text, so both back ends hold byte-identical values.

The ``meta`` table holds ``schema_version``: :class:`~harmtrace.store.Database` refuses a
database written by another version of this schema (see :data:`SCHEMA_VERSION`).
"""

from __future__ import annotations

from sqlalchemy import Column, ForeignKey, Integer, MetaData, Table, Text

__all__ = [
    "SCHEMA_VERSION",
    "attribution_runs",
    "dataset_versions",
    "ledger",
    "ledger_heads",
    "ledger_nodes",
    "meta",
    "metadata",
    "models",
    "records",
    "sources",
    "version_records",
]

# 2: records gained key, supersedes and erasure columns (text nullable); the meta,
# attribution_runs, ledger_nodes and ledger_heads tables were added. Databases without a
# meta table are version 1.
SCHEMA_VERSION = 2

metadata = MetaData()

meta = Table(
    "meta",
    metadata,
    Column("key", Text, primary_key=True),
    Column("value", Text, nullable=False),
)

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
    # NULL once the record is erased; content_hash stays, so version roots still verify.
    Column("text", Text, nullable=True),
    Column("content_hash", Text, nullable=False),
    Column("meta_json", Text, nullable=False),
    # The stable logical key: its first record_id; an edit keeps it and links the old row.
    Column("key", Text, nullable=False, index=True),
    Column("supersedes", Text, ForeignKey("records.record_id"), nullable=True),
    Column("erased_at", Text, nullable=True),
    Column("erased_by", Text, nullable=True),
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

attribution_runs = Table(
    "attribution_runs",
    metadata,
    Column("run_id", Text, primary_key=True),
    Column("model_id", Text, ForeignKey("models.model_id"), nullable=False, index=True),
    Column("dataset_version", Text, ForeignKey("dataset_versions.version_id"), nullable=False),
    Column("method", Text, nullable=False),
    Column("settings_json", Text, nullable=False),
    Column("scores_sha256", Text, nullable=False),
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

# The ledger's Merkle tree (RFC 6962): the hash of every perfect subtree, height 0 being the
# leaf hashes. Written with the entry that completes them; proofs read O(log n) of them.
ledger_nodes = Table(
    "ledger_nodes",
    metadata,
    Column("height", Integer, primary_key=True, autoincrement=False),
    Column("idx", Integer, primary_key=True, autoincrement=False),
    Column("hash", Text, nullable=False),
)

# Signed tree heads: the ledger's size and Merkle root after an append, with an Ed25519
# signature by a key kept outside the database ("" when the ledger has no key).
ledger_heads = Table(
    "ledger_heads",
    metadata,
    Column("size", Integer, primary_key=True, autoincrement=False),
    Column("root", Text, nullable=False),
    Column("time", Text, nullable=False),
    Column("key_id", Text, nullable=False),
    Column("signature", Text, nullable=False),
)
