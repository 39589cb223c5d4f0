"""Write an investigation's report: ``report.html``, ``report.md`` and ``summary.json``.

``report.html`` is self-contained (inline CSS, figures as inline base64 PNG); ``report.md``
carries the same sections with every figure's numbers in its tables. ``summary.json`` is the
summary as given, except that every free-text string in it has been masked.

Masking happens twice on purpose: the summary and the top records are masked before any
section is built, and the templates mask every value they print again (a jinja ``finalize``
hook), so a string added to a template later cannot skip it. HTML is also autoescaped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup

from harmtrace._logging import get_logger
from harmtrace.errors import ConfigError, InputDataError
from harmtrace.hashing import sha256_json
from harmtrace.report._format import text
from harmtrace.report._sections import TOP_RECORD_COLUMNS, build_sections
from harmtrace.report.redact import mask_text
from harmtrace.workspace import atomic_write_json, atomic_write_text

__all__ = ["ReportPaths", "masked_summary", "write_report"]

log = get_logger(__name__)

# Values under these keys are identifiers or timestamps, never personal text; masking them
# could only corrupt them (a timestamp "2024-05-01 12:30:00" has phone-like digit groups).
_IDENTIFIER_KEYS = frozenset({"created_at", "harmtrace_version", "head", "settings_digest"})
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


@dataclass(frozen=True)
class ReportPaths:
    """Where :func:`write_report` wrote its three files."""

    html: Path
    markdown: Path
    summary_json: Path


def _mask_value(value: Any, key: str | None) -> Any:
    if isinstance(value, str):
        return value if key in _IDENTIFIER_KEYS else mask_text(value)
    if isinstance(value, Mapping):
        return masked_summary(value)
    if isinstance(value, (list, tuple)):
        return [_mask_value(item, key) for item in value]
    if isinstance(value, np.ndarray):
        return _mask_value(value.tolist(), key)
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float)):
        return value
    # Anything else would reach JSON through str(); mask that text now.
    return mask_text(str(value))


def masked_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-ready copy of ``summary`` with every free-text string and key masked.

    Identifiers (``head``, ``settings_digest``, ``created_at``, ``harmtrace_version``) are kept
    as they are; numpy scalars and arrays become Python numbers and lists.
    """
    masked: dict[str, Any] = {}
    for key, value in summary.items():
        new_key = mask_text(str(key))
        if new_key in masked:
            raise InputDataError(
                f"summary keys {key!r} and another key both mask to {new_key!r}; "
                "rename one of them so that no personal detail is used as a key"
            )
        masked[new_key] = _mask_value(value, str(key))
    return masked


def _png_data(value: str) -> Markup:
    """Base64 PNG text, safe to place in an attribute because of its alphabet."""
    if not _BASE64.fullmatch(value):
        raise InputDataError("figure data is not base64 text; this is a bug in harmtrace.report")
    return Markup(value)


def _finalize_html(value: Any) -> Any:
    if isinstance(value, Markup) or not isinstance(value, str):
        return value
    return mask_text(value)


def _escape_markdown(value: str) -> str:
    """``value`` as literal Markdown text on one line: no HTML, links, code or table breaks."""
    value = value.replace("\\", "\\\\").replace("&", "&amp;")
    value = value.replace("<", "&lt;").replace(">", "&gt;")
    value = value.replace("|", "\\|").replace("`", "\\`").replace("](", "]\\(")
    return " ".join(value.split())


def _finalize_markdown(value: Any) -> Any:
    if isinstance(value, Markup) or not isinstance(value, str):
        return value
    return _escape_markdown(mask_text(value))


@cache
def _environment(markdown: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("harmtrace.report", "templates"),
        autoescape=not markdown,
        finalize=_finalize_markdown if markdown else _finalize_html,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["png_data"] = _png_data
    return env


def _validate(summary: Any, out_dir: Path, top_records: Any) -> None:
    if not isinstance(summary, Mapping):
        raise InputDataError(
            f"summary must be a dict, got {type(summary).__name__}; load summary.json first"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir {out_dir} is a file; pass a folder for the report")
    if top_records is None:
        return
    if not isinstance(top_records, pd.DataFrame):
        raise InputDataError(
            f"top_records must be a pandas DataFrame or None, got {type(top_records).__name__}"
        )
    missing = [c for c in TOP_RECORD_COLUMNS if c not in top_records.columns]
    if missing:
        raise InputDataError(
            f"top_records lacks columns {missing}; it needs {list(TOP_RECORD_COLUMNS)} "
            "plus one float column of scores per method"
        )


def _header(summary: Mapping[str, Any]) -> dict[str, str]:
    scenario = summary.get("scenario") if isinstance(summary.get("scenario"), Mapping) else {}
    return {
        "scenario": text(scenario.get("name")),
        "kind": text(scenario.get("kind")),
        "description": text(scenario.get("description")),
        "version": text(summary.get("harmtrace_version")),
        "created_at": text(summary.get("created_at")),
    }


def write_report(
    summary: Mapping[str, Any],
    out_dir: str | Path,
    *,
    top_records: pd.DataFrame | None = None,
    max_examples: int = 5,
    max_records: int = 20,
) -> ReportPaths:
    """Write ``report.html``, ``report.md`` and ``summary.json`` into ``out_dir``.

    Parameters
    ----------
    summary:
        The investigation summary (see the module docs for its keys). Missing sections are
        shown as "not run"; missing values as "—".
    out_dir:
        Folder for the three files; created when missing. Existing files are replaced.
    top_records:
        Optional table with columns ``rank, record_id, source, text`` and one float column of
        scores per method; texts are masked and cut to 200 characters.
    max_examples, max_records:
        How many example generations (default 5) and top records (default 20) to show.

    Every file is written atomically; all three are rendered before the first is written.
    """
    out_dir = Path(out_dir)
    _validate(summary, out_dir, top_records)
    masked = masked_summary(summary)
    digest = sha256_json(masked)
    context = {
        "header": _header(masked),
        "sections": build_sections(
            masked, top_records, summary_digest=digest,
            max_examples=max_examples, max_records=max_records,
        ),
    }
    html = _environment(False).get_template("report.html.j2").render(context)
    markdown = _environment(True).get_template("report.md.j2").render(context)

    paths = ReportPaths(out_dir / "report.html", out_dir / "report.md", out_dir / "summary.json")
    atomic_write_text(paths.html, html)
    atomic_write_text(paths.markdown, markdown)
    atomic_write_json(paths.summary_json, masked)
    log.info("wrote report to %s", out_dir)
    return paths
