"""A Croissant export loads in mlcroissant, masks text by default and is logged."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harmtrace.hashing import sha256_file
from harmtrace.ledger import Ledger
from harmtrace.store import Database, Record, SourceInfo
from harmtrace.versions import export_croissant
from harmtrace.versions._export import RECORDS_FILE

mlc = pytest.importorskip("mlcroissant")


def _version(db: Database) -> tuple[str, list[Record]]:
    db.add_source(SourceInfo(name="tweets", origin="https://example.org/tweets",
                             licence="CC-BY-4.0", added_by="ann"))
    db.add_source(SourceInfo(name="books", origin="a library", licence="public domain"))
    records = [Record.create(source="tweets", position=i, text=f"RT @user{i}: tweet {i}")
               for i in range(6)]
    records += [Record.create(source="books", position=i, text=f"chapter {i}") for i in range(3)]
    db.add_records(records)
    return db.create_version([r.record_id for r in records], transform="ingest"), records


def _artifacts(root: Path, version: str) -> Path:
    folder = root / "artifacts" / "attribute"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"identity": {"version": version}}))
    (folder / "attribution.json").write_text(json.dumps({
        "k": 2, "agreement_hint": "methods agree",
        "methods": {"bm25": {"sources": [{"source": "tweets", "score": 3.0},
                                         {"source": "books", "score": 0.1}]}}}))
    return root / "artifacts"


def test_export_loads_in_mlcroissant_with_every_record(database: Database,
                                                       tmp_path: Path) -> None:
    version, records = _version(database)
    ledger = Ledger(database)
    result = export_croissant(database, version, tmp_path / "out", ledger=ledger,
                              artifacts=_artifacts(tmp_path, version))

    dataset = mlc.Dataset(jsonld=str(result.croissant))
    rows = list(dataset.records("records"))
    assert len(rows) == len(records) == result.n_records
    assert not dataset.metadata.ctx.issues.errors
    texts = {row["records/record_id"].decode(): row["records/text"].decode() for row in rows}
    assert texts[records[0].record_id] == "RT @[user]: tweet 0"  # masked by default


def test_export_describes_version_provenance_and_findings(database: Database,
                                                          tmp_path: Path) -> None:
    version, _ = _version(database)
    result = export_croissant(database, version, tmp_path / "out",
                              artifacts=_artifacts(tmp_path, version))
    doc = json.loads(result.croissant.read_text())

    assert doc["conformsTo"] == "http://mlcommons.org/croissant/1.0"
    assert doc["datasetVersion"]["merkle_root"] == version == doc["identifier"]
    assert doc["datasetVersion"]["transform"] == "ingest"
    for term in ("rai:dataCollection", "rai:dataBiases", "rai:personalSensitiveInformation",
                 "rai:dataLimitations", "rai:dataUseCases"):
        assert doc[term]
    sources = {s["name"]: s for s in doc["isBasedOn"]}
    assert sources["tweets"]["license"] == "CC-BY-4.0"
    assert sources["tweets"]["contributor"]["name"] == "ann"
    assert doc["knownHarms"]["attribution"]["top_sources"]["bm25"][0]["source"] == "tweets"
    assert "tweets" in doc["rai:dataBiases"]
    assert doc["distribution"][0]["sha256"] == sha256_file(result.records)


def test_raw_text_export_is_logged_as_a_disclosure(database: Database, tmp_path: Path) -> None:
    version, records = _version(database)
    ledger = Ledger(database)
    masked = export_croissant(database, version, tmp_path / "masked", ledger=ledger)
    raw = export_croissant(database, version, tmp_path / "raw", include_text=True,
                           reason="audit", ledger=ledger)

    lines = [json.loads(line) for line in raw.records.read_text().splitlines()]
    assert {line["text"] for line in lines} == {r.text for r in records}
    assert "@user0" not in masked.records.read_text()
    stages = [e.stage for e in ledger.entries()]
    assert stages == ["export", "disclosure", "export"]
    last = ledger.entries()[-1]
    assert last.outputs["files"] == raw.digests
    assert raw.digests["records.jsonl"] == sha256_file(raw.records)
    assert last.settings["include_text"] is True


def test_raw_text_export_needs_a_reason_logged_with_actor_and_record_ids(
        database: Database, tmp_path: Path) -> None:
    from harmtrace.errors import ConfigError

    version, records = _version(database)
    ledger = Ledger(database)
    with pytest.raises(ConfigError, match="reason"):
        export_croissant(database, version, tmp_path / "raw", include_text=True, ledger=ledger)
    assert not (tmp_path / "raw").exists() and ledger.entries() == []

    export_croissant(database, version, tmp_path / "raw", include_text=True,
                     reason="court order 12", actor="ann", ledger=ledger)
    disclosure = next(e for e in ledger.entries() if e.stage == "disclosure")
    assert (disclosure.actor, disclosure.settings["reason"]) == ("ann", "court order 12")
    assert disclosure.outputs["record_ids"] == sorted(r.record_id for r in records)


def test_export_folder_must_be_new_empty_or_an_earlier_export(database: Database,
                                                               tmp_path: Path) -> None:
    from harmtrace.errors import ConfigError

    version, _ = _version(database)
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    for bad, match in ((a_file, "must be a folder"), (a_file / "sub", "is a file"),
                       (busy, "holds other files")):
        with pytest.raises(ConfigError, match=match):
            export_croissant(database, version, bad)
    assert a_file.read_text() == "keep me" and sorted(os.listdir(busy)) == ["notes.txt"]
    assert Ledger(database).entries() == []

    empty = tmp_path / "empty"
    empty.mkdir()
    first = export_croissant(database, version, empty)
    again = export_croissant(database, version, empty)  # an earlier export is replaced
    assert first.digests[RECORDS_FILE] == again.digests[RECORDS_FILE]
