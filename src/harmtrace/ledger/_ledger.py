"""The append-only, verifiable ledger stored in the ``ledger`` table."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, insert, select
from sqlalchemy.exc import IntegrityError

from harmtrace._logging import get_logger
from harmtrace.errors import LedgerError
from harmtrace.hashing import canonical_json
from harmtrace.ledger._chain import (
    GENESIS_HASH,
    Anchor,
    LedgerEntry,
    VerifyReport,
    entry_hash,
    normalise,
    verify_chain,
)
from harmtrace.store import Database, current_user, utc_now
from harmtrace.store import schema as t
from harmtrace.workspace import atomic_write_json

__all__ = ["Ledger"]

log = get_logger(__name__)

_APPEND_ATTEMPTS = 5


class Ledger:
    """An append-only hash chain of stage runs, stored in the database.

    Concurrency: an append reads the head entry and inserts the next one in a single
    transaction that holds a write lock for its whole length. On SQLite the transaction
    starts with ``BEGIN IMMEDIATE`` (sent with ``exec_driver_sql`` from the engine's
    ``begin`` event), which takes the database's write lock before the head is read; other
    appenders wait up to the 30 s busy timeout. On PostgreSQL it runs
    ``LOCK TABLE ledger IN EXCLUSIVE MODE`` first, which blocks other appenders but not
    readers. Should two appenders still pick the same seq (another back end, or a writer
    outside harmtrace), the primary key on ``seq`` rejects the second insert and the append
    is retried up to 5 times.

    Parameters
    ----------
    db:
        The database holding the ``ledger`` table (call ``db.create_all()`` first).
    anchor_path:
        Optional JSON file holding the head ``{"seq", "entry_hash"}``, rewritten atomically
        after each append while the lock is held. Without it, removing the newest entries
        cannot be detected; keep it outside the database (and ideally off the machine).
    """

    def __init__(self, db: Database, *, anchor_path: str | Path | None = None) -> None:
        self.db = db
        self.anchor_path = None if anchor_path is None else Path(anchor_path)

    def append(
        self,
        *,
        stage: str,
        settings: Mapping[str, Any] | None = None,
        inputs: Mapping[str, Any] | None = None,
        outputs: Mapping[str, Any] | None = None,
        actor: str | None = None,
    ) -> LedgerEntry:
        """Append one entry and return it; values must be JSON-serialisable mappings."""
        contents = {
            "time": utc_now(),
            "actor": actor or current_user(),
            "stage": stage,
            "settings": normalise(settings),
            "inputs": normalise(inputs),
            "outputs": normalise(outputs),
        }
        for _attempt in range(_APPEND_ATTEMPTS):
            try:
                entry = self._append_once(contents)
                break
            except IntegrityError as err:
                last_error = err
        else:
            raise LedgerError(
                f"could not append a '{stage}' entry after {_APPEND_ATTEMPTS} attempts: "
                f"another writer kept taking the next seq ({last_error.orig}); retry later"
            ) from last_error
        log.info("ledger entry %d appended (stage %s)", entry.seq, stage)
        return entry

    def entries(self) -> list[LedgerEntry]:
        """Every entry, ordered by seq."""
        with self.db.transaction() as conn:
            rows = _rows(conn)
        return [_entry_from_row(row) for row in rows]

    def head(self) -> LedgerEntry | None:
        """The newest entry, or ``None`` for an empty ledger."""
        with self.db.transaction() as conn:
            row = _head(conn)
        return None if row is None else _entry_from_row(row)

    def verify(self) -> VerifyReport:
        """Check every entry's hash and link, seq continuity and the anchor (if any).

        Reads under the append lock, so the rows and the anchor are seen at one moment.
        """
        with self.db.transaction(lock=t.ledger.name) as conn:
            rows = _rows(conn)
            anchor = self._read_anchor()
        if isinstance(anchor, str):
            return VerifyReport(False, len(rows), None, anchor)
        if anchor is None and self.anchor_path is not None and rows:
            return VerifyReport(
                False, len(rows), None,
                f"anchor file {self.anchor_path} is missing although the ledger has "
                f"{len(rows)} entries; restore it from a backup",
            )
        return verify_chain(rows, anchor)

    def _append_once(self, contents: dict[str, Any]) -> LedgerEntry:
        previous: Anchor | None = None
        anchored = False
        try:
            with self.db.transaction(lock=t.ledger.name) as conn:
                head = _head(conn)
                seq, prev = (head["seq"] + 1, head["entry_hash"]) if head else (1, GENESIS_HASH)
                digest = entry_hash(seq=seq, prev_hash=prev, **contents)
                entry = LedgerEntry(seq=seq, prev_hash=prev, entry_hash=digest, **contents)
                conn.execute(insert(t.ledger), [_entry_row(entry)])
                previous = None if head is None else Anchor(head["seq"], head["entry_hash"])
                anchored = self._write_anchor(Anchor(seq, digest))
        except BaseException:
            if anchored:
                # The commit failed after the anchor moved on; point it back at the old head.
                self._write_anchor(previous or Anchor(0, GENESIS_HASH))
            raise
        return entry

    def _write_anchor(self, anchor: Anchor) -> bool:
        if self.anchor_path is None:
            return False
        atomic_write_json(self.anchor_path, {"seq": anchor.seq, "entry_hash": anchor.entry_hash})
        return True

    def _read_anchor(self) -> Anchor | str | None:
        """The anchor, ``None`` if there is none, or a message saying why it is unreadable."""
        if self.anchor_path is None or not self.anchor_path.exists():
            return None
        try:
            data = json.loads(self.anchor_path.read_text(encoding="utf-8"))
            return Anchor(int(data["seq"]), str(data["entry_hash"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            return (
                f"anchor file {self.anchor_path} cannot be read ({err}); it must hold "
                '{"seq": N, "entry_hash": "..."}; restore it from a backup'
            )


def _rows(conn: Connection) -> list[dict[str, Any]]:
    query = select(t.ledger).order_by(t.ledger.c.seq)
    return [dict(row) for row in conn.execute(query).mappings()]


def _head(conn: Connection) -> dict[str, Any] | None:
    query = select(t.ledger).order_by(t.ledger.c.seq.desc()).limit(1)
    row = conn.execute(query).mappings().first()
    return None if row is None else dict(row)


def _entry_row(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "seq": entry.seq,
        "time": entry.time,
        "actor": entry.actor,
        "stage": entry.stage,
        "settings_json": canonical_json(entry.settings),
        "inputs_json": canonical_json(entry.inputs),
        "outputs_json": canonical_json(entry.outputs),
        "prev_hash": entry.prev_hash,
        "entry_hash": entry.entry_hash,
    }


def _entry_from_row(row: Mapping[str, Any]) -> LedgerEntry:
    return LedgerEntry(
        seq=row["seq"],
        time=row["time"],
        actor=row["actor"],
        stage=row["stage"],
        settings=json.loads(row["settings_json"]),
        inputs=json.loads(row["inputs_json"]),
        outputs=json.loads(row["outputs_json"]),
        prev_hash=row["prev_hash"],
        entry_hash=row["entry_hash"],
    )
