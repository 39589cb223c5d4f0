"""Readers that turn one source file into records, with errors that name file and line."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harmtrace._logging import get_logger
from harmtrace.errors import InputDataError
from harmtrace.hashing import canonical_json
from harmtrace.ingest._spec import OnDuplicate, SourceFormat, SourceSpec
from harmtrace.store import Record

__all__ = ["read_source"]

log = get_logger(__name__)

# (line where the row starts, the row's fields)
Row = tuple[int, dict[str, Any]]


def read_source(spec: SourceSpec) -> list[Record]:
    """Read and check every record of ``spec``; nothing is written anywhere.

    Records keep the row order of the file (``position`` counts rows from 0); fields other
    than ``spec.text_field`` go to ``Record.meta`` as strings (non-strings as JSON). Raises
    :class:`InputDataError` naming the file, the 1-based line and the field for malformed
    JSON, a missing or empty text field, bytes that are not UTF-8, a source without
    records and (with ``on_duplicate="error"``) a text repeated within the source.
    """
    text = _decode(spec.path, _read_bytes(spec))
    if spec.format is SourceFormat.TEXT:
        rows: Iterator[Row] = _passages(text, spec.text_field, spec.passage_lines)
    else:
        rows = _ROW_READERS[spec.format](text, spec)
    records = _to_records(rows, spec)
    if not records:
        raise InputDataError(
            f"{spec.path}, line 1: source '{spec.name}' has no records (the file is empty, "
            "blank or an empty array); point path at the right file or drop the source"
        )
    log.info("read %d records from source '%s' (%s)", len(records), spec.name, spec.path)
    return records


def _read_bytes(spec: SourceSpec) -> bytes:
    try:
        if spec.path.suffix == ".gz":
            with gzip.open(spec.path, "rb") as handle:
                return handle.read()
        return spec.path.read_bytes()
    except FileNotFoundError as err:
        raise InputDataError(
            f"{spec.path}: file not found; fix the path of source '{spec.name}'"
        ) from err
    except (gzip.BadGzipFile, EOFError) as err:
        raise InputDataError(
            f"{spec.path}: not a complete gzip file ({err}); re-compress it, or drop the "
            "'.gz' suffix if it is not compressed"
        ) from err


def _decode(path: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputDataError(
            f"{path}, line {line}: byte 0x{data[err.start]:02x} is not valid UTF-8; re-encode "
            "the file as UTF-8 (for example `iconv -f latin1 -t utf-8 IN > OUT`)"
        ) from err
    return text.removeprefix("\ufeff")


def _jsonl_rows(text: str, spec: SourceSpec) -> Iterator[Row]:
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputDataError(
                f"{spec.path}, line {line_no}: not valid JSON ({err.msg}, column {err.colno}); "
                "each line of a JSONL file must hold one complete JSON object"
            ) from err
        yield line_no, _require_object(obj, spec.path, line_no)


def _csv_rows(text: str, spec: SourceSpec) -> Iterator[Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        _check_header(header, spec)
        last = reader.line_num
        for row in reader:
            start, last = last + 1, reader.line_num
            if not row:  # a blank line; a quoted empty cell gives [""] and is checked below
                continue
            if len(row) != len(header):
                raise InputDataError(
                    f"{spec.path}, line {start}: the row has {len(row)} fields but the header "
                    f"has {len(header)}; quote fields that contain commas or newlines"
                )
            yield start, dict(zip(header, row, strict=True))
    except csv.Error as err:
        raise InputDataError(
            f"{spec.path}, line {reader.line_num}: not valid CSV ({err}); fix the quoting"
        ) from err


def _check_header(header: list[str], spec: SourceSpec) -> None:
    if spec.text_field not in header:
        raise InputDataError(
            f"{spec.path}, line 1: the CSV header has no field '{spec.text_field}' (fields: "
            f"{', '.join(header)}); set text_field to the column that holds the text. A header "
            "row is required"
        )
    if len(set(header)) != len(header):
        raise InputDataError(f"{spec.path}, line 1: the CSV header repeats a field name; rename it")


def _json_rows(text: str, spec: SourceSpec) -> Iterator[Row]:
    """Items of one JSON array, each with the line it starts on."""
    lines = _LineCounter(text)
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    if pos == len(text):
        return
    if text[pos] != "[":
        raise _json_error(spec, lines.at(pos), "the file must hold one JSON array of objects")
    pos = _skip_space(text, pos + 1)
    while not text.startswith("]", pos):
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise _json_error(spec, err.lineno, f"not valid JSON ({err.msg})") from err
        yield lines.at(pos), _require_object(obj, spec.path, lines.at(pos))
        pos = _skip_space(text, end)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif not text.startswith("]", pos):
            raise _json_error(spec, lines.at(pos), "expected ',' or ']' after an array item")
    if _skip_space(text, pos + 1) != len(text):
        raise _json_error(spec, lines.at(pos), "text follows the closing ']' of the array")


def _json_error(spec: SourceSpec, line: int, what: str) -> InputDataError:
    return InputDataError(
        f"{spec.path}, line {line}: {what}; a 'json' source is one array of objects "
        "(use format 'jsonl' for one object per line)"
    )


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


class _LineCounter:
    """1-based line of a position in ``text``, for positions that only move forward."""

    def __init__(self, text: str) -> None:
        self._text, self._pos, self._line = text, 0, 1

    def at(self, pos: int) -> int:
        self._line += self._text.count("\n", self._pos, pos)
        self._pos = pos
        return self._line


def _passages(text: str, field: str, passage_lines: int) -> Iterator[Row]:
    """Passages of ``passage_lines`` non-empty lines; blank lines are skipped."""
    lines: list[str] = []
    start = 0
    for line_no, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        start = start if lines else line_no
        lines.append(line)
        if len(lines) == passage_lines:
            yield start, {field: "\n".join(lines), "line": str(start)}
            lines = []
    if lines:
        yield start, {field: "\n".join(lines), "line": str(start)}


def _require_object(obj: Any, path: Path, line: int) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InputDataError(
            f"{path}, line {line}: expected a JSON object with a text field, found a "
            f"{type(obj).__name__}; wrap each record as {{\"text\": ...}}"
        )
    return obj


def _to_records(rows: Iterator[Row], spec: SourceSpec) -> list[Record]:
    first_line: dict[str, int] = {}  # content hash -> line of its first row
    records: list[Record] = []
    skipped = 0
    for position, (line, fields) in enumerate(rows):
        if spec.max_records is not None and len(records) >= spec.max_records:
            break
        text, meta = _split_fields(fields, spec, line)
        record = Record.create(source=spec.name, position=position, text=text, meta=meta)
        if record.content_hash in first_line:
            _on_duplicate(spec, line, first_line[record.content_hash])
            skipped += 1
            continue
        first_line[record.content_hash] = line
        records.append(record)
    if skipped:
        log.info("source '%s': skipped %d rows repeating an earlier row", spec.name, skipped)
    return records


def _split_fields(fields: dict[str, Any], spec: SourceSpec, line: int) -> tuple[str, dict]:
    where, name = f"{spec.path}, line {line}", spec.text_field
    if name not in fields:
        raise InputDataError(
            f"{where}: field '{name}' is missing (fields: {', '.join(sorted(fields))}); set "
            "text_field to the field that holds the text"
        )
    text = fields[name]
    if not isinstance(text, str):
        raise InputDataError(
            f"{where}: field '{name}' holds {type(text).__name__}, not text; store the text "
            "as a string"
        )
    if not text.strip():
        raise InputDataError(
            f"{where}: field '{name}' is empty or only whitespace; fill it in or remove the row"
        )
    meta = {key: _as_text(value) for key, value in fields.items() if key != name}
    return text, meta


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else canonical_json(value)


def _on_duplicate(spec: SourceSpec, line: int, first: int) -> None:
    if spec.on_duplicate is OnDuplicate.ERROR:
        raise InputDataError(
            f"{spec.path}, line {line}: field '{spec.text_field}' repeats the text of line "
            f"{first}; remove one of them, or set on_duplicate = \"keep-first\" to keep line "
            f"{first} and skip the repeats"
        )


_ROW_READERS: dict[SourceFormat, Callable[[str, SourceSpec], Iterator[Row]]] = {
    SourceFormat.JSONL: _jsonl_rows,
    SourceFormat.CSV: _csv_rows,
    SourceFormat.JSON: _json_rows,
}
