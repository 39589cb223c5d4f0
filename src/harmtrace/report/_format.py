"""Numbers and free text as they appear in a report; ``MISSING`` stands for an absent value."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from harmtrace.report.redact import mask_text

__all__ = ["MISSING", "as_float", "ci", "num", "pct", "pp", "pval", "shorten", "text"]

MISSING = "—"


def as_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def text(value: Any) -> str:
    """Any value as masked text; ``None`` as :data:`MISSING`."""
    return MISSING if value is None else mask_text(str(value))


def shorten(value: Any, limit: int) -> str:
    """Masked text cut to ``limit`` characters; masking comes first so no detail is cut open."""
    masked = text(value)
    return masked if len(masked) <= limit else masked[: limit - 1].rstrip() + "…"


def num(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant digits; other values as masked text."""
    number = as_float(value)
    if number is None:
        return text(value)
    return "nan" if math.isnan(number) else f"{number:.{digits}g}"


def pct(value: Any) -> str:
    """A rate in [0, 1] as a percentage with one decimal."""
    number = as_float(value)
    return text(value) if number is None else f"{100 * number:.1f}%"


def pp(value: Any) -> str:
    """A difference of rates as signed percentage points."""
    number = as_float(value)
    return text(value) if number is None else f"{100 * number:+.1f} pp"


def pval(value: Any) -> str:
    """A p-value: three significant digits, or ``< 0.001``."""
    number = as_float(value)
    if number is None:
        return text(value)
    return "< 0.001" if number < 1e-3 else f"{number:.3g}"


def ci(bounds: Any, fmt=pct) -> str:
    """A ``[lo, hi]`` interval formatted with ``fmt``; anything else as :data:`MISSING`."""
    if not isinstance(bounds, Sequence) or isinstance(bounds, str) or len(bounds) != 2:
        return MISSING
    return f"[{fmt(bounds[0])}, {fmt(bounds[1])}]"
