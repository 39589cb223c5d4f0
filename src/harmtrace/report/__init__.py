"""Report stage: masked, self-contained HTML and Markdown reports of an investigation."""

from harmtrace.report.redact import PiiKind, Span, find_pii, mask_text, normalise_text
from harmtrace.report.render import ReportPaths, masked_summary, write_report

__all__ = [
    "PiiKind",
    "ReportPaths",
    "Span",
    "find_pii",
    "mask_text",
    "masked_summary",
    "normalise_text",
    "write_report",
]
