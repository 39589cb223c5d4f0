"""Report figures as base64 PNG data, drawn with matplotlib's Agg canvas.

Figures are built from :class:`matplotlib.figure.Figure` directly, never through pyplot, so
making a report neither switches the caller's backend nor leaves figures open.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harmtrace.report._format import as_float, text

__all__ = ["seed_rates_png", "source_scores_png"]

_DPI = 100


def _to_base64(figure: Figure) -> str:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    # No "Software" metadata: the same inputs then give the same bytes.
    figure.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _error_bars(values: list[float], bounds: list[Any]) -> list[list[float]]:
    """Asymmetric error lengths ``[[below...], [above...]]``; 0 where a CI is missing."""
    below, above = [], []
    for value, pair in zip(values, bounds, strict=True):
        lo, hi = (pair if isinstance(pair, Sequence) and len(pair) == 2 else (None, None))
        lo, hi = as_float(lo), as_float(hi)
        below.append(max(value - lo, 0.0) if lo is not None else 0.0)
        above.append(max(hi - value, 0.0) if hi is not None else 0.0)
    return [below, above]


def source_scores_png(sources: Sequence[Mapping[str, Any]], *, title: str) -> str | None:
    """Horizontal bars of each source's score with its 95% CI; ``None`` without scores."""
    rows = [row for row in sources if as_float(row.get("score")) is not None]
    if not rows:
        return None
    labels = [text(row.get("source")) for row in rows]
    scores = [as_float(row["score"]) for row in rows]
    errors = _error_bars(scores, [row.get("ci") for row in rows])

    figure = Figure(figsize=(6.5, 0.45 * len(rows) + 1.2))
    axes = figure.subplots()
    # Highest-ranked source at the top.
    positions = list(range(len(rows)))[::-1]
    axes.barh(positions, scores, xerr=errors, color="#4c72b0", ecolor="#222222", capsize=3)
    axes.set_yticks(positions, labels)
    axes.axvline(0.0, color="#888888", linewidth=0.8)
    axes.set_xlabel("source score (95% CI)")
    axes.set_title(text(title))
    return _to_base64(figure)


def seed_rates_png(
    conditions: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str]
) -> str | None:
    """Per-seed harm rates of each condition, with the mean and its 95% CI; ``None`` if empty."""
    names = [name for name, cond in conditions.items() if cond.get("harm_rates")]
    if not names:
        return None
    figure = Figure(figsize=(6.5, 3.6))
    axes = figure.subplots()
    for x, name in enumerate(names):
        cond = conditions[name]
        rates = [as_float(r) for r in cond["harm_rates"]]
        rates = [100 * r for r in rates if r is not None]
        axes.scatter([x] * len(rates), rates, color="#4c72b0", alpha=0.7, zorder=3)
        mean = as_float(cond.get("mean"))
        if mean is not None:
            errors = _error_bars([100 * mean], [_scaled(cond.get("ci"))])
            axes.errorbar([x + 0.15], [100 * mean], yerr=errors, fmt="D", color="#c44e52",
                          capsize=4, zorder=4)
    axes.set_xticks(range(len(names)), [text(labels.get(n, n)) for n in names])
    axes.set_ylabel("harm rate (%)")
    axes.set_title("Harm rate per seed (dots) and mean with 95% CI (diamonds)")
    return _to_base64(figure)


def _scaled(bounds: Any) -> list[float | None] | None:
    if not isinstance(bounds, Sequence) or len(bounds) != 2:
        return None
    return [None if as_float(b) is None else 100 * as_float(b) for b in bounds]
