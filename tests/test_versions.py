"""Dataset versions are Merkle roots; edits, erasure and diffs keep them verifiable."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from harmtrace.errors import ArtifactError, ConfigError, InputDataError
from harmtrace.ingest import SourceSpec, ingest
from harmtrace.ledger import Ledger
from harmtrace.merkle import leaf_hash, range_hash, verify_inclusion
from harmtrace.store import Database, Record, SourceInfo, record_leaf
from harmtrace.store import schema as t
from harmtrace.versions import RecordEdit, diff_versions, edit_version, erase_record

SECRET = "erase-me: the secret phrase 8472619 zebra"


def _seed(db: Database) -> tuple[str, dict[str, list[Record]]]:
    """Sources web (5 records) and books (3), one version of all 8; returns its id."""
    records = {}
    for name, n in (("web", 5), ("books", 3)):
        db.add_source(SourceInfo(name=name, origin=f"https://example.org/{name}",
                                 licence="CC-BY-4.0"))
        records[name] = [Record.create(source=name, position=i, text=f"{name} record {i} @bob")
                         for i in range(n)]
        db.add_records(records[name])
    ids = [r.record_id for recs in records.values() for r in recs]
    return db.create_version(ids, transform="ingest"), records


def _count(db: Database, table) -> int:
    with db.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def test_version_id_is_the_merkle_root_of_records_sorted_by_id(database: Database) -> None:
    version, records = _seed(database)
    flat = [r for recs in records.values() for r in recs]
    leaves = [leaf_hash(f"{r.record_id}\n{r.content_hash}".encode())
              for r in sorted(flat, key=lambda r: r.record_id)]

    assert version == range_hash(leaves).hex()
    assert database.version_root(version) == version


def test_version_id_does_not_depend_on_record_order(database: Database) -> None:
    version, records = _seed(database)
    ids = [r.record_id for recs in records.values() for r in recs]
    random.Random(1).shuffle(ids)
    assert database.create_version(ids + ids[:3], transform="again") == version


def test_inclusion_proofs_verify_for_members_and_fail_for_others(database: Database) -> None:
    version, records = _seed(database)
    flat = [r for recs in records.values() for r in recs]
    for rec in flat:
        proof = database.record_inclusion_proof(version, rec.record_id)
        assert proof.size == 8 and proof.verify()
        assert verify_inclusion(proof.index, proof.size,
                                record_leaf(rec.record_id, rec.content_hash),
                                [bytes.fromhex(h) for h in proof.proof], bytes.fromhex(version))

    proof = database.record_inclusion_proof(version, flat[0].record_id)
    other = flat[1]
    assert not verify_inclusion(proof.index, proof.size,
                                record_leaf(other.record_id, other.content_hash),
                                [bytes.fromhex(h) for h in proof.proof], bytes.fromhex(version))
    outsider = Record.create(source="web", position=9, text="not in the version")
    database.add_records([outsider])
    with pytest.raises(InputDataError, match="is not in dataset version"):
        database.record_inclusion_proof(version, outsider.record_id)


def test_version_root_detects_a_changed_record_hash(database: Database) -> None:
    version, records = _seed(database)
    with database.transaction() as conn:
        conn.execute(update(t.records)
                     .where(t.records.c.record_id == records["web"][0].record_id)
                     .values(content_hash="0" * 64))
    assert database.version_root(version) != version


def test_diff_counts_added_removed_and_changed_per_source_exactly(database: Database) -> None:
    version, records = _seed(database)
    web, books = records["web"], records["books"]
    edits = [RecordEdit.delete(web[0].record_id), RecordEdit.replace(web[1].record_id, "new"),
             RecordEdit.replace(books[0].record_id, "new book text"),
             RecordEdit.add("books", "added one"), RecordEdit.add("books", "added two")]
    child = edit_version(database, version, edits, reason="test", ledger=Ledger(database))

    diff = diff_versions(database, version, child.version_id)

    by_source = {s.source: s for s in diff.sources}
    assert by_source["web"].counts == {"added": 0, "removed": 1, "changed": 1}
    assert by_source["books"].counts == {"added": 2, "removed": 0, "changed": 1}
    assert by_source["web"].removed == (web[0].record_id,)
    new_web1 = Record.create(source="web", position=1, text="new").record_id
    assert by_source["web"].changed == ((web[1].record_id, new_web1),)
    assert diff.counts == {"added": 2, "removed": 1, "changed": 2}
    assert diff_versions(database, version, version).sources == ()
    back = diff_versions(database, child.version_id, version)
    assert back.counts == {"added": 1, "removed": 2, "changed": 2}


def test_a_replacement_keeps_the_key_and_links_the_old_record(database: Database) -> None:
    version, records = _seed(database)
    old = records["web"][2]
    child = edit_version(database, version, [RecordEdit.replace(old.record_id, "fixed")],
                         reason="typo")
    new = next(r for r in database.version_records(child.version_id) if r.text == "fixed")
    assert (new.key, new.supersedes, new.position) == (old.key, old.record_id, old.position)
    info = database.get_version(child.version_id)
    assert (info.parent, info.transform, info.n_records) == (version, "edit", 8)
    assert "fixed" not in json.dumps(info.args)
    assert info.args["edits"][0]["new_content_hash"] == new.content_hash


def test_an_edit_writes_one_ledger_entry_per_record_edit(database: Database) -> None:
    version, records = _seed(database)
    ledger = Ledger(database)
    edits = [RecordEdit.delete(records["web"][0].record_id),
             RecordEdit.replace(records["web"][1].record_id, "secret replacement"),
             RecordEdit.add("web", "secret addition")]
    result = edit_version(database, version, edits, reason="GDPR 17", actor="ann",
                          ledger=ledger)

    entries = ledger.entries()
    assert [e.stage for e in entries] == ["record-delete", "record-edit", "record-add",
                                          "dataset-version"]
    assert [e.seq for e in entries] == list(result.ledger_seqs)
    assert all(e.actor == "ann" for e in entries)
    assert all(e.settings["reason"] == "GDPR 17" for e in entries)
    assert entries[1].inputs["record_id"] == records["web"][1].record_id
    assert entries[-1].outputs["version_id"] == result.version_id
    assert entries[-1].outputs["parent"] == version
    assert entries[-1].outputs["n_records"] == 8
    dumped = json.dumps([[e.settings, e.inputs, e.outputs] for e in entries])
    assert "secret" not in dumped


def test_a_failing_edit_leaves_no_version_record_or_ledger_entry(database: Database) -> None:
    version, _ = _seed(database)
    before = {tab.name: _count(database, tab)
              for tab in (t.records, t.dataset_versions, t.version_records, t.ledger)}
    with pytest.raises(InputDataError, match="web-0000000000000000"):
        edit_version(database, version, [RecordEdit.add("web", "fresh text"),
                                         RecordEdit.delete("web-0000000000000000")],
                     reason="x")
    with pytest.raises(ConfigError, match="reason"):
        edit_version(database, version, [RecordEdit.add("web", "fresh text")], reason=" ")
    with pytest.raises(ConfigError, match="not registered"):
        edit_version(database, version, [RecordEdit.add("nowhere", "fresh")], reason="x")

    after = {tab.name: _count(database, tab)
             for tab in (t.records, t.dataset_versions, t.version_records, t.ledger)}
    assert after == before


def test_a_crash_inside_an_edit_rolls_back_records_version_and_entries(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    version, records = _seed(database)
    ledger = Ledger(database)
    real_append = Ledger.append

    def failing_append(self, **kwargs):
        if kwargs["stage"] == "dataset-version":
            raise RuntimeError("crash before the last entry")
        return real_append(self, **kwargs)

    monkeypatch.setattr(Ledger, "append", failing_append)
    before = {tab.name: _count(database, tab)
              for tab in (t.records, t.dataset_versions, t.version_records, t.ledger)}
    with pytest.raises(RuntimeError, match="crash"):
        edit_version(database, version, [RecordEdit.add("web", "fresh text"),
                                          RecordEdit.delete(records["web"][0].record_id)],
                     reason="x", ledger=ledger)
    after = {tab.name: _count(database, tab)
             for tab in (t.records, t.dataset_versions, t.version_records, t.ledger)}
    assert after == before


def test_an_edit_refuses_text_already_in_the_version(database: Database) -> None:
    version, records = _seed(database)
    with pytest.raises(InputDataError, match="already in the version"):
        edit_version(database, version, [RecordEdit.add("web", records["web"][0].text)],
                     reason="x")
    with pytest.raises(ConfigError, match="more than once"):
        rid = records["web"][0].record_id
        edit_version(database, version, [RecordEdit.delete(rid), RecordEdit.delete(rid)],
                     reason="x")


def test_erasure_keeps_the_root_and_proofs_and_removes_the_text(
        database: Database, database_url: str) -> None:
    database.add_source(SourceInfo(name="web", origin="https://example.org", licence="x"))
    records = [Record.create(source="web", position=i, text=f"keep {i}") for i in range(4)]
    records.append(Record.create(source="web", position=4, text=SECRET))
    database.add_records(records)
    version = database.create_version([r.record_id for r in records], transform="ingest")
    target = records[-1].record_id
    earlier_proof = database.record_inclusion_proof(version, target)
    ledger = Ledger(database)

    result = erase_record(database, target, reason="GDPR art. 17", actor="dpo", ledger=ledger)

    assert result.versions == (version,)
    assert database.version_root(version) == version
    assert earlier_proof.verify()
    assert database.record_inclusion_proof(version, target) == earlier_proof
    with database.engine.connect() as conn:
        stored = conn.execute(select(t.records.c.text, t.records.c.erased_by)
                              .where(t.records.c.record_id == target)).one()
    assert tuple(stored) == (None, "dpo")
    entry = ledger.entries()[-1]
    assert (entry.stage, entry.settings["reason"], entry.inputs["record_id"]) == (
        "record-erase", "GDPR art. 17", target)
    with pytest.raises(ArtifactError, match=f"{target}.*data edit.*--delete {target}"):
        database.version_records(version)
    with pytest.raises(ConfigError, match="already erased"):
        erase_record(database, target, reason="again")

    if database.dialect == "sqlite":
        # secure_delete zeroes the freed bytes and the checkpoint after the commit empties
        # the write-ahead log (which still held the inserted text): checked while the
        # database is open, before closing it would checkpoint anyway
        path = Path(database_url.removeprefix("sqlite:///"))
        files = [path, path.with_name(path.name + "-wal")]
        assert all(SECRET.encode() not in f.read_bytes() for f in files if f.exists())


def test_an_edit_can_drop_an_erased_record_but_not_take_its_text_back(
        database: Database) -> None:
    version, records = _seed(database)
    erased = records["web"][0]
    erase_record(database, erased.record_id, reason="request")
    with pytest.raises(InputDataError, match="erased"):
        edit_version(database, version, [RecordEdit.delete(records["web"][1].record_id),
                                         RecordEdit.add("web", erased.text)], reason="x")

    child = edit_version(database, version, [RecordEdit.delete(erased.record_id)],
                         reason="drop erased")
    assert len(database.version_records(child.version_id)) == 7


def test_ingest_entry_commits_with_its_records_and_names_the_root(
        database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(3)))
    spec = SourceSpec(name="a", path=data, format="jsonl")

    def broken(self, **kwargs):
        raise RuntimeError("ledger down")

    with monkeypatch.context() as patch:
        patch.setattr(Ledger, "append", broken)
        with pytest.raises(RuntimeError, match="ledger down"):
            ingest(database, [spec])
    assert _count(database, t.records) == 0 and _count(database, t.dataset_versions) == 0

    result = ingest(database, [spec], ledger=Ledger(database))
    entry = Ledger(database).entries()[-1]
    assert entry.outputs["version_id"] == result.version_id
    assert database.version_root(result.version_id) == result.version_id


def test_version_prefixes_resolve_only_when_unambiguous(database: Database) -> None:
    version, _ = _seed(database)
    assert database.resolve_version(version[:8]) == version
    assert database.resolve_version(version.upper()) == version
    with pytest.raises(ConfigError, match="no dataset version id starts with"):
        database.resolve_version("ffff" if not version.startswith("ffff") else "0000")
    with pytest.raises(ConfigError, match="4 or more"):
        database.resolve_version(version[:3])
    rows = [{"version_id": f"abcd{i}" + "0" * 59, "parent": None, "created_at": "t",
             "transform": "x", "args_json": "{}", "n_records": 0, "created_by": "x"}
            for i in range(2)]
    with database.transaction() as conn:
        conn.execute(t.dataset_versions.insert(), rows)
    with pytest.raises(ConfigError, match="ambiguous"):
        database.resolve_version("abcd")


def _table_counts(db: Database) -> dict[str, int]:
    return {tab.name: _count(db, tab)
            for tab in (t.records, t.dataset_versions, t.version_records, t.ledger)}


def test_an_edit_whose_child_equals_the_parent_is_refused_and_writes_nothing(
        database: Database) -> None:
    version, records = _seed(database)
    web0 = records["web"][0]
    ledger = Ledger(database)
    before = _table_counts(database)
    with pytest.raises(InputDataError, match="no change: .*text it already has.*equal the "
                                             "parent"):
        edit_version(database, version, [RecordEdit.replace(web0.record_id, web0.text)],
                     reason="x", ledger=ledger)
    with pytest.raises(InputDataError, match="no change: .*child would equal the parent"):
        edit_version(database, version, [RecordEdit.delete(web0.record_id),
                                         RecordEdit.add("web", web0.text)],
                     reason="x", ledger=ledger)
    # an identical replace is refused even when other edits change something
    with pytest.raises(InputDataError, match="no change"):
        edit_version(database, version, [RecordEdit.replace(web0.record_id, web0.text),
                                         RecordEdit.add("web", "new text")],
                     reason="x", ledger=ledger)
    assert _table_counts(database) == before
    assert all(v.parent != v.version_id for v in database.list_versions())


def test_repeated_added_texts_are_refused_naming_both(database: Database) -> None:
    version, _ = _seed(database)
    with pytest.raises(InputDataError, match="added record 2 repeats the text of added "
                                             "record 1"):
        edit_version(database, version, [RecordEdit.add("web", "twice"),
                                         RecordEdit.add("web", "twice")], reason="x")


def test_an_edit_to_an_existing_version_reports_it_and_still_logs_its_entries(
        database: Database) -> None:
    version, records = _seed(database)
    ledger = Ledger(database)
    edit = [RecordEdit.delete(records["web"][0].record_id)]
    first = edit_version(database, version, edit, reason="one", actor="ann", ledger=ledger)
    n_versions = _count(database, t.dataset_versions)

    again = edit_version(database, version, edit, reason="two", actor="bob", ledger=ledger)

    assert first.existing is None
    assert again.version_id == first.version_id
    assert again.existing is not None and again.existing.created_by == "ann"
    assert again.existing.parent == version
    assert _count(database, t.dataset_versions) == n_versions
    entries = ledger.entries()
    assert [e.seq for e in entries[-2:]] == list(again.ledger_seqs)
    assert [e.stage for e in entries[-2:]] == ["record-delete", "dataset-version"]
    assert entries[-1].actor == "bob" and entries[-1].settings["reason"] == "two"
    assert entries[-1].outputs["existed"] is True
    assert entries[-1].outputs["existing_created_by"] == "ann"
    assert "existed" not in entries[-3].outputs
    assert ledger.verify().ok


def test_diff_excerpts_need_a_reason_and_log_it_with_actor_and_ids(
        database: Database) -> None:
    from harmtrace.versions import diff_excerpts

    version, records = _seed(database)
    child = edit_version(database, version, [RecordEdit.delete(records["web"][0].record_id)],
                         reason="x")
    diff = diff_versions(database, version, child.version_id)
    ledger = Ledger(database)
    n_entries = len(ledger.entries())
    with pytest.raises(ConfigError, match="reason"):
        diff_excerpts(database, diff, reason=" ", ledger=ledger)
    assert len(ledger.entries()) == n_entries

    shown = diff_excerpts(database, diff, reason="audit 7", actor="ann", ledger=ledger)
    entry = ledger.entries()[-1]
    assert (entry.stage, entry.actor, entry.settings["reason"]) == ("disclosure", "ann",
                                                                     "audit 7")
    assert entry.outputs["record_ids"] == [records["web"][0].record_id] == list(shown)
