"""The ledger is a signed Merkle log: any change, removal, insertion or reordering of an
entry, a stored node, a signed head or a stored record hash is caught and the first bad entry
is named, in the database and in an exported bundle."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import delete, func, insert, select, text, update

from harmtrace.errors import LedgerError
from harmtrace.ingest import SourceSpec, ingest
from harmtrace.ledger import (
    Ledger,
    LedgerKey,
    PublicKey,
    check_proof,
    entry_hash,
    export_bundle,
    verify_bundle,
)
from harmtrace.store import Database, Record
from harmtrace.store import schema as t

N_ENTRIES = 6
CONTENT_COLUMNS = [
    "time", "actor", "stage", "settings_json", "inputs_json", "outputs_json", "prev_hash",
    "entry_hash",
]
TAMPERED_VALUES = {
    "time": "2000-01-01T00:00:00.000000+00:00",
    "actor": "mallory",
    "stage": "remediate",
    "settings_json": '{"damping":0.5}',
    "inputs_json": '{"data":"forged"}',
    "outputs_json": '{"out":"forged"}',
    "prev_hash": "1" * 64,
    "entry_hash": "2" * 64,
}


@pytest.fixture(scope="module")
def key() -> LedgerKey:
    return LedgerKey.generate()


@pytest.fixture
def head_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger-head.json"


@pytest.fixture
def ledger(database: Database, head_path: Path, key: LedgerKey) -> Ledger:
    """A signed ledger of six entries with a head file."""
    ledger = Ledger(database, key=key, head_path=head_path)
    for i in range(1, N_ENTRIES + 1):
        ledger.append(actor="ann", stage=f"stage{i}", settings={"i": i},
                      inputs={"data": f"in{i}"}, outputs={"out": f"out{i}"})
    return ledger


def _sql(db: Database, statement) -> None:
    with db.engine.begin() as conn:
        conn.execute(statement)


def _row(db: Database, seq: int) -> dict:
    with db.engine.connect() as conn:
        query = select(t.ledger).where(t.ledger.c.seq == seq)
        return dict(conn.execute(query).mappings().one())


def _forge(seq: int, prev_hash: str) -> dict:
    """A row a forger who knows the hash scheme (but not the key) would write at ``seq``."""
    contents = {"time": "2001-01-01T00:00:00.000000+00:00", "actor": "mallory",
                "stage": "forged", "settings": {}, "inputs": {}, "outputs": {}}
    digest = entry_hash(seq=seq, prev_hash=prev_hash, **contents)
    return {"seq": seq, "time": contents["time"], "actor": "mallory", "stage": "forged",
            "settings_json": "{}", "inputs_json": "{}", "outputs_json": "{}",
            "prev_hash": prev_hash, "entry_hash": digest}


def _fails_at(report, seq: int) -> None:
    assert not report.ok
    assert report.first_bad_seq == seq, report.reason
    with pytest.raises(LedgerError):
        report.raise_if_bad()


# -- an untouched log ----------------------------------------------------------------------


def test_an_untouched_ledger_verifies(ledger: Ledger, key: LedgerKey) -> None:
    report = ledger.verify()
    assert report.ok, report.reason
    assert (report.n_entries, report.first_bad_seq) == (N_ENTRIES, None)
    assert f"signed heads checked with key {key.public.key_id}" in report.reason
    assert [e.seq for e in ledger.entries()] == list(range(1, N_ENTRIES + 1))
    assert ledger.entries()[0].prev_hash == "0" * 64
    report.raise_if_bad()


def test_the_head_file_holds_the_newest_signed_head(ledger: Ledger, head_path: Path) -> None:
    on_disk = json.loads(head_path.read_text())
    assert on_disk == ledger.tree_head().as_dict()
    assert on_disk["size"] == N_ENTRIES
    assert ledger.public_key.checks(ledger.tree_head())


# -- tampering with entries ----------------------------------------------------------------


@pytest.mark.parametrize("column", CONTENT_COLUMNS)
@pytest.mark.parametrize("seq", range(1, N_ENTRIES + 1))
def test_changing_any_field_of_any_entry_is_caught(ledger: Ledger, seq: int, column: str) -> None:
    _sql(ledger.db, update(t.ledger).where(t.ledger.c.seq == seq)
         .values({column: TAMPERED_VALUES[column]}))
    _fails_at(ledger.verify(), seq)


@pytest.mark.parametrize("seq", range(1, N_ENTRIES + 1))
def test_removing_any_entry_is_caught(ledger: Ledger, seq: int) -> None:
    _sql(ledger.db, delete(t.ledger).where(t.ledger.c.seq == seq))
    report = ledger.verify()
    _fails_at(report, seq)
    assert "removed" in report.reason


@pytest.mark.parametrize("seq", range(1, N_ENTRIES))
def test_swapping_two_entries_is_caught(ledger: Ledger, seq: int) -> None:
    first, second = _row(ledger.db, seq), _row(ledger.db, seq + 1)
    for target, source in ((seq, second), (seq + 1, first)):
        values = {column: source[column] for column in CONTENT_COLUMNS}
        _sql(ledger.db, update(t.ledger).where(t.ledger.c.seq == target).values(values))
    _fails_at(ledger.verify(), seq)


@pytest.mark.parametrize("seq", range(1, N_ENTRIES + 2))
def test_inserting_a_forged_entry_is_caught(ledger: Ledger, seq: int) -> None:
    # Make room at ``seq`` by renumbering later entries, newest first (seq is unique).
    for old in range(N_ENTRIES, seq - 1, -1):
        _sql(ledger.db, update(t.ledger).where(t.ledger.c.seq == old).values(seq=old + 1))
    prev = "0" * 64 if seq == 1 else _row(ledger.db, seq - 1)["entry_hash"]
    _sql(ledger.db, insert(t.ledger).values(_forge(seq, prev)))
    _fails_at(ledger.verify(), seq)


@pytest.mark.parametrize("seq", range(1, N_ENTRIES + 1))
def test_rewriting_an_entry_with_a_recomputed_hash_is_caught(ledger: Ledger, seq: int) -> None:
    prev = _row(ledger.db, seq)["prev_hash"]
    _sql(ledger.db, update(t.ledger).where(t.ledger.c.seq == seq).values(_forge(seq, prev)))
    _fails_at(ledger.verify(), seq)


def test_rewriting_the_whole_chain_and_tree_without_the_key_is_caught(
    ledger: Ledger, head_path: Path
) -> None:
    """A forger who rebuilds every hash, node and head but signs with another key."""
    rows = [_row(ledger.db, seq) for seq in range(1, N_ENTRIES + 1)]
    _sql(ledger.db, delete(t.ledger))
    _sql(ledger.db, delete(t.ledger_nodes))
    _sql(ledger.db, delete(t.ledger_heads))
    forger = Ledger(ledger.db, key=LedgerKey.generate())
    for row in rows:
        forger.append(actor="mallory", stage=row["stage"], settings=json.loads(
            row["settings_json"]), inputs={}, outputs={})
    report = ledger.verify()
    _fails_at(report, 1)
    assert "signature" in report.reason


@pytest.mark.parametrize("n_removed", [1, 2, N_ENTRIES])
def test_removing_trailing_entries_with_their_heads_and_nodes_is_caught_by_the_head_file(
    ledger: Ledger, n_removed: int
) -> None:
    first_removed = N_ENTRIES - n_removed + 1
    _sql(ledger.db, delete(t.ledger).where(t.ledger.c.seq >= first_removed))
    _sql(ledger.db, delete(t.ledger_heads).where(t.ledger_heads.c.size >= first_removed))
    # A thorough forger also drops the nodes that cover a removed entry.
    col = t.ledger_nodes.c
    for height in range(4):
        last_kept = (first_removed - 1) >> height  # nodes from this index reach past it
        _sql(ledger.db, delete(t.ledger_nodes).where(col.height == height,
                                                     col.idx >= last_kept))
    report = ledger.verify()
    _fails_at(report, first_removed)
    assert "head file" in report.reason or "removed" in report.reason


def test_appending_without_the_key_that_signed_the_log_is_refused(ledger: Ledger) -> None:
    for other in (Ledger(ledger.db), Ledger(ledger.db, key=LedgerKey.generate())):
        with pytest.raises(LedgerError, match="newest head is signed by key"):
            other.append(actor="mallory", stage="forged")
    assert ledger.verify().ok


def test_an_entry_appended_without_the_key_is_caught(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    forger = Ledger(ledger.db)
    monkeypatch.setattr(forger, "_check_signer", lambda _head: None)  # a writer outside
    forger.append(actor="mallory", stage="forged")
    _fails_at(ledger.verify(), N_ENTRIES + 1)


@pytest.mark.parametrize("size", range(1, N_ENTRIES + 1))
def test_deleting_any_signed_head_is_caught(ledger: Ledger, size: int) -> None:
    _sql(ledger.db, delete(t.ledger_heads).where(t.ledger_heads.c.size == size))
    report = ledger.verify()
    _fails_at(report, size)
    assert "head for size" in report.reason


def test_control_characters_in_the_actor_are_refused(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="control characters"):
        ledger.append(actor="x\n  99 2030-01-01 root ingest", stage="s")


def test_a_workspace_whose_key_file_went_missing_refuses_to_make_a_new_one(
    database: Database, tmp_path: Path
) -> None:
    Ledger.for_workspace(database, tmp_path).append(stage="first")
    pub = (tmp_path / "keys" / "ledger-ed25519.pub").read_text()
    (tmp_path / "keys" / "ledger-ed25519.pem").unlink()
    with pytest.raises(LedgerError, match="private key .* is missing"):
        Ledger.for_workspace(database, tmp_path)
    assert (tmp_path / "keys" / "ledger-ed25519.pub").read_text() == pub


@pytest.mark.parametrize("size", [1, 3, N_ENTRIES])
def test_a_rewritten_signed_head_is_caught(ledger: Ledger, size: int) -> None:
    _sql(ledger.db, update(t.ledger_heads).where(t.ledger_heads.c.size == size)
         .values(root="ab" * 32))
    _fails_at(ledger.verify(), size)


@pytest.mark.parametrize("height,index,first", [(0, 0, 1), (0, 4, 5), (1, 1, 3), (2, 0, 1)])
def test_a_changed_merkle_node_names_the_first_entry_it_covers(
    ledger: Ledger, height: int, index: int, first: int
) -> None:
    col = t.ledger_nodes.c
    _sql(ledger.db, update(t.ledger_nodes).where(col.height == height, col.idx == index)
         .values(hash="cd" * 32))
    _fails_at(ledger.verify(), first)


def test_a_missing_or_unreadable_head_file_fails_verification(
    ledger: Ledger, head_path: Path
) -> None:
    head_path.unlink()
    report = ledger.verify()
    assert not report.ok and str(head_path) in report.reason
    head_path.write_text("{not json")
    report = ledger.verify()
    assert not report.ok and "cannot be read" in report.reason


def test_a_head_file_signed_by_another_key_fails_verification(
    ledger: Ledger, head_path: Path
) -> None:
    other = LedgerKey.generate().sign(N_ENTRIES, ledger.tree_head().root, "2030-01-01")
    head_path.write_text(json.dumps(other.as_dict()))
    assert not ledger.verify().ok


# -- proofs --------------------------------------------------------------------------------


@pytest.fixture
def long_ledger(database: Database, key: LedgerKey) -> Ledger:
    ledger = Ledger(database, key=key)
    for i in range(13):
        ledger.append(actor="ann", stage="s", settings={"i": i})
    return ledger


def test_every_entry_has_an_inclusion_proof_that_checks_offline(
    long_ledger: Ledger, key: LedgerKey
) -> None:
    for size in (1, 2, 5, 8, 13):
        for seq in range(1, size + 1):
            proof = long_ledger.prove(seq, size)
            assert len(proof["proof"]) <= math.ceil(math.log2(size))
            ok, why = check_proof(json.loads(json.dumps(proof)), key.public)
            assert ok, why


def test_an_inclusion_proof_fails_for_changed_entries_paths_or_keys(
    long_ledger: Ledger, key: LedgerKey
) -> None:
    proof = long_ledger.prove(6)
    changed = json.loads(json.dumps(proof))
    changed["entry"]["actor"] = "mallory"
    assert not check_proof(changed, key.public)[0]

    moved = json.loads(json.dumps(proof))
    moved["entry"] = long_ledger.prove(7)["entry"]
    assert not check_proof(moved, key.public)[0]

    bad_path = json.loads(json.dumps(proof))
    bad_path["proof"][0] = "00" * 32
    assert not check_proof(bad_path, key.public)[0]

    assert not check_proof(proof, LedgerKey.generate().public)[0]


def test_consistency_proofs_link_every_pair_of_signed_heads(
    long_ledger: Ledger, key: LedgerKey
) -> None:
    for new in range(1, 14):
        for old in range(1, new + 1):
            proof = long_ledger.consistency(old, new)
            assert len(proof["proof"]) <= 2 * math.ceil(math.log2(new)) + 1
            ok, why = check_proof(json.loads(json.dumps(proof)), key.public)
            assert ok, (old, new, why)
    proof = long_ledger.consistency(5, 13)
    proof["old_head"] = long_ledger.tree_head(6).as_dict()
    assert not check_proof(proof, key.public)[0]


def test_proofs_for_entries_or_sizes_outside_the_log_are_refused(long_ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="not in a log of 13"):
        long_ledger.prove(14)
    with pytest.raises(LedgerError, match="no signed head for size 40"):
        long_ledger.consistency(2, 40)
    with pytest.raises(LedgerError, match="must not exceed"):
        long_ledger.consistency(9, 4)


# -- the data the ledger vouches for ------------------------------------------------------


@pytest.fixture
def data_ledger(database: Database, key: LedgerKey, tmp_path: Path) -> Ledger:
    """A signed ledger whose entry 2 is an ingest of six records (entries 1 and 3 are not)."""
    ledger = Ledger(database, key=key, head_path=tmp_path / "head.json")
    ledger.append(actor="ann", stage="setup")
    path = tmp_path / "src.jsonl"
    path.write_text("".join(json.dumps({"text": f"record number {i}"}) + "\n"
                            for i in range(6)))
    ingest(database, [SourceSpec(name="src", path=path, format="jsonl")], ledger=ledger)
    ledger.append(actor="ann", stage="after")
    return ledger


def _a_record_id(db: Database, offset: int = 2) -> str:
    with db.engine.connect() as conn:
        return conn.execute(select(t.records.c.record_id).order_by(t.records.c.record_id)
                            .limit(1).offset(offset)).scalar_one()


def test_a_changed_stored_record_hash_names_the_entry_of_its_version(
    data_ledger: Ledger,
) -> None:
    assert data_ledger.verify().ok
    record_id = _a_record_id(data_ledger.db)
    _sql(data_ledger.db, update(t.records).where(t.records.c.record_id == record_id)
         .values(content_hash="9" * 64))
    report = data_ledger.verify()
    _fails_at(report, 2)
    assert "record hash" in report.reason


def test_changed_record_text_names_the_record_and_the_entry(data_ledger: Ledger) -> None:
    record_id = _a_record_id(data_ledger.db)
    _sql(data_ledger.db, update(t.records).where(t.records.c.record_id == record_id)
         .values(text="something else entirely"))
    report = data_ledger.verify()
    _fails_at(report, 2)
    assert record_id in report.reason


def test_removing_a_record_from_a_version_is_caught(data_ledger: Ledger) -> None:
    record_id = _a_record_id(data_ledger.db)
    _sql(data_ledger.db, delete(t.version_records)
         .where(t.version_records.c.record_id == record_id))
    _fails_at(data_ledger.verify(), 2)


@pytest.mark.parametrize("values", [{"key": "src-other"}, {"supersedes": "src-0"},
                                    {"text": None}, {"erased_at": "2030-01-01"}])
def test_changed_record_lineage_or_erasure_marks_are_caught(
    data_ledger: Ledger, values: dict
) -> None:
    record_id = _a_record_id(data_ledger.db)
    if "supersedes" in values:
        values = {"supersedes": _a_record_id(data_ledger.db, 3)}
    _sql(data_ledger.db, update(t.records).where(t.records.c.record_id == record_id)
         .values(values))
    report = data_ledger.verify()
    _fails_at(report, 2)
    assert record_id in report.reason


def test_an_erasure_verifies_and_undoing_its_mark_is_caught(data_ledger: Ledger) -> None:
    from harmtrace.versions import erase_record

    record_id = _a_record_id(data_ledger.db)
    erased = erase_record(data_ledger.db, record_id, reason="privacy request",
                          ledger=data_ledger)
    assert data_ledger.verify().ok
    _sql(data_ledger.db, update(t.records).where(t.records.c.record_id == record_id)
         .values(erased_at=None, erased_by=None))
    report = data_ledger.verify()
    _fails_at(report, erased.ledger_seq)


def test_adding_a_record_to_a_version_is_caught(data_ledger: Ledger) -> None:
    extra = Record.create(source="src", position=99, text="smuggled in")
    data_ledger.db.add_records([extra])
    version = data_ledger.entries()[1].outputs["version_id"]
    _sql(data_ledger.db, insert(t.version_records)
         .values(version_id=version, record_id=extra.record_id))
    _fails_at(data_ledger.verify(), 2)


# -- exported bundles ----------------------------------------------------------------------


@pytest.fixture
def bundle(data_ledger: Ledger, tmp_path: Path) -> Path:
    path = tmp_path / "bundle.json"
    summary = export_bundle(data_ledger, path)
    assert summary == {"entries": 3, "heads": 3, "versions": 1}
    return path


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_an_untouched_bundle_verifies_offline_with_the_pinned_key(
    bundle: Path, key: LedgerKey
) -> None:
    report = verify_bundle(bundle, key.public)
    assert report.ok, report.reason
    assert "pin" in verify_bundle(bundle).reason  # says the bundle's own key was trusted


@pytest.mark.parametrize("field", ["time", "actor", "stage", "settings", "inputs", "outputs",
                                   "prev_hash", "entry_hash"])
@pytest.mark.parametrize("seq", [1, 2, 3])
def test_changing_any_field_of_a_bundled_entry_is_caught(
    bundle: Path, key: LedgerKey, seq: int, field: str
) -> None:
    forged = {"settings": {"x": 1}, "inputs": {"x": 1}, "outputs": {"x": 1},
              "prev_hash": "1" * 64, "entry_hash": "2" * 64}.get(field, "mallory")
    _edit(bundle, lambda d: d["entries"][seq - 1].__setitem__(field, forged))
    _fails_at(verify_bundle(bundle, key.public), seq)


@pytest.mark.parametrize("seq", [1, 2, 3])
def test_deleting_a_bundled_entry_is_caught(bundle: Path, key: LedgerKey, seq: int) -> None:
    _edit(bundle, lambda d: d["entries"].pop(seq - 1))
    _fails_at(verify_bundle(bundle, key.public), seq)


@pytest.mark.parametrize("seq", [1, 2])
def test_reordering_bundled_entries_is_caught(bundle: Path, key: LedgerKey, seq: int) -> None:
    def swap(d: dict) -> None:
        entries = d["entries"]
        entries[seq - 1], entries[seq] = entries[seq], entries[seq - 1]
    _edit(bundle, swap)
    _fails_at(verify_bundle(bundle, key.public), seq)


@pytest.mark.parametrize("seq", [1, 2, 3, 4])
def test_inserting_a_forged_bundled_entry_is_caught(
    bundle: Path, key: LedgerKey, seq: int
) -> None:
    def insert_forged(d: dict) -> None:
        entries = d["entries"]
        prev = "0" * 64 if seq == 1 else entries[seq - 2]["entry_hash"]
        row = _forge(seq, prev)
        forged = {k: row[k] for k in ("seq", "time", "actor", "stage", "prev_hash",
                                       "entry_hash")}
        forged.update(settings={}, inputs={}, outputs={})
        for later in entries[seq - 1:]:
            later["seq"] += 1
        entries.insert(seq - 1, forged)
    _edit(bundle, insert_forged)
    _fails_at(verify_bundle(bundle, key.public), seq)


@pytest.mark.parametrize("change", ["hash", "drop", "add"])
def test_changing_a_bundled_record_hash_names_the_entry_of_its_version(
    bundle: Path, key: LedgerKey, change: str
) -> None:
    def edit(d: dict) -> None:
        pairs = next(iter(d["versions"].values()))
        if change == "hash":
            pairs[3][1] = "9" * 64
        elif change == "drop":
            pairs.pop(0)
        else:
            pairs.append(["src-0000000000000000", "0" * 64])
    _edit(bundle, edit)
    report = verify_bundle(bundle, key.public)
    _fails_at(report, 2)


def test_a_bundle_cut_short_fails_only_against_a_trusted_head(
    bundle: Path, key: LedgerKey, data_ledger: Ledger
) -> None:
    trusted = data_ledger.tree_head()

    def cut(d: dict) -> None:
        d["entries"].pop()
        d["heads"].pop()
    _edit(bundle, cut)
    assert verify_bundle(bundle, key.public).ok  # a shorter log is still a valid log
    _fails_at(verify_bundle(bundle, key.public, trusted_head=trusted), 3)


def test_a_proof_whose_stated_fields_contradict_it_fails(
    long_ledger: Ledger, key: LedgerKey
) -> None:
    for field, value in (("index", 0), ("tree_size", 99), ("leaf_hash", "00" * 32)):
        proof = json.loads(json.dumps(long_ledger.prove(6)))
        proof[field] = value
        ok, why = check_proof(proof, key.public)
        assert not ok and field in why


def test_a_bundle_checked_against_another_key_fails(bundle: Path) -> None:
    _fails_at(verify_bundle(bundle, LedgerKey.generate().public), 1)


def test_a_malformed_bundle_names_the_file_and_the_problem(tmp_path: Path) -> None:
    from harmtrace.errors import InputDataError

    path = tmp_path / "b.json"
    path.write_text("[1, 2]")
    with pytest.raises(InputDataError, match="not a ledger bundle"):
        verify_bundle(path)
    path.write_text('{"format": "harmtrace-ledger-bundle/1", "entries": [], "heads": {}}')
    with pytest.raises(InputDataError, match="'heads'"):
        verify_bundle(path)


# -- keys --------------------------------------------------------------------------------


def test_a_new_key_file_is_private_and_its_public_half_is_written_beside_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys" / "ledger-ed25519.pem"
    key = LedgerKey.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert PublicKey.load(path.with_suffix(".pub")).raw == key.public.raw
    assert LedgerKey.load_or_create(path).public.raw == key.public.raw  # loaded, not new


def test_an_unreadable_key_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "bad.pem"
    path.write_text("not a key")
    with pytest.raises(LedgerError, match="bad.pem.*restore"):
        LedgerKey.load_or_create(path)


# -- basics and concurrency ----------------------------------------------------------------


def test_entries_read_back_as_appended(database: Database) -> None:
    ledger = Ledger(database)
    entry = ledger.append(actor="ann", stage="ingest", settings={"paths": (Path("a"), 1)},
                          inputs={"x": 1.5}, outputs={"y": None})
    assert ledger.entries() == [entry]
    assert entry.settings == {"paths": ["a", 1]}
    assert Ledger(database).verify().ok


def test_actor_defaults_to_the_login_name(database: Database) -> None:
    entry = Ledger(database).append(stage="ingest")
    assert entry.actor
    with database.engine.connect() as conn:
        assert conn.execute(text("SELECT actor FROM ledger")).scalar_one() == entry.actor


def test_an_append_inside_a_failed_transaction_leaves_nothing(
    database: Database, key: LedgerKey, head_path: Path
) -> None:
    ledger = Ledger(database, key=key, head_path=head_path)
    ledger.append(stage="first")
    with pytest.raises(RuntimeError), database.transaction(lock="ledger"):
        ledger.append(stage="lost")
        raise RuntimeError("the caller's own write failed")
    assert [e.stage for e in ledger.entries()] == ["first"]
    assert json.loads(head_path.read_text())["size"] == 1  # the head file never ran ahead
    assert ledger.verify().ok


def _append_many(url: str, key_path: str, head_path: str, actor: str, n: int, start) -> None:
    db = Database(url)
    ledger = Ledger(db, key=LedgerKey.load_or_create(key_path), head_path=head_path)
    start.wait(timeout=60)  # both processes begin appending at the same moment
    for i in range(n):
        ledger.append(actor=actor, stage="concurrent", settings={"i": i})
    db.dispose()


def test_two_processes_appending_at_once_both_succeed_in_one_order(
    database: Database, head_path: Path, tmp_path: Path
) -> None:
    key_path = tmp_path / "key.pem"
    key = LedgerKey.load_or_create(key_path)
    url = database.engine.url.render_as_string(hide_password=False)
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    workers = [
        context.Process(target=_append_many,
                        args=(url, str(key_path), str(head_path), actor, 40, start))
        for actor in ("proc-a", "proc-b")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=180)

    assert [worker.exitcode for worker in workers] == [0, 0]
    ledger = Ledger(database, key=key, head_path=head_path)
    report = ledger.verify()
    assert report.ok, report.reason
    assert report.n_entries == 80
    actors = [entry.actor for entry in ledger.entries()]
    assert actors.count("proc-a") == actors.count("proc-b") == 40
    assert actors != sorted(actors)  # the two really interleaved


# -- crashes -------------------------------------------------------------------------------

_APPENDER = """
import sys
from harmtrace.ledger import Ledger, LedgerKey
from harmtrace.store import Database
db = Database(sys.argv[1])
db.create_all()
ledger = Ledger(db, key=LedgerKey.load_or_create(sys.argv[2]), head_path=sys.argv[3])
print("ready", flush=True)
for i in range(100000):
    ledger.append(stage="crash-test", settings={"i": i}, outputs={"blob": "x" * 2000})
