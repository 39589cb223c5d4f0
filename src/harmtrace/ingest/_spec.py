"""How one source is described: its file, format, text field and provenance."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from harmtrace.errors import ConfigError
from harmtrace.store import current_user

__all__ = ["OnDuplicate", "SourceFormat", "SourceSpec"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class SourceFormat(StrEnum):
    """File formats; any of them may be gzip-compressed (a path ending in ``.gz``)."""

    JSONL = "jsonl"  # one JSON object per line
    CSV = "csv"  # a header row, then one record per row
    JSON = "json"  # one array of objects
    TEXT = "text"  # plain text, cut into passages of ``passage_lines`` non-empty lines


class OnDuplicate(StrEnum):
    """What to do with a record whose text repeats an earlier record of the same source."""

    ERROR = "error"
    KEEP_FIRST = "keep-first"


@dataclass(frozen=True, kw_only=True)
class SourceSpec:
    """One source to ingest.

    Parameters
    ----------
    name:
        Source name, letters, digits, ``_``, ``.`` and ``-`` (first a letter or digit); it
        prefixes every record id.
    path:
        The data file; a ``.gz`` suffix means gzip-compressed.
    format:
        ``"jsonl"``, ``"csv"``, ``"json"`` or ``"text"``.
    text_field:
        Field holding the record text (jsonl, csv, json). Default ``"text"``.
    licence, origin, description:
        Provenance: the licence, where the data came from (URL or words), a note.
        ``licence`` and ``origin`` default to ``"unknown"``.
    added_by:
        Who adds the source; default the current login name.
    max_records:
        Read at most this many records (>= 1); default ``None``, all of them.
    on_duplicate:
        ``"error"`` (default) or ``"keep-first"`` for a text repeated within the source.
    passage_lines:
        For ``"text"``: non-empty lines per passage (>= 1). Default 8.
    """

    name: str
    path: Path
    format: SourceFormat
    text_field: str = "text"
    licence: str = "unknown"
    origin: str = "unknown"
    added_by: str = field(default_factory=current_user)
    description: str = ""
    max_records: int | None = None
    on_duplicate: OnDuplicate = OnDuplicate.ERROR
    passage_lines: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigError(
                f"source name {self.name!r} is not allowed; use letters, digits, '_', '.' "
                "and '-', starting with a letter or digit"
            )
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "format", self._enum(SourceFormat, "format"))
        object.__setattr__(self, "on_duplicate", self._enum(OnDuplicate, "on_duplicate"))
        if not isinstance(self.text_field, str) or not self.text_field:
            raise self._error("text_field", self.text_field, "a non-empty field name")
        if self.max_records is not None and not _is_positive_int(self.max_records):
            raise self._error("max_records", self.max_records, "an integer >= 1 or None")
        if not _is_positive_int(self.passage_lines):
            raise self._error("passage_lines", self.passage_lines, "an integer >= 1")

    def _enum(self, enum: type[StrEnum], name: str) -> Any:
        value = getattr(self, name)
        try:
            return enum(value)
        except ValueError:
            allowed = ", ".join(repr(member.value) for member in enum)
            raise self._error(name, value, f"one of {allowed}") from None

    def _error(self, name: str, value: object, allowed: str) -> ConfigError:
        return ConfigError(
            f"source '{self.name}': {name} = {value!r} is not allowed; it must be {allowed}"
        )


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
