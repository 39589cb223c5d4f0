"""Ingest reads every format, checks everything before writing, and names bad lines."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from harmtrace.errors import ConfigError, InputDataError
from harmtrace.hashing import sha256_file
from harmtrace.ingest import SourceSpec, ingest, read_source
from harmtrace.ledger import Ledger
from harmtrace.store import Database
from harmtrace.store import schema as t


def _write(path: Path, content: str | bytes) -> Path:
    data = content.encode("utf-8") if isinstance(content, str) else content
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def _count(db: Database, table) -> int:
    with db.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def test_gzipped_jsonl_keeps_text_and_extra_fields_as_strings(tmp_path: Path) -> None:
    path = _write(tmp_path / "chat.jsonl.gz", _jsonl([
        {"text": "first", "id": 7, "tags": ["a"]},
        {"text": "second", "id": 8, "lang": "en"},
    ]))

    records = read_source(SourceSpec(name="chat", path=path, format="jsonl"))

    assert [r.text for r in records] == ["first", "second"]
    assert [r.position for r in records] == [0, 1]
    assert records[0].meta == {"id": "7", "tags": '["a"]'}
    assert records[1].meta == {"id": "8", "lang": "en"}
    assert records[0].record_id == f"chat-{records[0].content_hash[:16]}"


def test_csv_rows_keep_quoted_newlines_and_other_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "forum.csv", 'id,body,label\n1,"two\nlines",x\n2,plain,y\n')

    records = read_source(SourceSpec(name="forum", path=path, format="csv", text_field="body"))

    assert [r.text for r in records] == ["two\nlines", "plain"]
    assert records[0].meta == {"id": "1", "label": "x"}


def test_json_array_reads_each_object(tmp_path: Path) -> None:
    path = _write(tmp_path / "qa.json", '[\n  {"text": "a", "n": 1},\n  {"text": "b"}\n]\n')
    records = read_source(SourceSpec(name="qa", path=path, format="json"))
    assert [r.text for r in records] == ["a", "b"]


def test_text_is_cut_into_passages_of_passage_lines_non_empty_lines(tmp_path: Path) -> None:
    lines = [f"line {i}" for i in range(7)]
    path = _write(tmp_path / "book.txt.gz", "\n\n".join(lines) + "\n")

    records = read_source(SourceSpec(name="book", path=path, format="text", passage_lines=3))

    assert [r.text for r in records] == [
        "line 0\nline 1\nline 2", "line 3\nline 4\nline 5", "line 6"
    ]
    assert [r.meta["line"] for r in records] == ["1", "7", "13"]


BAD_INPUTS = {
    "malformed json line": (
        "jsonl", '{"text": "a"}\n{"text": oops}\n', 2, "not valid JSON"),
    "missing text field": (
        "jsonl", '{"text": "a"}\n\n{"body": "b", "id": 1}\n', 3, "fields: body, id"),
    "whitespace text": (
        "jsonl", '{"text": "a"}\n{"text": "  \\t "}\n', 2, "empty or only whitespace"),
    "text not a string": (
        "jsonl", '{"text": "a"}\n{"text": null}\n', 2, "not text"),
    "row not an object": (
        "jsonl", '{"text": "a"}\n["text"]\n', 2, "JSON object"),
    "non utf-8 bytes": (
        "jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', 2, "re-encode the file as UTF-8"),
    "empty source": (
        "jsonl", "\n\n", 1, "no records"),
    "duplicate record": (
        "jsonl", _jsonl([{"text": "a"}, {"text": "b"}, {"text": "a"}]), 3,
        'repeats the text of line 1; remove one of them, or set on_duplicate = "keep-first"'),
    "csv without the text column": (
        "csv", "body,id\nx,1\n", 1, "fields: body, id"),
    "csv empty text": (
        "csv", 'text,id\nok,1\n"",2\n', 3, "empty or only whitespace"),
    "csv ragged row": (
        "csv", "text,id\nok,1\nbad,2,3\n", 3, "3 fields"),
    "csv non utf-8 bytes": (
        "csv", b"text\nok\nna\xefve\n", 3, "UTF-8"),
    "json malformed item": (
        "json", '[\n {"text": "a"},\n {"text": }\n]\n', 3, "not valid JSON"),
    "json missing field": (
        "json", '[\n {"text": "a"},\n\n {"body": "b"}\n]\n', 4, "field 'text' is missing"),
    "json not an array": (
        "json", '{"text": "a"}', 1, "one JSON array"),
    "empty text file": (
        "text", "  \n\n", 1, "no records"),
}


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_names_file_line_and_fix(tmp_path: Path, kind: str) -> None:
    fmt, content, line, message = BAD_INPUTS[kind]
    path = _write(tmp_path / f"bad-source.{fmt}", content)

    with pytest.raises(InputDataError) as caught:
        read_source(SourceSpec(name="bad", path=path, format=fmt))

    assert f"bad-source.{fmt}, line {line}:" in str(caught.value)
    assert message in str(caught.value)


def test_duplicates_are_skipped_with_keep_first(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", _jsonl([{"text": "a"}, {"text": "b"}, {"text": "a"}]))
    spec = SourceSpec(name="d", path=path, format="jsonl", on_duplicate="keep-first")
    records = read_source(spec)
    assert [(r.text, r.position) for r in records] == [("a", 0), ("b", 1)]


def test_max_records_stops_reading(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.jsonl", _jsonl([{"text": str(i)} for i in range(10)]))
    spec = SourceSpec(name="m", path=path, format="jsonl", max_records=4)
    assert [r.text for r in read_source(spec)] == ["0", "1", "2", "3"]


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    spec = SourceSpec(name="gone", path=tmp_path / "gone.jsonl", format="jsonl")
    with pytest.raises(InputDataError, match="gone.jsonl: file not found"):
        read_source(spec)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("format", "parquet", "'jsonl', 'csv', 'json', 'text'"),
        ("on_duplicate", "drop", "'error', 'keep-first'"),
        ("max_records", 0, "an integer >= 1 or None"),
        ("passage_lines", 0, "an integer >= 1"),
        ("text_field", "", "a non-empty field name"),
    ],
)
def test_bad_spec_settings_name_field_and_allowed_values(
    field: str, value: object, allowed: str
) -> None:
    settings = {"name": "s", "path": "s.jsonl", "format": "jsonl", field: value}
    with pytest.raises(ConfigError) as caught:
        SourceSpec(**settings)
    assert f"{field} = {value!r}" in str(caught.value)
    assert allowed in str(caught.value)


def test_a_source_name_must_be_usable_in_record_ids() -> None:
    with pytest.raises(ConfigError, match="source name"):
        SourceSpec(name="has space", path="x.jsonl", format="jsonl")


def _two_specs(tmp_path: Path, bad: bool = False) -> list[SourceSpec]:
    good = _write(tmp_path / "good.jsonl.gz", _jsonl([{"text": f"g{i}"} for i in range(5)]))
    other_rows = "text\nc1\nc2\n" + ("\n" if not bad else '""\n')
    other = _write(tmp_path / "other.csv", other_rows)
    return [
        SourceSpec(name="good", path=good, format="jsonl", licence="MIT", origin="unit test"),
        SourceSpec(name="other", path=other, format="csv"),
    ]


def test_nothing_is_written_when_any_source_is_bad(database: Database, tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="other.csv, line 4"):
        ingest(database, _two_specs(tmp_path, bad=True), actor="ann")

    for table in (t.sources, t.records, t.dataset_versions, t.version_records, t.ledger):
        assert _count(database, table) == 0, table.name


def test_ingest_stores_records_version_and_a_ledger_entry(
    database: Database, tmp_path: Path
) -> None:
    specs = _two_specs(tmp_path)
    ledger = Ledger(database, head_path=tmp_path / "head.json")

    result = ingest(database, specs, actor="ann", ledger=ledger)

    assert (result.n_records, dict(result.per_source)) == (7, {"good": 5, "other": 2})
    assert len(database.version_records(result.version_id)) == 7
    assert {s.name: s.n_records for s in database.get_sources()} == {"good": 5, "other": 2}
    entry = ledger.entries()[-1]
    assert (entry.seq, entry.stage, entry.actor) == (result.ledger_seq, "ingest", "ann")
    assert entry.inputs["good"]["sha256"] == sha256_file(specs[0].path)
    assert entry.outputs["version_id"] == result.version_id
    assert ledger.verify().ok


def test_ingesting_the_same_files_again_changes_nothing(
    database: Database, tmp_path: Path
) -> None:
    specs = _two_specs(tmp_path)
    first = ingest(database, specs, actor="ann")
    second = ingest(database, specs, actor="ann")

    assert second.version_id == first.version_id
    assert _count(database, t.records) == 7
    assert _count(database, t.dataset_versions) == 1
    assert Ledger(database).verify().n_entries == 2


def test_repeated_source_names_are_refused(database: Database, tmp_path: Path) -> None:
    spec = _two_specs(tmp_path)[0]
    with pytest.raises(ConfigError, match="good is given more than once"):
        ingest(database, [spec, spec])
