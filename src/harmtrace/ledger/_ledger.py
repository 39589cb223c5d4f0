"""The append-only ledger stored in the database: entries, Merkle nodes and signed heads."""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, and_, insert, or_, select
from sqlalchemy.exc import IntegrityError

from harmtrace._logging import get_logger
from harmtrace.errors import LedgerError
from harmtrace.hashing import canonical_json, sha256_text
from harmtrace.ledger._chain import (
    GENESIS_HASH,
    LedgerEntry,
    VerifyReport,
    entry_hash,
    normalise,
)
from harmtrace.ledger._signing import KEY_ENV, LedgerKey, PublicKey, TreeHead
from harmtrace.ledger._verify import entry_leaf, verify_log
from harmtrace.merkle import (
    consistency_proof,
    inclusion_proof,
    node_hash,
    push_frontier,
    root_from_frontier,
    split_point,
)
from harmtrace.store import Database, current_user, utc_now, version_fingerprint
from harmtrace.store import schema as t
from harmtrace.workspace import atomic_write_json

__all__ = ["Ledger"]

log = get_logger(__name__)

_APPEND_ATTEMPTS = 5
_CHUNK = 500


class Ledger:
    """An append-only log of stage runs: a hash chain inside an RFC 6962 Merkle tree.

    Every append writes, in one transaction, the entry, the Merkle nodes it completes and a
    tree head (size, root) signed with ``key``; after the commit the head is also written to
    ``head_path``, a file outside the database. So a crash leaves the entry whole or absent,
    and removing the newest entries from the database is caught by the head file.

    Concurrency: an append reads the head and inserts the next entry in one transaction
    holding a write lock (SQLite ``BEGIN IMMEDIATE``; PostgreSQL ``LOCK TABLE ledger IN
    EXCLUSIVE MODE``), so appenders in several processes form one order. Should two still
    pick the same seq (a writer outside harmtrace), the primary key refuses the second and
    the append is retried up to 5 times. Called inside ``with db.transaction(lock="ledger")``
    an append joins that transaction and commits with the caller's writes.

    Parameters
    ----------
    db:
        The database (call ``db.create_all()`` first).
    key:
        Signs tree heads. ``None`` stores unsigned heads; verifying them with a key fails.
    head_path:
        JSON file that receives the newest signed head after each commit; keep it outside
        the database (and ideally a copy off the machine).
    public_key:
        The key ``verify`` trusts; default ``key``'s public half.
    """

    def __init__(
        self,
        db: Database,
        *,
        key: LedgerKey | None = None,
        head_path: str | Path | None = None,
        public_key: PublicKey | None = None,
    ) -> None:
        self.db = db
        self.key = key
        self.head_path = None if head_path is None else Path(head_path)
        self.public_key = public_key or (key.public if key else None)

    @classmethod
    def for_workspace(
        cls, db: Database, root: str | Path, *, public_key: PublicKey | None = None,
        read_only: bool = False,
    ) -> Ledger:
        """The ledger of the workspace at ``root``.

        Its key is ``root/keys/ledger-ed25519.pem`` (or ``$HARMTRACE_LEDGER_KEY``), created
        on first use, and its head file ``root/ledger-head.json``. With ``read_only`` no key
        is created or loaded: ``verify`` trusts ``public_key``, else the ``.pub`` file beside the
        key path, else nothing (``public_key`` is then ``None``).
        """
        root = Path(root)
        key_path = Path(os.environ.get(KEY_ENV) or root / "keys" / "ledger-ed25519.pem")
        head_path = root / "ledger-head.json"
        if not read_only:
            if not key_path.exists() and (key_path.with_suffix(".pub").exists()
                                          or head_path.exists()):
                raise LedgerError(
                    f"the ledger's private key {key_path} is missing although the ledger was "
                    f"signed with it; restore it from a backup or set {KEY_ENV} to its path "
                    "(a new key would not match the signed heads)"
                )
            key = LedgerKey.load_or_create(key_path)
            return cls(db, key=key, head_path=head_path, public_key=public_key)
        pub = key_path.with_suffix(".pub")
        if public_key is None and pub.exists():
            public_key = PublicKey.load(pub)
        return cls(db, head_path=head_path, public_key=public_key)

    # -- writing -----------------------------------------------------------------------------

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
        actor = actor or current_user()
        _check_printable(actor, "actor")
        _check_printable(stage, "stage")
        contents = {
            "time": utc_now(),
            "actor": actor,
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

    def _append_once(self, contents: dict[str, Any]) -> LedgerEntry:
        with self.db.transaction(lock=t.ledger.name) as conn:
            head = _head_row(conn)
            if head is not None:
                self._check_signer(_tree_head(conn, None))
            seq, prev = (head["seq"] + 1, head["entry_hash"]) if head else (1, GENESIS_HASH)
            digest = entry_hash(seq=seq, prev_hash=prev, **contents)
            entry = LedgerEntry(seq=seq, prev_hash=prev, entry_hash=digest, **contents)

            frontier = _frontier(conn, seq - 1)
            new_frontier, completed = push_frontier(frontier, entry_leaf(digest))
            root = root_from_frontier(new_frontier).hex()
            tree_head = self._sign(seq, root, contents["time"])

            conn.execute(insert(t.ledger), [_entry_row(entry)])
            conn.execute(insert(t.ledger_nodes), [
                {"height": h, "idx": (seq >> h) - 1, "hash": value.hex()}
                for h, value in completed
            ])
            conn.execute(insert(t.ledger_heads), [tree_head.as_dict()])
            self.db.after_commit(lambda: self._write_head_file(tree_head))
        return entry

    def _check_signer(self, newest: TreeHead) -> None:
        """Refuse to extend a log whose newest head another key (or no key) signed."""
        mine = self.key.public.key_id if self.key else ""
        if newest.key_id == mine:
            return
        signed_by = f"key {newest.key_id}" if newest.key_id else "no key"
        using = f"key {mine}" if mine else "no key"
        where = f" ({self.key.path})" if self.key and self.key.path else ""
        raise LedgerError(
            f"the ledger's newest head is signed by {signed_by} but this append uses {using}"
            f"{where}; restore the ledger's key file (or point {KEY_ENV} at it) instead of "
            "making a new one"
        )

    def _sign(self, size: int, root: str, time: str) -> TreeHead:
        if self.key is None:
            return TreeHead(size, root, time, "", "")
        return self.key.sign(size, root, time)

    def _write_head_file(self, head: TreeHead) -> None:
        if self.head_path is None:
            return
        # Another process may have committed a later head meanwhile; never move backwards.
        current = _read_head_file(self.head_path)
        if isinstance(current, TreeHead) and current.size >= head.size:
            return
        atomic_write_json(self.head_path, head.as_dict())

    # -- reading -----------------------------------------------------------------------------

    def entries(self) -> list[LedgerEntry]:
        """Every entry, ordered by seq."""
        with self.db.transaction() as conn:
            rows = _rows(conn)
        return [_entry_from_row(row) for row in rows]

    def entry(self, seq: int) -> LedgerEntry:
        """The entry ``seq``; LedgerError if there is none."""
        with self.db.transaction() as conn:
            row = conn.execute(select(t.ledger).where(t.ledger.c.seq == seq)).mappings().first()
            size = _size(conn)
        if row is None:
            raise LedgerError(f"the ledger has no entry {seq}; it holds entries 1 to {size}")
        return _entry_from_row(row)

    def head(self) -> LedgerEntry | None:
        """The newest entry, or ``None`` for an empty ledger."""
        with self.db.transaction() as conn:
            row = _head_row(conn)
        return None if row is None else _entry_from_row(row)

    def tree_head(self, size: int | None = None) -> TreeHead:
        """The signed head for ``size`` entries (default the newest)."""
        with self.db.transaction() as conn:
            return _tree_head(conn, size)

    # -- proofs ------------------------------------------------------------------------------

    def prove(self, seq: int, size: int | None = None) -> dict[str, Any]:
        """An inclusion proof that entry ``seq`` is in the log of ``size`` entries.

        Returns a JSON-ready dict with the entry, its leaf hash, the audit path (hex, leaf to
        root) and the signed head it leads to; :func:`harmtrace.ledger.check_proof` checks
        it offline.
        """
        with self.db.transaction() as conn:
            head = _tree_head(conn, size)
            if not 1 <= seq <= head.size:
                raise LedgerError(
                    f"entry {seq} is not in a log of {head.size} entries; pick 1..{head.size}"
                )
            row = conn.execute(select(t.ledger).where(t.ledger.c.seq == seq)).mappings().one()
            path = inclusion_proof(seq - 1, head.size, _StoredNodes(conn).subtree)
        return {
            "kind": "inclusion",
            "entry": _entry_dict(_entry_from_row(row)),
            "leaf_hash": entry_leaf(row["entry_hash"]).hex(),
            "index": seq - 1,
            "tree_size": head.size,
            "proof": [h.hex() for h in path],
            "head": head.as_dict(),
        }

    def consistency(self, old_size: int, size: int | None = None) -> dict[str, Any]:
        """A consistency proof that the log of ``old_size`` entries is a prefix of ``size``."""
        with self.db.transaction() as conn:
            new = _tree_head(conn, size)
            old = _tree_head(conn, old_size)
            if old.size > new.size:
                raise LedgerError(
                    f"OLD ({old.size}) must not exceed NEW ({new.size}) for a consistency proof"
                )
            path = consistency_proof(old.size, new.size, _StoredNodes(conn).subtree)
        return {"kind": "consistency", "old_head": old.as_dict(), "head": new.as_dict(),
                "proof": [h.hex() for h in path]}

    # -- verifying ---------------------------------------------------------------------------

    def verify(self, *, check_data: bool = True) -> VerifyReport:
        """Check the whole log; see :mod:`harmtrace.ledger._verify` for every check.

        Reads under the append lock so entries, nodes and heads are seen at one moment;
        ``check_data`` also recomputes every named dataset version from stored records.
        """
        with self.db.transaction(lock=t.ledger.name) as conn:
            rows = _rows(conn)
            heads = [_head_from_row(r) for r in conn.execute(
                select(t.ledger_heads).order_by(t.ledger_heads.c.size)).mappings()]
            nodes = {(r.height, r.idx): r.hash for r in conn.execute(select(t.ledger_nodes))}
            outside = _read_head_file(self.head_path) if self.head_path else None
        if isinstance(outside, str):
            return VerifyReport(False, len(rows), None, outside)
        if outside is None and self.head_path is not None and rows:
            return VerifyReport(False, len(rows), None, (
                f"head file {self.head_path} is missing although the ledger has {len(rows)} "
                "entries; restore it from a backup"
            ))
        return verify_log(
            rows, heads, key=self.public_key, nodes=nodes, outside_head=outside,
            outside_where=f"head file {self.head_path}",
            check_version=_DatabaseVersions(self.db).check if check_data else None,
            extra=_lineage_problems(self.db, rows) if check_data else (),
        )


class _StoredNodes:
    """``MTH(d[start:end])`` from the ``ledger_nodes`` table, fetched as needed."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def node(self, height: int, index: int) -> bytes:
        col = t.ledger_nodes.c
        query = select(col.hash).where(col.height == height, col.idx == index)
        value = self.conn.execute(query).scalar_one_or_none()
        if value is None:
            raise LedgerError(
                f"Merkle node (height {height}, index {index}) is missing from the database; "
                "run `harmtrace ledger verify` to find what was removed"
            )
        return bytes.fromhex(value)

    def subtree(self, start: int, end: int) -> bytes:
        n = end - start
        if n & (n - 1) == 0 and start % n == 0:
            return self.node(n.bit_length() - 1, start // n)
        k = split_point(n)
        return node_hash(self.subtree(start, start + k), self.subtree(start + k, end))


class _DatabaseVersions:
    """Checks that a dataset version still matches its id over stored record hashes."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def check(self, version_id: str) -> str | None:
        rec, link = t.records, t.version_records
        query = (select(rec.c.record_id, rec.c.text, rec.c.content_hash, rec.c.erased_at)
                 .join(link, link.c.record_id == rec.c.record_id)
                 .where(link.c.version_id == version_id)
                 .order_by(rec.c.record_id))
        if not self.db.version_exists(version_id):
            return f"dataset version {version_id[:12]}... is missing from the database"
        with self.db.transaction() as conn:
            rows = conn.execute(query).all()

        root = version_fingerprint((rid, digest) for rid, _text, digest, _e in rows)
        if root != version_id:
            return (
                f"dataset version {version_id[:12]}... no longer matches its records: their "
                f"stored hashes give root {root[:12]}... (a record hash or the version's "
                "membership was changed)"
            )
        for record_id, text, digest, erased_at in rows:
            if text is not None and erased_at is None and sha256_text(text) != digest:
                return (
                    f"record {record_id} of dataset version {version_id[:12]}... holds text "
                    "that does not hash to its stored content_hash (the text was changed)"
                )
        return None


def _lineage_problems(db: Database, rows: Sequence[Mapping[str, Any]]) -> list[tuple[int, str]]:
    """Records whose key, supersedes link or erasure no ledger entry accounts for.

    A record's ``key`` is its own id and ``supersedes`` is empty unless a ``record-add`` or
    ``record-edit`` entry names other values; its text is gone (and ``erased_at`` set)
    exactly when a ``record-erase`` entry erased it. A problem is blamed on the entry that
    vouches for the record, else on the first entry naming a version that holds it.
    """
    vouched: dict[str, tuple[int, Any, Any]] = {}
    erased_by: dict[str, int] = {}
    version_seq: dict[str, int] = {}
    for row in rows:
        try:
            inputs, outputs = json.loads(row["inputs_json"]), json.loads(row["outputs_json"])
        except (TypeError, ValueError):
            continue  # the chain check reports it
        if not isinstance(inputs, dict) or not isinstance(outputs, dict):
            continue
        if row["stage"] in ("record-add", "record-edit") and "record_id" in outputs:
            vouched[outputs["record_id"]] = (row["seq"], outputs.get("key"),
                                             outputs.get("supersedes"))
        elif row["stage"] == "record-erase" and "record_id" in inputs:
            erased_by[inputs["record_id"]] = row["seq"]
        if isinstance(outputs.get("version_id"), str):
            version_seq.setdefault(outputs["version_id"], row["seq"])

    rec, link = t.records.c, t.version_records.c
    with db.transaction() as conn:
        records = conn.execute(select(rec.record_id, rec.key, rec.supersedes,
                                      rec.text.is_(None), rec.erased_at)).all()
        first_seq: dict[str, int] = {}
        for version_id, record_id in conn.execute(select(link.version_id, link.record_id)):
            seq = version_seq.get(version_id)
            if seq is not None and seq < first_seq.get(record_id, seq + 1):
                first_seq[record_id] = seq

    problems = []
    for record_id, key, supersedes, no_text, erased_at in records:
        seq, want_key, want_supersedes = vouched.get(
            record_id, (first_seq.get(record_id), record_id, None))
        if seq is None:
            continue  # in no version any entry names: nothing vouches for it
        if (key, supersedes) != (want_key, want_supersedes):
            problems.append((seq, (
                f"record {record_id} has key {key!r} and supersedes {supersedes!r}, but the "
                f"ledger says {want_key!r} and {want_supersedes!r} (its lineage was changed)")))
        if record_id in erased_by and not (no_text and erased_at is not None):
            problems.append((erased_by[record_id], (
                f"record {record_id} was erased by entry {erased_by[record_id]} but holds "
                "text again, or lost its erasure mark")))
        elif record_id not in erased_by and (no_text or erased_at is not None):
            problems.append((first_seq.get(record_id, seq), (
                f"record {record_id}'s text was removed or marked erased, but no record-erase "
                "entry erased it")))
    return problems


# -- rows ------------------------------------------------------------------------------------


def _frontier(conn: Connection, size: int) -> list[tuple[int, bytes]]:
    """The perfect subtrees (height, hash), tallest first, that make up the first ``size``."""
    wanted: list[tuple[int, int]] = []
    offset = 0
    for height in range(size.bit_length() - 1, -1, -1):
        if size >> height & 1:
            wanted.append((height, offset >> height))
            offset += 1 << height
    if not wanted:
        return []
    col = t.ledger_nodes.c
    # One equality pair per node: SQLite does not use the primary key for a row-value IN.
    query = select(col.height, col.idx, col.hash).where(
        or_(*(and_(col.height == h, col.idx == i) for h, i in wanted)))
    found = {(h, i): v for h, i, v in conn.execute(query)}
    missing = [w for w in wanted if w not in found]
    if missing:
        raise LedgerError(
            f"Merkle nodes {missing} of the ledger are missing, so nothing can be appended; "
            "run `harmtrace ledger verify` to find what was removed"
        )
    return [(h, bytes.fromhex(found[(h, i)])) for h, i in wanted]


def _check_printable(value: str, name: str) -> None:
    if not isinstance(value, str) or not value or any(
        unicodedata.category(ch) == "Cc" for ch in value
    ):
        raise LedgerError(
            f"ledger {name} {value!r} is empty or holds control characters (newlines, tabs); "
            f"give a plain one-line {name}"
        )


def _rows(conn: Connection) -> list[dict[str, Any]]:
    query = select(t.ledger).order_by(t.ledger.c.seq)
    return [dict(row) for row in conn.execute(query).mappings()]


def _head_row(conn: Connection) -> dict[str, Any] | None:
    query = select(t.ledger).order_by(t.ledger.c.seq.desc()).limit(1)
    row = conn.execute(query).mappings().first()
    return None if row is None else dict(row)


def _size(conn: Connection) -> int:
    row = _head_row(conn)
    return 0 if row is None else row["seq"]


def _tree_head(conn: Connection, size: int | None) -> TreeHead:
    table = t.ledger_heads
    query = select(table)
    if size is None:
        query = query.order_by(table.c.size.desc()).limit(1)
    else:
        query = query.where(table.c.size == size)
    row = conn.execute(query).mappings().first()
    if row is None:
        have = _size(conn)
        if size is None or have == 0:
            raise LedgerError("the ledger is empty: no stage has appended an entry yet")
        raise LedgerError(f"the ledger has no signed head for size {size}; pick 1..{have}")
    return _head_from_row(row)


def _head_from_row(row: Mapping[str, Any]) -> TreeHead:
    return TreeHead(row["size"], row["root"], row["time"], row["key_id"], row["signature"])


def _read_head_file(path: Path | None) -> TreeHead | str | None:
    """The head in ``path``, ``None`` if there is none, or why it cannot be read."""
    if path is None or not path.exists():
        return None
    try:
        return TreeHead.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as err:
        return (
            f"head file {path} cannot be read ({err}); it must hold a signed head "
            '{"size", "root", "time", "key_id", "signature"}; restore it from a backup'
        )


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


def _entry_dict(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "seq": entry.seq, "time": entry.time, "actor": entry.actor, "stage": entry.stage,
        "settings": entry.settings, "inputs": entry.inputs, "outputs": entry.outputs,
        "prev_hash": entry.prev_hash, "entry_hash": entry.entry_hash,
    }

