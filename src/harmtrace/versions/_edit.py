"""Record-level edits of a dataset version, and erasure of a record's text.

Every edit makes a child version and is logged: one ledger entry per record edit
(``record-add``, ``record-edit``, ``record-delete``) and one ``dataset-version`` entry with
the child's Merkle root, all in one transaction under the ledger's lock with the records
and the version, so a failure leaves nothing. Entries hold record ids, keys and content
hashes, never text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from harmtrace._logging import get_logger
from harmtrace.errors import ConfigError, InputDataError
from harmtrace.ledger import Ledger
from harmtrace.store import (
    Database,
    Record,
    RecordRef,
    VersionInfo,
    current_user,
    version_fingerprint,
)

__all__ = [
    "EditKind",
    "EditResult",
    "ErasureResult",
    "RecordEdit",
    "edit_version",
    "erase_record",
]

log = get_logger(__name__)

# The lock every ledger writer takes (see Ledger.append).
LEDGER_LOCK = "ledger"


class EditKind(StrEnum):
    """What one record edit does; the ledger stage is ``record-<kind>``."""

    ADD = "add"
    EDIT = "edit"  # replace a record's text; the new record keeps its key
    DELETE = "delete"


@dataclass(frozen=True, kw_only=True)
class RecordEdit:
    """One record edit. Build it with :meth:`add`, :meth:`replace` or :meth:`delete`."""

    kind: EditKind
    record_id: str | None = None  # the record replaced or deleted
    source: str | None = None  # the source a new record is added to
    text: str | None = None  # the new text (add, replace)
    meta: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def add(cls, source: str, text: str, meta: Mapping[str, str] | None = None) -> RecordEdit:
        """Add ``text`` as a new record of the registered source ``source``."""
        return cls(kind=EditKind.ADD, source=source, text=text, meta=dict(meta or {}))

    @classmethod
    def replace(cls, record_id: str, text: str) -> RecordEdit:
        """Replace the text of ``record_id``; the new record keeps its key and meta."""
        return cls(kind=EditKind.EDIT, record_id=record_id, text=text)

    @classmethod
    def delete(cls, record_id: str) -> RecordEdit:
        """Leave ``record_id`` out of the child version (it stays in the store)."""
        return cls(kind=EditKind.DELETE, record_id=record_id)


@dataclass(frozen=True)
class EditResult:
    """The child version an edit made, its size, and the ledger entries it appended.

    ``existing`` is the stored version when the child was already there (an earlier edit,
    or another path, made the same set of records): it is not stored again and keeps its
    first parent, transform and author, but this edit's ledger entries are still appended.
    ``None`` when this edit created the version.
    """

    version_id: str
    parent: str
    n_records: int
    changes: tuple[Mapping[str, Any], ...]
    ledger_seqs: tuple[int, ...]
    existing: VersionInfo | None = None


@dataclass(frozen=True)
class ErasureResult:
    """The erased record, the versions that still list it, and its ledger entry."""

    record_id: str
    content_hash: str
    versions: tuple[str, ...]
    ledger_seq: int


def edit_version(
    db: Database,
    parent: str,
    edits: Sequence[RecordEdit],
    *,
    reason: str,
    actor: str | None = None,
    ledger: Ledger | None = None,
) -> EditResult:
    """Apply ``edits`` to dataset version ``parent`` and store the child version.

    Everything is checked before anything is written: ``parent`` must exist, each replaced
    or deleted record must be in it (and named once), each added record's source must be
    registered, the child must not hold two records with one key, and it must differ from
    the parent (an edit that changes nothing is refused). Then the new records, the child
    version (transform ``"edit"``, args: the edits as ids and hashes plus the reason) and
    the ledger entries are written in one transaction.

    If the child already exists (the same edit was made before, or another path led to the
    same records), it is not stored again; the ledger entries are appended all the same, the
    ``dataset-version`` entry with ``existed: true``, and :attr:`EditResult.existing` holds
    the stored version (who made it, when, from which parent).

    Returns the child's id (its Merkle root) and the ledger seqs appended.
    """
    _require_reason(reason)
    if not edits:
        raise ConfigError("edit_version got no edits; give at least one add, replace or delete")
    actor = actor or current_user()
    refs = {ref.record_id: ref for ref in db.version_refs(parent)}
    plan = _plan(db, parent, refs, edits)

    ledger = ledger or Ledger(db)
    with db.transaction(lock=LEDGER_LOCK):
        existing = (db.get_version(plan.version_id) if db.version_exists(plan.version_id)
                    else None)
        db.add_records([rec for rec in plan.new_records if rec.record_id not in plan.stored])
        version_id = db.create_version(plan.member_ids, transform="edit", parent=parent,
                                       args={"reason": reason, "edits": plan.changes},
                                       created_by=actor)
        seqs = [
            ledger.append(stage=f"record-{change['op']}", actor=actor,
                          settings={"reason": reason, "parent": parent},
                          inputs=_change_inputs(change),
                          outputs={**_change_outputs(change), "version_id": version_id}).seq
            for change in plan.changes
        ]
        seqs.append(ledger.append(
            stage="dataset-version", actor=actor,
            settings={"transform": "edit", "reason": reason},
            inputs={"parent": parent},
            outputs={"version_id": version_id, "merkle_root": version_id, "parent": parent,
                     "transform": "edit", "n_records": len(plan.member_ids),
                     **({"existed": True, "existing_parent": existing.parent,
                         "existing_created_by": existing.created_by,
                         "existing_created_at": existing.created_at} if existing else {})},
        ).seq)
    log.info("edit: %d record edits on %s -> version %s (%d records%s)", len(plan.changes),
             parent[:12], version_id[:12], len(plan.member_ids),
             ", already stored" if existing else "")
    return EditResult(version_id, parent, len(plan.member_ids), tuple(plan.changes),
                      tuple(seqs), existing)


def erase_record(
    db: Database,
    record_id: str,
    *,
    reason: str,
    actor: str | None = None,
    ledger: Ledger | None = None,
) -> ErasureResult:
    """Erase the text of ``record_id`` from the database; keep its content hash and key.

    Every version root and inclusion proof stays valid, since both use only the hash.
    Anything that later needs the record's text (training, data map, report) raises an
    error naming the record; make a version without it with :func:`edit_version`. A
    ``record-erase`` ledger entry holds the reason, the record's id and hash and the
    versions that list it. Files outside the database (artifacts, trained models, reports,
    backups) are not touched.
    """
    _require_reason(reason)
    actor = actor or current_user()
    ledger = ledger or Ledger(db)
    with db.transaction(lock=LEDGER_LOCK):
        before = db.erase_record_text(record_id, erased_by=actor)
        versions = tuple(db.versions_with_record(record_id))
        entry = ledger.append(
            stage="record-erase", actor=actor, settings={"reason": reason},
            inputs={"record_id": record_id, "key": before.key, "source": before.source,
                    "content_hash": before.content_hash},
            outputs={"versions": list(versions)},
        )
    log.info("erased the text of record %s (%d versions list it)", record_id, len(versions))
    return ErasureResult(record_id, before.content_hash, versions, entry.seq)


# -- planning: every check before any write --------------------------------------------


@dataclass
class _Plan:
    version_id: str  # the child's Merkle root
    member_ids: list[str]
    new_records: list[Record]
    stored: set[str]
    changes: list[dict[str, Any]]


def _plan(db: Database, parent: str, refs: dict[str, RecordRef],
          edits: Sequence[RecordEdit]) -> _Plan:
    _check_targets(parent, refs, edits)
    _check_repeated_adds(edits)
    olds = {rec.record_id: rec for rec in db.get_records(
        [e.record_id for e in edits if e.kind is EditKind.EDIT])}
    new_records = _new_records(db, edits, olds)
    stored = db.find_records([rec.record_id for rec in new_records])
    # A text already stored keeps its stored row (and so its key and link).
    new_records = [stored.get(rec.record_id, rec) for rec in new_records]

    removed = {e.record_id for e in edits if e.kind is not EditKind.ADD}
    members = {rid: refs[rid].key for rid in refs if rid not in removed}
    hashes = {rid: refs[rid].content_hash for rid in members}
    for rec, edit in zip(new_records, [e for e in edits if e.kind is not EditKind.DELETE],
                         strict=True):
        _check_new_member(rec, edit, members, olds)
        members[rec.record_id] = rec.key
        hashes[rec.record_id] = rec.content_hash
    _check_unique_keys(members)

    version_id = version_fingerprint(hashes.items())
    if version_id == parent:
        raise InputDataError(_no_change(parent))
    changes = [_change(e, refs, rec) for e, rec in _pair(edits, new_records)]
    return _Plan(version_id, sorted(members), new_records, set(stored), changes)


def _no_change(parent: str) -> str:
    return (f"no change: these edits give back exactly the records of version {parent[:12]}, "
            "so the child would equal the parent; nothing was written. Leave out the edits "
            "that undo each other")


def _check_repeated_adds(edits: Sequence[RecordEdit]) -> None:
    first: dict[tuple[str | None, str | None], int] = {}
    for n, edit in enumerate((e for e in edits if e.kind is EditKind.ADD), start=1):
        where = first.setdefault((edit.source, edit.text), n)
        if where != n:
            raise InputDataError(
                f"added record {n} repeats the text of added record {where} (source "
                f"{edit.source!r}); give each added text once"
            )


def _check_targets(parent: str, refs: dict[str, RecordRef],
                   edits: Sequence[RecordEdit]) -> None:
    seen: set[str] = set()
    for edit in edits:
        if edit.kind is EditKind.ADD:
            continue
        if edit.record_id not in refs:
            raise InputDataError(
                f"record {edit.record_id!r} ({edit.kind.value}) is not in dataset version "
                f"{parent[:12]}; pick a record id of that version (`harmtrace data records "
                f"{parent[:12]}` lists them)"
            )
        if edit.record_id in seen:
            raise ConfigError(
                f"record {edit.record_id!r} is edited more than once; give one replace or "
                "delete per record"
            )
        seen.add(edit.record_id)


def _new_records(db: Database, edits: Sequence[RecordEdit],
                 olds: dict[str, Record]) -> list[Record]:
    sources = {s.name for s in db.get_sources()}
    next_position: dict[str, int] = {}
    new: list[Record] = []
    for edit in edits:
        if edit.kind is EditKind.DELETE:
            continue
        if not isinstance(edit.text, str) or not edit.text.strip():
            raise InputDataError(f"the new text for {_what(edit)} is empty; give some text")
        if edit.kind is EditKind.EDIT:
            old = olds[edit.record_id]
            new.append(Record.create(source=old.source, position=old.position, text=edit.text,
                                     meta=old.meta, key=old.key, supersedes=old.record_id))
            continue
        if edit.source not in sources:
            raise ConfigError(
                f"source {edit.source!r} is not registered; add records only to a source "
                f"that ingest registered ({', '.join(sorted(sources))})"
            )
        if edit.source not in next_position:
            next_position[edit.source] = db.next_position(edit.source)
        new.append(Record.create(source=edit.source, position=next_position[edit.source],
                                 text=edit.text, meta=edit.meta))
        next_position[edit.source] += 1
    return new


def _check_new_member(rec: Record, edit: RecordEdit, members: dict[str, str],
                      olds: dict[str, Record]) -> None:
    if edit.kind is EditKind.EDIT and rec.record_id == edit.record_id:
        raise InputDataError(
            f"no change: the new text for {_what(edit)} is the text it already has, so this "
            "replace changes nothing (alone, the child would equal the parent); nothing was "
            "written. Give a different text, or drop this replace"
        )
    if rec.erased:
        raise InputDataError(
            f"the new text for {_what(edit)} is the text of record {rec.record_id!r}, which "
            "was erased; erased text is not taken back in"
        )
    if rec.record_id in members:
        raise InputDataError(
            f"the new text for {_what(edit)} is already in the version as record "
            f"{rec.record_id!r}; delete that record instead, or change the text"
        )
    if edit.kind is EditKind.EDIT and rec.key != olds[edit.record_id].key:
        raise InputDataError(
            f"the new text for {_what(edit)} is stored as record {rec.record_id!r} under "
            f"another key ({rec.key!r}); delete {edit.record_id!r} and add the text instead"
        )


def _check_unique_keys(members: dict[str, str]) -> None:
    by_key: dict[str, str] = {}
    for rid, key in sorted(members.items()):
        if key in by_key:
            raise InputDataError(
                f"records {by_key[key]!r} and {rid!r} would share key {key!r} in the new "
                f"version; replace {by_key[key]!r} instead of adding {rid!r}"
            )
        by_key[key] = rid


def _pair(edits: Sequence[RecordEdit], new_records: list[Record]):
    made = iter(new_records)
    for edit in edits:
        yield edit, None if edit.kind is EditKind.DELETE else next(made)


def _change(edit: RecordEdit, refs: dict[str, RecordRef], rec: Record | None) -> dict[str, Any]:
    if edit.kind is EditKind.DELETE:
        old = refs[edit.record_id]
        return {"op": "delete", "record_id": old.record_id, "key": old.key,
                "source": old.source, "content_hash": old.content_hash}
    if edit.kind is EditKind.ADD:
        return {"op": "add", "record_id": rec.record_id, "key": rec.key, "source": rec.source,
                "content_hash": rec.content_hash}
    old = refs[edit.record_id]
    return {"op": "edit", "record_id": old.record_id, "key": old.key, "source": old.source,
            "content_hash": old.content_hash, "new_record_id": rec.record_id,
            "new_content_hash": rec.content_hash}


def _change_inputs(change: Mapping[str, Any]) -> dict[str, Any]:
    if change["op"] == "add":
        return {"source": change["source"]}
    return {name: change[name] for name in ("record_id", "key", "source", "content_hash")}


def _change_outputs(change: Mapping[str, Any]) -> dict[str, Any]:
    if change["op"] == "add":
        return {name: change[name] for name in ("record_id", "key", "content_hash")}
    if change["op"] == "edit":
        return {"record_id": change["new_record_id"], "key": change["key"],
                "content_hash": change["new_content_hash"], "supersedes": change["record_id"]}
    return {}


def _what(edit: RecordEdit) -> str:
    if edit.kind is EditKind.ADD:
        return f"a record added to source {edit.source!r}"
    return f"record {edit.record_id!r}"


def _require_reason(reason: str) -> None:
    if not isinstance(reason, str) or not reason.strip():
        raise ConfigError(
            "reason is empty; say why the data changes (e.g. reason='GDPR request 2024-17'), "
            "it is kept in the ledger"
        )