"""


@pytest.mark.parametrize("delay_s", [0.3, 0.7, 1.1])
def test_kill_9_during_appends_leaves_a_log_that_verifies_and_appends_again(
    database: Database, tmp_path: Path, delay_s: float
) -> None:
    key_path, head_path = tmp_path / "key.pem", tmp_path / "head.json"
    key = LedgerKey.load_or_create(key_path)
    url = database.engine.url.render_as_string(hide_password=False)
    proc = subprocess.Popen([sys.executable, "-c", _APPENDER, url, str(key_path),
                             str(head_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(delay_s)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    ledger = Ledger(database, key=key, head_path=head_path)
    report = ledger.verify()
    assert report.ok, report.reason
    killed_at = report.n_entries
    assert killed_at > 0
    ledger.append(stage="after-the-crash")
    after = ledger.verify()
    assert after.ok and after.n_entries == killed_at + 1


_INGESTER = """
import sys
from harmtrace.ingest import SourceSpec, ingest
from harmtrace.ledger import Ledger, LedgerKey
from harmtrace.store import Database
db = Database(sys.argv[1])
db.create_all()
ledger = Ledger(db, key=LedgerKey.load_or_create(sys.argv[2]), head_path=sys.argv[3])
print("ready", flush=True)
ingest(db, [SourceSpec(name="big", path=sys.argv[4], format="jsonl")], ledger=ledger)
print("done", flush=True)
"""


def _counts(db: Database) -> tuple[int, int, int]:
    with db.engine.connect() as conn:
        return tuple(conn.execute(select(func.count()).select_from(table)).scalar_one()
                     for table in (t.records, t.dataset_versions, t.ledger))


@pytest.mark.parametrize("delay_s", [0.5, 1.5, 2.5])
def test_kill_9_during_ingest_leaves_all_or_nothing_and_a_rerun_completes(
    database: Database, tmp_path: Path, delay_s: float
) -> None:
    n = 20_000
    data = tmp_path / "big.jsonl"
    data.write_text("".join(json.dumps({"text": f"record {i} " + "word " * 20}) + "\n"
                            for i in range(n)))
    key_path, head_path = tmp_path / "key.pem", tmp_path / "head.json"
    key = LedgerKey.load_or_create(key_path)
    url = database.engine.url.render_as_string(hide_password=False)
    args = [sys.executable, "-c", _INGESTER, url, str(key_path), str(head_path), str(data)]

    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(delay_s)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    assert _counts(database) in {(0, 0, 0), (n, 1, 1)}  # whole, or not at all
    ledger = Ledger(database, key=key, head_path=head_path)
    report = ledger.verify()
    assert report.ok, report.reason

    rerun = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    records, versions, entries = _counts(database)
    assert (records, versions) == (n, 1) and entries >= 1
    assert ledger.verify().ok
