"""The report's sections as plain parts (facts, tables, figures, lists) for both templates.

Every builder takes the already masked summary and returns a :class:`Section`; a section whose
key is missing has ``ran=False`` and the templates print "not run". Every string a builder puts
into a part goes through :mod:`harmtrace.report._format`, which masks free text again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd

from harmtrace.report import _figures
from harmtrace.report._format import MISSING, as_float, ci, num, pct, pp, pval, shorten, text

__all__ = ["Facts", "Figure", "Heading", "Items", "Section", "Table", "build_sections"]

CONDITION_LABELS = {"full": "full", "topk": "top-k removed", "random": "random-k removed"}
TOP_RECORD_COLUMNS = ("rank", "record_id", "source", "text")
_TEXT_LIMIT = 200
_EXAMPLE_LIMIT = 300


@dataclass(frozen=True)
class Heading:
    text: str
    kind: ClassVar[str] = "heading"


@dataclass(frozen=True)
class Facts:
    """Label and value pairs."""

    items: tuple[tuple[str, str], ...]
    kind: ClassVar[str] = "facts"


@dataclass(frozen=True)
class Table:
    caption: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    kind: ClassVar[str] = "table"


@dataclass(frozen=True)
class Figure:
    """A PNG as base64 text; the Markdown twin names it and points to the HTML report."""

    caption: str
    png_base64: str
    kind: ClassVar[str] = "figure"


@dataclass(frozen=True)
class Items:
    caption: str
    items: tuple[str, ...]
    kind: ClassVar[str] = "items"


@dataclass(frozen=True)
class Section:
    title: str
    ran: bool
    parts: tuple[Any, ...] = field(default_factory=tuple)


def _section(title: str, parts: list[Any]) -> Section:
    return Section(title, True, tuple(part for part in parts if part is not None))


def _figure(caption: str, png: str | None) -> Figure | None:
    return None if png is None else Figure(caption, png)


def behaviour_section(summary: Mapping[str, Any], *, max_examples: int) -> Section:
    beh = summary.get("behaviour")
    if not isinstance(beh, Mapping):
        return Section("1. Behaviour", False)
    floor = beh.get("floor")
    floor_text = "not given"
    if isinstance(floor, Mapping):
        floor_text = f"{pct(floor.get('harm_rate'))} (95% CI {ci(floor.get('ci'))})"
        if floor.get("description"):
            floor_text += f": {text(floor['description'])}"
    facts = Facts((
        ("Behaviour", text(beh.get("name"))),
        ("Scorer", text(beh.get("scorer"))),
        ("Threshold", num(beh.get("threshold"))),
        ("Probes × samples", f"{num(beh.get('n_probes'))} × {num(beh.get('n_samples'))}"),
        ("Harm rate", f"{pct(beh.get('harm_rate'))} (95% CI {ci(beh.get('ci'))})"),
        ("Scorer floor (reference model)", floor_text),
    ))
    examples = [shorten(e, _EXAMPLE_LIMIT) for e in (beh.get("examples") or [])[:max_examples]]
    items = Items("Example harmful generations (masked)", tuple(examples)) if examples else None
    return _section("1. Behaviour", [facts, items])


def data_section(summary: Mapping[str, Any]) -> Section:
    data = summary.get("dataset")
    if not isinstance(data, Mapping):
        return Section("2. Data", False)
    facts = Facts((
        ("Dataset version", text(data.get("version"))),
        ("Records", num(data.get("n_records"), digits=12)),
    ))
    rows = tuple(
        (text(s.get("name")), num(s.get("n_records"), digits=12), text(s.get("origin")),
         text(s.get("licence")))
        for s in data.get("sources") or [] if isinstance(s, Mapping)
    )
    table = Table("Records per source", ("source", "records", "origin", "licence"), rows)
    return _section("2. Data", [facts, table if rows else None])


def _method_parts(name: str, method: Mapping[str, Any], k: Any) -> list[Any]:
    sources = [s for s in method.get("sources") or [] if isinstance(s, Mapping)]
    facts = Facts((
        ("Description", text(method.get("description"))),
        ("Sign", text(method.get("sign"))),
        *((("Citation", text(method.get("citation"))),) if method.get("citation") else ()),
    ))
    rows = tuple(
        (text(s.get("source")), num(s.get("score")), ci(s.get("ci"), num),
         pct(s.get("share_topk")), num(s.get("n_records"), digits=12))
        for s in sources
    )
    headers = ("source", "score", "95% CI", f"share of top-{text(k)}", "records")
    png = _figures.source_scores_png(sources, title=f"{name}: source scores")
    return [
        Heading(text(name)),
        facts,
        Table(f"Source ranking by {text(name)}", headers, rows) if rows else None,
        _figure(f"{text(name)}: source scores with 95% CI", png),
    ]


def _auprc_table(methods: Mapping[str, Any]) -> Table | None:
    rows = tuple(
        (text(name), num(m.get("auprc")), num(m.get("auprc_random")))
        for name, m in methods.items()
        if isinstance(m, Mapping) and as_float(m.get("auprc")) is not None
    )
    headers = ("method", "AUPRC", "AUPRC of random ranking")
    return Table("AUPRC against hidden labels", headers, rows) if rows else None


def _agreement_table(agreement: Any) -> Table | None:
    rows = tuple(
        (text(a.get("a")), text(a.get("b")), num(a.get("spearman")), num(a.get("kendall")),
         pct(a.get("topk_overlap")), text(a.get("hint")))
        for a in agreement or [] if isinstance(a, Mapping)
    )
    headers = ("method A", "method B", "Spearman", "Kendall", "top-k overlap", "hint")
    return Table("Agreement between methods", headers, rows) if rows else None


def _source_agreement_table(agreement: Any) -> Table | None:
    rows = tuple(
        (text(a.get("a")), text(a.get("b")), num(a.get("spearman")), num(a.get("kendall")),
         text(a.get("top_source_a")), text(a.get("top_source_b")), text(a.get("hint")))
        for a in agreement or [] if isinstance(a, Mapping)
    )
    headers = ("method A", "method B", "Spearman", "Kendall", "top source A", "top source B",
               "hint")
    return Table("Agreement between methods on sources", headers, rows) if rows else None


def _top_records_table(frame: pd.DataFrame | None, *, max_records: int) -> Table | None:
    if frame is None or frame.empty:
        return None
    methods = [
        c for c in frame.columns
        if c not in TOP_RECORD_COLUMNS and pd.api.types.is_numeric_dtype(frame[c])
    ]
    rows = tuple(
        (num(r["rank"], digits=12), text(r["record_id"]), text(r["source"]),
         shorten(r["text"], _TEXT_LIMIT), *(num(r[m]) for m in methods))
        for _, r in frame.head(max_records).iterrows()
    )
    headers = ("rank", "record_id", "source", "text (masked)", *(text(m) for m in methods))
    return Table("Top records", headers, rows)


def attribution_section(
    summary: Mapping[str, Any], top_records: pd.DataFrame | None, *, max_records: int
) -> Section:
    attr = summary.get("attribution")
    top = _top_records_table(top_records, max_records=max_records)
    if not isinstance(attr, Mapping):
        return _section("3. Attribution", [top]) if top else Section("3. Attribution", False)
    methods = attr.get("methods") if isinstance(attr.get("methods"), Mapping) else {}
    parts: list[Any] = [Facts((
        ("Top-k", text(attr.get("k"))),
        ("Reliability", text(attr.get("reliability"))),
    ))]
    for name, method in methods.items():
        if isinstance(method, Mapping):
            parts.extend(_method_parts(name, method, attr.get("k")))
    parts += [_auprc_table(methods), _agreement_table(attr.get("agreement")),
              _source_agreement_table(attr.get("source_agreement")), top]
    return _section("3. Attribution", parts)


def _conditions_table(conditions: Mapping[str, Any], seeds: list[Any]) -> Table:
    n_rates = max((len(c.get("harm_rates") or []) for c in conditions.values()), default=0)
    # Label columns by seed when the seeds match the rates one to one, else by position.
    if len(seeds) == n_rates:
        seed_names = [text(s) for s in seeds]
    else:
        seed_names = [str(i + 1) for i in range(n_rates)]
    rows = []
    for name, cond in conditions.items():
        rates = list(cond.get("harm_rates") or [])
        rates += [None] * (n_rates - len(rates))
        label = text(CONDITION_LABELS.get(name, name))
        rows.append((
            label, *(pct(r) for r in rates),
            pct(cond.get("mean")), ci(cond.get("ci")), num(cond.get("perplexity_mean")),
        ))
    headers = ("condition", *(f"seed {s}" for s in seed_names), "mean", "95% CI",
               "held-out perplexity")
    return Table("Harm rate per condition", headers, tuple(rows))


def _verdict(ver: Mapping[str, Any]) -> str:
    significant = ver.get("significant")
    if significant is None:
        p, alpha = as_float(ver.get("p_value")), as_float(ver.get("alpha")) or 0.05
        significant = None if p is None else p < alpha
    if significant is None:
        return MISSING
    return "significant" if significant else "not significant (null result kept)"


def _comparisons_table(comparisons: Mapping[str, Any]) -> Table:
    rows = []
    for method, cmp in comparisons.items():
        if not isinstance(cmp, Mapping):
            continue
        test = f"{text(cmp.get('test'))}, alpha {num(cmp.get('alpha', 0.05))}"
        rows.append((
            text(method),
            f"{pp(cmp.get('effect'))} (95% CI {ci(cmp.get('effect_ci'), pp)})",
            pval(cmp.get("p_value")), pval(cmp.get("p_permutation")), _verdict(cmp),
            pct(cmp.get("utility_change")), test,
        ))
    headers = ("method whose top-k was removed", "effect vs random-k", "p-value",
               "permutation p", "verdict", "perplexity change vs random-k", "test")
    return Table("Targeted removal against matched random removal", headers, tuple(rows))


def _sources_table(sources: Mapping[str, Any]) -> Table:
    rows = []
    for source, found in sources.items():
        if not isinstance(found, Mapping):
            continue
        controls = found.get("controls") if isinstance(found.get("controls"), Mapping) else {}
        for label, cmp in controls.items():
            if not isinstance(cmp, Mapping):
                continue
            rows.append((
                text(source), text(label),
                f"{pp(cmp.get('effect'))} (95% CI {ci(cmp.get('ci'), pp)})",
                pval(cmp.get("p_value")),
                pval(found.get("p_adjusted")) if label == "random-records" else "",
                text(found.get("verdict")) if label == "random-records" else "",
            ))
    headers = ("source removed", "control", "effect on harm rate", "permutation p",
               "corrected p", "verdict")
    return Table("Removing whole sources against matched controls", headers, tuple(rows))


def verification_section(summary: Mapping[str, Any]) -> Section:
    ver = summary.get("verification")
    if not isinstance(ver, Mapping):
        return Section("4. Verification", False)
    raw = ver.get("conditions") if isinstance(ver.get("conditions"), Mapping) else {}
    conditions = {name: c for name, c in raw.items() if isinstance(c, Mapping)}
    seeds = list(ver.get("seeds") or [])
    facts = Facts((
        ("k (records removed per run)", text(ver.get("k"))),
        ("Seeds", ", ".join(text(s) for s in seeds) or MISSING),
        ("Held-out perplexity of the full model", num(ver.get("full_perplexity"))),
    ))
    comparisons = ver.get("comparisons") if isinstance(ver.get("comparisons"), Mapping) else {}
    table = _comparisons_table(comparisons) if comparisons else None
    png = _figures.seed_rates_png(conditions, CONDITION_LABELS)
    per_seed = _conditions_table(conditions, seeds) if conditions else None
    sources = ver.get("sources") if isinstance(ver.get("sources"), Mapping) else {}
    source_table = _sources_table(sources) if sources else None
    return _section("4. Verification", [facts, table, source_table, per_seed,
                                        _figure("Harm rate per seed", png)])


def caveats_section(summary: Mapping[str, Any]) -> Section:
    caveats = summary.get("caveats")
    if not isinstance(caveats, list):
        return Section("5. Caveats", False)
    items = tuple(text(c) for c in caveats)
    return _section("5. Caveats", [Items("", items) if items else Facts((("Caveats", "none"),))])


def provenance_section(summary: Mapping[str, Any], *, summary_digest: str) -> Section:
    ledger = summary.get("ledger") if isinstance(summary.get("ledger"), Mapping) else {}
    model = summary.get("model") if isinstance(summary.get("model"), Mapping) else {}
    if not ledger and not model:
        return Section("6. Provenance", False)
    checkpoints = ", ".join(text(c) for c in model.get("checkpoints") or []) or MISSING
    facts = Facts((
        ("Ledger head", text(ledger.get("head"))),
        ("Ledger entries", num(ledger.get("n_entries"), digits=12)),
        ("Model", text(model.get("model_id"))),
        ("Parameters", num(model.get("n_params"), digits=12)),
        ("Checkpoints", checkpoints),
        ("Settings digest", text(summary.get("settings_digest"))),
        ("Digest of summary.json contents", summary_digest),
    ))
    return _section("6. Provenance", [facts])


def build_sections(
    summary: Mapping[str, Any],
    top_records: pd.DataFrame | None,
    *,
    summary_digest: str,
    max_examples: int,
    max_records: int,
) -> list[Section]:
    """The six report sections, in order, from a masked summary."""
    return [
        behaviour_section(summary, max_examples=max_examples),
        data_section(summary),
        attribution_section(summary, top_records, max_records=max_records),
        verification_section(summary),
        caveats_section(summary),
        provenance_section(summary, summary_digest=summary_digest),
    ]
