"""Access to the harmtrace database: sources, records, dataset versions and models.

A database records the schema version that made it (table ``meta``); one made by another
version is refused with an :class:`ArtifactError` that says to start a new workspace.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Table, func, insert, inspect, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from harmtrace._logging import get_logger
from harmtrace.errors import ArtifactError, ConfigError, HarmtraceError, InputDataError
from harmtrace.hashing import canonical_json, sha256_text
from harmtrace.merkle import MemoryTree, inclusion_proof, range_hash
from harmtrace.store import schema as t
from harmtrace.store._engine import SQLITE_BEGIN_OPTION, make_engine
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
    utc_now,
    version_fingerprint,
    version_leaves,
)

__all__ = ["Database"]

log = get_logger(__name__)

# Ids per IN (...) list; well below SQLite's and PostgreSQL's bound-parameter limits.
_CHUNK = 500
_SCHEMA_KEY = "schema_version"
_HEX = re.compile(r"[0-9a-f]+")
# Shortest version-id prefix accepted where a person types one.
MIN_PREFIX = 4


class Database:
    """The harmtrace database at a SQLAlchemy URL (a SQLite file or PostgreSQL).

    Every method runs in one transaction. Inside ``with db.transaction():`` the methods
    join that transaction instead, so several writes commit together or not at all.

    Parameters
    ----------
    url:
        ``sqlite:///PATH`` or ``postgresql+psycopg://USER:PASSWORD@HOST/DB``.
    """

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"Database({self.engine.url.render_as_string(hide_password=True)!r})"

    @property
    def dialect(self) -> str:
        """The back end's name: ``"sqlite"`` or ``"postgresql"``."""
        return self.engine.dialect.name

    def create_all(self) -> None:
        """Create every missing table; existing tables and rows are left as they are.

        Raises :class:`ArtifactError` for a database made by another schema version (see
        :meth:`check_schema`) before creating anything.
        """
        self.check_schema()
        t.metadata.create_all(self.engine)
        row = {"key": _SCHEMA_KEY, "value": str(t.SCHEMA_VERSION)}
        with self.transaction() as conn:
            self._insert_many(conn, t.meta, [row])

    def check_schema(self) -> None:
        """Refuse a database whose tables were made by another version of the schema.

        An empty database passes. One with harmtrace tables but no ``meta`` table predates
        schema versions (version 1). Raises :class:`ArtifactError` naming both versions.
        """
        tables = set(inspect(self.engine).get_table_names())
        if not tables & set(t.metadata.tables):
            return
        found = "1 (no meta table)"
        if t.meta.name in tables:
            query = select(t.meta.c.value).where(t.meta.c.key == _SCHEMA_KEY)
            with self.transaction() as conn:
                value = conn.execute(query).scalar_one_or_none()
            if value is None or value == str(t.SCHEMA_VERSION):
                return
            found = value
        raise ArtifactError(
            f"the database {self!r} was made by another harmtrace (schema version {found}; "
            f"this one needs {t.SCHEMA_VERSION}), so its tables lack columns this version "
            "uses; start a new workspace (another -w folder or database URL) and ingest "
            "there, or open this one with the harmtrace version that made it"
        )

    def dispose(self) -> None:
        """Close the connection pool."""
        self.engine.dispose()

    @contextmanager
    def transaction(self, *, lock: str | None = None) -> Iterator[Connection]:
        """A connection inside one transaction, committed on exit, rolled back on error.

        ``lock`` names a table to serialise writers on: SQLite begins with
        ``BEGIN IMMEDIATE`` (the database-wide write lock, taken at once); PostgreSQL runs
        ``LOCK TABLE <lock> IN EXCLUSIVE MODE`` (readers go on, other writers wait).
        Nested calls in the same thread join the outer transaction.
        """
        outer = getattr(self._local, "conn", None)
        if outer is not None:
            self._check_nested_lock(lock)
            yield outer
            return

        with self.engine.connect() as conn:
            if lock is not None and self.dialect == "sqlite":
                conn.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"})
            self._local.on_commit = []
            with conn.begin():
                if lock is not None and self.dialect == "postgresql":
                    conn.exec_driver_sql(f"LOCK TABLE {lock} IN EXCLUSIVE MODE")
                self._local.conn, self._local.lock = conn, lock
                try:
                    yield conn
                finally:
                    self._local.conn = self._local.lock = None
            callbacks, self._local.on_commit = self._local.on_commit, []
        for callback in callbacks:  # only reached when the commit succeeded
            callback()

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the current transaction commits (at once outside one).

        A transaction that rolls back drops its callbacks. Used to write files that must
        never run ahead of the database, such as the ledger's signed head.
        """
        if getattr(self._local, "conn", None) is None:
            callback()
        else:
            self._local.on_commit.append(callback)

    def _check_nested_lock(self, lock: str | None) -> None:
        if lock is not None and self._local.lock is None:
            raise HarmtraceError(
                f"a write lock on '{lock}' was asked for inside an open transaction begun "
                "without one; call this outside `with db.transaction():`"
            )

    # sources ---------------------------------------------------------------------------

    def add_source(self, info: SourceInfo) -> None:
        """Register a source; re-adding one with the same provenance updates ``n_records``.

        Raises :class:`ConfigError` if the name is taken by a source with another origin,
        licence or description.
        """
        with self.transaction() as conn:
            query = select(t.sources).where(t.sources.c.name == info.name)
            row = conn.execute(query).mappings().first()
            if row is None:
                conn.execute(insert(t.sources), [_source_row(info)])
                return
            _check_same_provenance(_source_from_row(row), info)
            stmt = update(t.sources).where(t.sources.c.name == info.name)
            conn.execute(stmt.values(n_records=info.n_records))

    def get_sources(self) -> list[SourceInfo]:
        """Every registered source, ordered by name."""
        with self.transaction() as conn:
            rows = conn.execute(select(t.sources).order_by(t.sources.c.name)).mappings()
            return [_source_from_row(row) for row in rows]

    # records ---------------------------------------------------------------------------

    def add_records(self, records: Iterable[Record]) -> int:
        """Insert records in one transaction: all of them or, on any error, none.

        A record already stored with the same id and content hash is skipped, so adding the
        same records again is a no-op. Returns the number of records newly inserted.
        """
        unique = _unique_records(records)
        with self.transaction() as conn:
            stored = self._stored_hashes(conn, list(unique))
            _check_no_conflicts(unique, stored)
            new = [_record_row(rec) for rid, rec in unique.items() if rid not in stored]
            if new:
                self._insert_many(conn, t.records, new)
        log.info("added %d new records (%d already stored)", len(new), len(unique) - len(new))
        return len(new)

    def get_records(self, record_ids: Sequence[str]) -> list[Record]:
        """The records with ``record_ids``, in that order; unknown ids raise InputDataError."""
        found: dict[str, Record] = {}
        with self.transaction() as conn:
            for chunk in _chunks(list(dict.fromkeys(record_ids))):
                query = select(t.records).where(t.records.c.record_id.in_(chunk))
                found.update((r.record_id, _record_from_row(r)) for r in conn.execute(query))
        _require_known(record_ids, found)
        return [found[rid] for rid in record_ids]

    def find_records(self, record_ids: Sequence[str]) -> dict[str, Record]:
        """The stored records among ``record_ids``, by id; unknown ids are left out."""
        found: dict[str, Record] = {}
        with self.transaction() as conn:
            for chunk in _chunks(list(dict.fromkeys(record_ids))):
                query = select(t.records).where(t.records.c.record_id.in_(chunk))
                found.update((r.record_id, _record_from_row(r)) for r in conn.execute(query))
        return found

    def versions_with_record(self, record_id: str) -> list[str]:
        """The ids of every dataset version that holds ``record_id``, sorted."""
        link = t.version_records
        query = select(link.c.version_id).where(link.c.record_id == record_id)
        with self.transaction() as conn:
            return sorted(conn.execute(query).scalars())

    # dataset versions ------------------------------------------------------------------

    def create_version(
        self,
        record_ids: Iterable[str],
        *,
        transform: str,
        parent: str | None = None,
        args: dict[str, Any] | None = None,
        created_by: str | None = None,
    ) -> str:
        """Store the dataset version made of ``record_ids`` and return its id (fingerprint).

        The id depends only on the set of records (see :mod:`harmtrace.store._values`), so
        creating a version that exists returns its id and keeps its first transform, parent
        and arguments. All records must already be stored; ``parent`` must exist.
        """
        ids = sorted(set(record_ids))
        if not ids:
            raise ConfigError("create_version got no record ids; a version needs one or more")
        with self.transaction() as conn:
            hashes = self._stored_hashes(conn, ids)
            _require_known(ids, hashes)
            version_id = version_fingerprint(hashes.items())
            if self._has_version(conn, version_id):
                log.info("dataset version %s exists; not created again", version_id[:12])
                return version_id
            self._check_parent(conn, parent)
            row = _version_row(version_id, len(ids), transform, parent, args, created_by)
            self._insert_many(conn, t.dataset_versions, [row])
            links = [{"version_id": version_id, "record_id": rid} for rid in ids]
            self._insert_many(conn, t.version_records, links)
        log.info("created dataset version %s with %d records", version_id[:12], len(ids))
        return version_id

    def version_exists(self, version_id: str) -> bool:
        """Whether a dataset version with this id is stored."""
        with self.transaction() as conn:
            return self._has_version(conn, version_id)

    def get_version(self, version_id: str) -> VersionInfo:
        """The dataset version ``version_id``; ArtifactError if there is none."""
        with self.transaction() as conn:
            query = select(t.dataset_versions).where(
                t.dataset_versions.c.version_id == version_id
            )
            row = conn.execute(query).mappings().first()
        if row is None:
            raise _unknown_version(version_id)
        return _version_from_row(row)

    def list_versions(self) -> list[VersionInfo]:
        """Every dataset version, oldest first."""
        table = t.dataset_versions
        query = select(table).order_by(table.c.created_at, table.c.version_id)
        with self.transaction() as conn:
            return [_version_from_row(row) for row in conn.execute(query).mappings()]

    def version_records(self, version_id: str, *, allow_erased: bool = False) -> list[Record]:
        """The records of a dataset version, ordered by (source, position, record_id).

        Raises :class:`ArtifactError` naming the erased records and the fix if the version
        holds any (their text is gone), unless ``allow_erased``; then they come back with
        ``text = ""`` and ``erased_at`` set.
        """
        rec, link = t.records, t.version_records
        query = (
            select(rec)
            .join(link, link.c.record_id == rec.c.record_id)
            .where(link.c.version_id == version_id)
            .order_by(rec.c.source, rec.c.position, rec.c.record_id)
        )
        with self.transaction() as conn:
            if not self._has_version(conn, version_id):
                raise _unknown_version(version_id)
            records = [_record_from_row(row) for row in conn.execute(query)]
        if not allow_erased:
            _require_not_erased(version_id, records)
        return records

    def version_refs(self, version_id: str) -> list[RecordRef]:
        """The records of a version without their text, in leaf order (record id ascending)."""
        col, link = t.records.c, t.version_records
        query = (
            select(col.record_id, col.key, col.source, col.content_hash,
                   col.erased_at.is_not(None))
            .join(link, link.c.record_id == col.record_id)
            .where(link.c.version_id == version_id)
        )
        with self.transaction() as conn:
            if not self._has_version(conn, version_id):
                raise _unknown_version(version_id)
            refs = [RecordRef(*row) for row in conn.execute(query)]
        # Sorted here, not in SQL: PostgreSQL's collation may order text differently.
        return sorted(refs, key=lambda ref: ref.record_id)

    def version_root(self, version_id: str) -> str:
        """The Merkle root recomputed from the stored rows (membership and content hashes).

        It equals ``version_id`` unless a stored content hash or the version's membership
        was changed after the version was made; the ledger's verify compares the two.
        """
        refs = self.version_refs(version_id)
        return range_hash(version_leaves((r.record_id, r.content_hash) for r in refs)[1]).hex()

    def record_inclusion_proof(self, version_id: str, record_id: str) -> InclusionProof:
        """The RFC 6962 audit path showing ``record_id`` in ``version_id``.

        Built from the stored rows; :meth:`InclusionProof.verify` checks it against the
        version id. Raises :class:`InputDataError` if the record is not in the version.
        """
        refs = self.version_refs(version_id)
        ids, leaves = version_leaves((r.record_id, r.content_hash) for r in refs)
        index = {rid: i for i, rid in enumerate(ids)}.get(record_id)
        if index is None:
            raise InputDataError(
                f"record {record_id!r} is not in dataset version {version_id[:12]}; pick a "
                "record id of that version (`harmtrace data diff` and version_refs() list "
                "them)"
            )
        proof = inclusion_proof(index, len(leaves), MemoryTree(leaves).subtree)
        return InclusionProof(version_id, record_id, refs[index].content_hash, index,
                              len(leaves), tuple(h.hex() for h in proof))

    def resolve_version(self, prefix: str) -> str:
        """The id of the one dataset version whose id starts with ``prefix`` (hex, at least
        4 digits); :class:`ConfigError` if none or several match."""
        table = t.dataset_versions
        return self._resolve(table, table.c.version_id, prefix, "dataset version",
                             "`harmtrace data versions` lists them")

    def resolve_model(self, prefix: str) -> str:
        """The id of the one registered model whose id starts with ``prefix``."""
        return self._resolve(t.models, t.models.c.model_id, prefix, "model",
                             "`harmtrace models list` lists them")

    def _resolve(self, table: Table, column: Any, prefix: str, what: str, hint: str) -> str:
        prefix = prefix.strip().lower()
        if len(prefix) < MIN_PREFIX or not _HEX.fullmatch(prefix):
            raise ConfigError(
                f"{what} id {prefix!r} is not a hex id or prefix of {MIN_PREFIX} or more "
                f"digits; give more of the id ({hint})"
            )
        query = select(column).where(column.startswith(prefix)).limit(5)
        with self.transaction() as conn:
            found = list(conn.execute(query).scalars())
        if len(found) == 1:
            return found[0]
        if not found:
            raise ConfigError(f"no {what} id starts with {prefix!r}; {hint}")
        shown = ", ".join(f[:16] for f in found)
        raise ConfigError(
            f"{what} id prefix {prefix!r} is ambiguous ({shown}, ...); give more digits"
        )

    def next_position(self, source: str) -> int:
        """One past the largest stored position in ``source`` (0 for an empty source)."""
        query = select(func.max(t.records.c.position)).where(t.records.c.source == source)
        with self.transaction() as conn:
            largest = conn.execute(query).scalar_one_or_none()
        return 0 if largest is None else largest + 1

    def erase_record_text(self, record_id: str, *, erased_by: str) -> Record:
        """Remove the stored text of ``record_id``, keeping its content hash and key.

        Returns the record as it was before (with its text, for the caller's checks only).
        On SQLite, ``PRAGMA secure_delete`` (set on every connection) zeroes the freed
        bytes, and after the commit a ``wal_checkpoint(TRUNCATE)`` moves the zeroed page
        into the file and empties the write-ahead log, so the text leaves the files.
        Raises :class:`InputDataError` for an unknown record and :class:`ConfigError` for
        one already erased.
        """
        col = t.records.c
        with self.transaction() as conn:
            row = conn.execute(select(t.records).where(col.record_id == record_id)).first()
            if row is None:
                raise InputDataError(
                    f"record {record_id!r} is not in the store; give the id of a stored "
                    "record (`harmtrace data diff` and `data prove` show record ids)"
                )
            before = _record_from_row(row)
            if before.erased:
                raise ConfigError(
                    f"record {record_id!r} was already erased at {before.erased_at} by "
                    f"{before.erased_by}; nothing to do"
                )
            stmt = update(t.records).where(col.record_id == record_id)
            conn.execute(stmt.values(text=None, erased_at=utc_now(), erased_by=erased_by))
            if self.dialect == "sqlite":
                self.after_commit(self._checkpoint_sqlite)
        return before

    def _checkpoint_sqlite(self) -> None:
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            busy = cursor.fetchone()[0]
            cursor.close()
        finally:
            raw.close()
        if busy:
            log.warning("another connection kept the SQLite write-ahead log open; erased text "
                        "leaves %s at its next checkpoint", self.engine.url.database)

    # models ----------------------------------------------------------------------------

    def register_model(self, info: ModelInfo) -> None:
        """Store a model; re-registering it with new checkpoints replaces its checkpoints.

        Raises :class:`ConfigError` if the dataset version is unknown, or if the model id is
        taken by a model with another dataset version, base model or config.
        """
        with self.transaction() as conn:
            if not self._has_version(conn, info.dataset_version):
                raise ConfigError(
                    f"model '{info.model_id}': dataset_version {info.dataset_version!r} does "
                    "not exist; ingest the data first or pick one from list_versions()"
                )
            old = self._model(conn, info.model_id)
            if old is None:
                conn.execute(insert(t.models), [_model_row(info)])
                return
            _check_same_model(old, info)
            checkpoints = canonical_json([_checkpoint_dict(c) for c in info.checkpoints])
            stmt = update(t.models).where(t.models.c.model_id == info.model_id)
            conn.execute(stmt.values(checkpoints_json=checkpoints))

    def get_model(self, model_id: str) -> ModelInfo:
        """The registered model ``model_id``; ArtifactError if there is none."""
        with self.transaction() as conn:
            model = self._model(conn, model_id)
        if model is None:
            raise ArtifactError(
                f"model {model_id!r} is not registered; train it or register it first "
                "(list_models() shows the registered ones)"
            )
        return model

    def list_models(self) -> list[ModelInfo]:
        """Every registered model, oldest first."""
        query = select(t.models).order_by(t.models.c.created_at, t.models.c.model_id)
        with self.transaction() as conn:
            return [_model_from_row(row) for row in conn.execute(query).mappings()]

    # attribution runs ------------------------------------------------------------------

    def add_attribution_runs(self, runs: Iterable[AttributionRun]) -> None:
        """Store attribution runs; a run id already stored is left as it is."""
        rows = [_run_row(run) for run in runs]
        if rows:
            with self.transaction() as conn:
                self._insert_many(conn, t.attribution_runs, rows)

    def attribution_runs(self, *, model_id: str | None = None) -> list[AttributionRun]:
        """Stored attribution runs (of ``model_id`` if given), oldest first."""
        table = t.attribution_runs
        query = select(table).order_by(table.c.created_at, table.c.method)
        if model_id is not None:
            query = query.where(table.c.model_id == model_id)
        with self.transaction() as conn:
            return [_run_from_row(row) for row in conn.execute(query).mappings()]

    # helpers ---------------------------------------------------------------------------

    def _insert_many(self, conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
        """Bulk insert (executemany) that skips rows whose primary key already exists."""
        if self.dialect == "sqlite":
            stmt = sqlite_insert(table).on_conflict_do_nothing()
        elif self.dialect == "postgresql":
            stmt = pg_insert(table).on_conflict_do_nothing()
        else:
            stmt = insert(table)
        try:
            conn.execute(stmt, rows)
        except IntegrityError as err:
            raise InputDataError(
                f"could not write {len(rows)} rows to table '{table.name}', so nothing was "
                f"written: {err.orig}. Register each record's source with add_source and "
                "each record with add_records before referring to them."
            ) from err

    def _stored_hashes(self, conn: Connection, record_ids: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        col = t.records.c
        for chunk in _chunks(record_ids):
            query = select(col.record_id, col.content_hash).where(col.record_id.in_(chunk))
            found.update(conn.execute(query).tuples().all())
        return found

    def _has_version(self, conn: Connection, version_id: str) -> bool:
        table = t.dataset_versions
        query = select(func.count()).where(table.c.version_id == version_id)
        return bool(conn.execute(query).scalar_one())

    def _check_parent(self, conn: Connection, parent: str | None) -> None:
        if parent is not None and not self._has_version(conn, parent):
            raise ConfigError(
                f"parent dataset version {parent!r} does not exist; pass an id from "
                "list_versions() or parent=None"
            )

    def _model(self, conn: Connection, model_id: str) -> ModelInfo | None:
        query = select(t.models).where(t.models.c.model_id == model_id)
        row = conn.execute(query).mappings().first()
        return None if row is None else _model_from_row(row)


# pure helpers ---------------------------------------------------------------------------


def _chunks(items: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _unique_records(records: Iterable[Record]) -> dict[str, Record]:
    """Records by id after checking each id and hash; an id given twice must agree."""
    unique: dict[str, Record] = {}
    for rec in records:
        content_hash = sha256_text(rec.text)
        if rec.content_hash != content_hash or rec.record_id != make_record_id(
            rec.source, content_hash
        ):
            raise InputDataError(
                f"record {rec.record_id!r} of source '{rec.source}' has a content_hash or "
                "record_id that does not match its text; build records with Record.create"
            )
        unique.setdefault(rec.record_id, rec)
    return unique


def _check_no_conflicts(unique: dict[str, Record], stored: dict[str, str]) -> None:
    for record_id, stored_hash in stored.items():
        if unique[record_id].content_hash != stored_hash:
            raise InputDataError(
                f"record {record_id!r} is stored with content hash {stored_hash[:16]}... but "
                "was given with other text; record ids must be made with Record.create"
            )


def _require_known(wanted: Iterable[str], found: dict[str, Any]) -> None:
    missing = [rid for rid in wanted if rid not in found]
    if missing:
        shown = ", ".join(repr(rid) for rid in missing[:5])
        raise InputDataError(
            f"{len(missing)} record ids are not in the store (first: {shown}); "
            "add the records with add_records (or run ingest) first"
        )


def _require_not_erased(version_id: str, records: list[Record]) -> None:
    erased = [rec for rec in records if rec.erased]
    if not erased:
        return
    first = erased[0]
    shown = ", ".join(rec.record_id for rec in erased[:5])
    raise ArtifactError(
        f"dataset version {version_id[:12]} holds {len(erased)} erased record(s) ({shown}; "
        f"{first.record_id} erased at {first.erased_at} by {first.erased_by}), whose text is "
        "gone; create a version without them with `harmtrace data edit --from "
        f"{version_id[:12]} --delete {first.record_id} --reason ...` and train on it "
        "(set train.dataset_version to its id)"
    )


def _unknown_version(version_id: str) -> ArtifactError:
    return ArtifactError(
        f"dataset version {version_id!r} does not exist; run `harmtrace ingest` or pick an "
        "id from list_versions()"
    )


def _check_same_provenance(old: SourceInfo, new: SourceInfo) -> None:
    for field in ("origin", "licence", "description"):
        if getattr(old, field) != getattr(new, field):
            raise ConfigError(
                f"source '{new.name}' is already registered with {field} "
                f"{getattr(old, field)!r}, not {getattr(new, field)!r}; keep the registered "
                "value or give this source another name"
            )


def _check_same_model(old: ModelInfo, new: ModelInfo) -> None:
    for field in ("dataset_version", "base_model", "config"):
        before, after = getattr(old, field), getattr(new, field)
        if canonical_json(before) != canonical_json(after):
            raise ConfigError(
                f"model '{new.model_id}' is already registered with another {field} "
                f"({before!r}, not {after!r}); register the new model under a new model_id"
            )


def _source_row(info: SourceInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "origin": info.origin,
        "licence": info.licence,
        "added_by": info.added_by,
        "added_at": info.added_at,
        "description": info.description,
        "n_records": info.n_records,
    }


def _source_from_row(row: Any) -> SourceInfo:
    return SourceInfo(**dict(row))


def _record_row(rec: Record) -> dict[str, Any]:
    return {
        "record_id": rec.record_id,
        "source": rec.source,
        "position": rec.position,
        "text": rec.text,
        "content_hash": rec.content_hash,
        "meta_json": canonical_json(dict(rec.meta)),
        "key": rec.key,
        "supersedes": rec.supersedes,
        "erased_at": rec.erased_at,
        "erased_by": rec.erased_by,
    }


def _record_from_row(row: Any) -> Record:
    return Record(
        row.record_id, row.source, row.position, row.text or "", row.content_hash,
        json.loads(row.meta_json), row.key, row.supersedes, row.erased_at, row.erased_by,
    )


def _run_row(run: AttributionRun) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "model_id": run.model_id,
        "dataset_version": run.dataset_version,
        "method": run.method,
        "settings_json": canonical_json(dict(run.settings)),
        "scores_sha256": run.scores_sha256,
        "created_at": run.created_at,
    }


def _run_from_row(row: Any) -> AttributionRun:
    values = dict(row)
    values["settings"] = json.loads(values.pop("settings_json"))
    return AttributionRun(**values)


def _version_row(
    version_id: str,
    n_records: int,
    transform: str,
    parent: str | None,
    args: dict[str, Any] | None,
    created_by: str | None,
) -> dict[str, Any]:
    return {
        "version_id": version_id,
        "parent": parent,
        "created_at": utc_now(),
        "transform": transform,
        "args_json": canonical_json(args or {}),
        "n_records": n_records,
        "created_by": created_by or current_user(),
    }


def _version_from_row(row: Any) -> VersionInfo:
    values = dict(row)
    values["args"] = json.loads(values.pop("args_json"))
    return VersionInfo(**values)


def _checkpoint_dict(checkpoint: Checkpoint) -> dict[str, Any]:
    return {"step": checkpoint.step, "path": checkpoint.path, "sha256": checkpoint.sha256}


def _model_row(info: ModelInfo) -> dict[str, Any]:
    return {
        "model_id": info.model_id,
        "dataset_version": info.dataset_version,
        "base_model": info.base_model,
        "config_json": canonical_json(dict(info.config)),
        "checkpoints_json": canonical_json([_checkpoint_dict(c) for c in info.checkpoints]),
        "created_at": info.created_at,
    }


def _model_from_row(row: Any) -> ModelInfo:
    checkpoints = tuple(Checkpoint(**c) for c in json.loads(row["checkpoints_json"]))
    return ModelInfo(
        model_id=row["model_id"],
        dataset_version=row["dataset_version"],
        base_model=row["base_model"],
        config=json.loads(row["config_json"]),
        checkpoints=checkpoints,
        created_at=row["created_at"],
    )
