"""The ledger is a hash chain: any change, removal, insertion or reordering is caught."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from sqlalchemy import delete, insert, select, text, update

from harmtrace.errors import LedgerError
from harmtrace.ledger import Ledger, entry_hash
from harmtrace.store import Database
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
    "outputs_json": '{"version_id":"forged"}',
    "prev_hash": "1" * 64,
    "entry_hash": "2" * 64,
}


@pytest.fixture
def anchor_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger-head.json"


@pytest.fixture
def ledger(database: Database, anchor_path: Path) -> Ledger:
    """A ledger of six entries with a head anchor."""
    ledger = Ledger(database, anchor_path=anchor_path)
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
    """A row a forger who knows the hash scheme would write at ``seq``."""
    contents = {"time": "2001-01-01T00:00:00.000000+00:00", "actor": "mallory",
                "stage": "forged", "settings": {}, "inputs": {}, "outputs": {}}
    digest = entry_hash(seq=seq, prev_hash=prev_hash, **contents)
    return {"seq": seq, "time": contents["time"], "actor": "mallory", "stage": "forged",
            "settings_json": "{}", "inputs_json": "{}", "outputs_json": "{}",
            "prev_hash": prev_hash, "entry_hash": digest}


def test_an_untouched_ledger_verifies(ledger: Ledger) -> None:
    report = ledger.verify()
    assert report.ok, report.reason
    assert (report.n_entries, report.first_bad_seq) == (N_ENTRIES, None)
    assert [e.seq for e in ledger.entries()] == list(range(1, N_ENTRIES + 1))
    assert ledger.entries()[0].prev_hash == "0" * 64
    report.raise_if_bad()


@pytest.mark.parametrize("column", CONTENT_COLUMNS)
@pytest.mark.parametrize("seq", range(1, N_ENTRIES + 1))
def test_changing_any_field_of_any_entry_is_caught(ledger: Ledger, seq: int, column: str) -> None:
    _sql(ledger.db, update(t.ledger).where(t.ledger.c.seq == seq)
         .values({column: TAMPERED_VALUES[column]}))

    report = ledger.verify()

    assert not report.ok
    assert report.first_bad_seq == seq, report.reason
    with pytest.raises(LedgerError):
        report.raise_if_bad()


@pytest.mark.parametrize("seq", range(1, N_ENTRIES + 1))
def test_removing_any_entry_is_caught(ledger: Ledger, seq: int) -> None:
    _sql(ledger.db, delete(t.ledger).where(t.ledger.c.seq == seq))

    report = ledger.verify()

    assert not report.ok
    assert report.first_bad_seq == seq, report.reason
    assert "removed" in report.reason


@pytest.mark.parametrize("seq", range(1, N_ENTRIES))
def test_swapping_two_entries_is_caught(ledger: Ledger, seq: int) -> None:
    first, second = _row(ledger.db, seq), _row(ledger.db, seq + 1)
    for target, source in ((seq, second), (seq + 1, first)):
        values = {column: source[column] for column in CONTENT_COLUMNS}
        _sql(ledger.db, update(t.ledger).where(t.ledger.c.seq == target).values(values))

    report = ledger.verify()

    assert not report.ok
    assert report.first_bad_seq == seq, report.reason


@pytest.mark.parametrize("seq", range(1, N_ENTRIES + 2))
def test_inserting_a_forged_entry_is_caught(ledger: Ledger, seq: int) -> None:
    # Make room at ``seq`` by renumbering later entries, newest first (seq is unique).
    for old in range(N_ENTRIES, seq - 1, -1):
        _sql(ledger.db, update(t.ledger).where(t.ledger.c.seq == old).values(seq=old + 1))
    prev = "0" * 64 if seq == 1 else _row(ledger.db, seq - 1)["entry_hash"]
    _sql(ledger.db, insert(t.ledger).values(_forge(seq, prev)))

    report = ledger.verify()

    assert not report.ok
    assert report.first_bad_seq == seq, report.reason


@pytest.mark.parametrize("seq", range(1, N_ENTRIES + 1))
def test_rewriting_an_entry_with_a_recomputed_hash_is_caught(ledger: Ledger, seq: int) -> None:
    prev = _row(ledger.db, seq)["prev_hash"]
    _sql(ledger.db, update(t.ledger).where(t.ledger.c.seq == seq).values(_forge(seq, prev)))

    report = ledger.verify()

    assert not report.ok
    assert report.first_bad_seq == seq, report.reason


@pytest.mark.parametrize("n_removed", [1, 2, N_ENTRIES])
def test_removing_trailing_entries_is_caught_by_the_anchor(
    ledger: Ledger, n_removed: int
) -> None:
    first_removed = N_ENTRIES - n_removed + 1
    _sql(ledger.db, delete(t.ledger).where(t.ledger.c.seq >= first_removed))

    report = ledger.verify()

    assert not report.ok
    assert report.first_bad_seq == first_removed, report.reason
    assert "anchor" in report.reason


def test_anchor_names_the_head_after_each_append(ledger: Ledger, anchor_path: Path) -> None:
    head = ledger.head()
    assert head is not None
    assert json.loads(anchor_path.read_text()) == {"seq": head.seq, "entry_hash": head.entry_hash}


def test_a_missing_anchor_file_fails_verification(ledger: Ledger, anchor_path: Path) -> None:
    anchor_path.unlink()
    report = ledger.verify()
    assert not report.ok
    assert str(anchor_path) in report.reason


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


def _append_many(url: str, anchor_path: str, actor: str, n: int, start) -> None:
    db = Database(url)
    ledger = Ledger(db, anchor_path=anchor_path)
    start.wait(timeout=60)  # both processes begin appending at the same moment
    for i in range(n):
        ledger.append(actor=actor, stage="concurrent", settings={"i": i})
    db.dispose()


def test_two_processes_appending_at_once_keep_one_chain(
    database: Database, anchor_path: Path
) -> None:
    url = database.engine.url.render_as_string(hide_password=False)
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    workers = [
        context.Process(target=_append_many, args=(url, str(anchor_path), actor, 50, start))
        for actor in ("proc-a", "proc-b")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)

    assert [worker.exitcode for worker in workers] == [0, 0]
    ledger = Ledger(database, anchor_path=anchor_path)
    report = ledger.verify()
    assert report.ok, report.reason
    assert report.n_entries == 100
    actors = [entry.actor for entry in ledger.entries()]
    assert actors.count("proc-a") == actors.count("proc-b") == 50
