"""Print a data map as compact rich tables: only what the map's artifact holds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["render_datamap"]


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _signals_table(summary: Mapping[str, Any]) -> Table:
    table = Table(title="signals", title_justify="left")
    for column in ("signal", "records", "flagged", "rate", "mean", "median", "p95"):
        table.add_column(column, justify="left" if column == "signal" else "right")
    for name, s in summary["signals"].items():
        table.add_row(name, str(s["n_records"]), str(s["n_flagged"]), _pct(s["flag_rate"]),
                      _num(s["score_mean"]), _num(s["score_median"]), _num(s["score_p95"]))
    return table


def _duplicates_lines(summary: Mapping[str, Any]) -> list[str]:
    exact, near = summary["duplicates"]["exact"], summary["duplicates"]["near"]
    pii = summary["pii"]
    kinds = ", ".join(f"{k} {n} spans in {pii['records'][k]} records"
                      for k, n in pii["spans"].items()) or "none found"
    exact_line = (f"exact duplicates: {exact['n_duplicate_records']} records in "
                  f"{exact['n_groups']} groups ({exact['n_redundant']} redundant copies)")
    near_line = (f"near duplicates (Jaccard >= {near['threshold']:g}): "
                 f"{near['n_duplicate_records']} records in {near['n_groups']} groups, "
                 f"{near['n_pairs']} pairs; near-only (not exact): "
                 f"{near['n_near_only_pairs']} pairs, {near['n_near_only_records']} records")
    return [exact_line, near_line, f"PII: {kinds}"]


def _cluster_table(clusters: Mapping[str, Any], methods: list[str], labelled: bool) -> Table:
    table = Table(title="clusters", title_justify="left")
    table.add_column("id", justify="right")
    table.add_column("name")
    table.add_column("records", justify="right")
    table.add_column("toxic", justify="right")
    if labelled:
        table.add_column("labelled", justify="right")
    for m in methods:
        table.add_column(f"top-k {m}", justify="right")
    table.add_column("exemplar (masked)")
    for g in clusters["groups"]:
        toxic = g["signals"].get("toxicity", {}).get("flag_rate")
        cells = [str(g["cluster"]), escape(g["name"]), str(g["n_records"]), _pct(toxic)]
        if labelled:
            cells.append(_pct(g.get("labelled_share")))
        cells += [_pct(g["attribution"][m]["topk_share"]) for m in methods]
        cells.append(escape(g["exemplars"][0]["text"]) if g["exemplars"] else "")
        table.add_row(*cells)
    return table


def _group_table(kind: str, block: Mapping[str, Any], labelled: bool) -> Table:
    table = Table(title=f"{kind}s", title_justify="left")
    columns = [kind, "records", "toxic", "pii", "exact dup", "near dup"]
    columns += ["labelled"] if labelled else []
    for column in columns:
        table.add_column(column, justify="left" if column == kind else "right")
    for g in block["groups"]:
        rate = {name: s["flag_rate"] for name, s in g["signals"].items()}
        cells = [escape(str(g[kind])), str(g["n_records"]), _pct(rate.get("toxicity")),
                 _pct(rate.get("pii")), _pct(rate.get("exact_duplicate")),
                 _pct(rate.get("near_duplicate"))]
        cells += [_pct(g.get("labelled_share"))] if labelled else []
        table.add_row(*cells)
    return table


def _suppressed_line(kind: str, hidden: Mapping[str, Any], min_group_size: int | None) -> str:
    line = f"{hidden['n_groups']} {kind} group(s) {hidden['label']}"
    if hidden.get("secondary"):
        line = (f"{hidden['n_groups']} {kind} group(s) suppressed: {hidden['n_primary']} "
                f"{hidden['label'].removeprefix('suppressed ')}, and secondary suppression of "
                f"{hidden['n_secondary']} more (the smallest others) so that the hidden "
                f"records ({hidden['n_records']}) cannot be found by subtracting the shown "
                f"groups from the totals (at least {min_group_size}, or every group hidden)")
    return line


def render_datamap(summary: Mapping[str, Any], aggregates: Mapping[str, Any],
                   console: Console, *, disclosed: Mapping[str, str] | None = None) -> None:
    """Print ``summary`` and ``aggregates`` (as written by the datamap stage) to ``console``;
    ``disclosed`` (record id -> raw text) is printed only when given."""
    meta = summary["metadata"]
    labelled = "labels" in summary
    methods = aggregates.get("attribution", {}).get("methods", [])
    console.print(f"[bold]data map[/] of {meta['n_records']} records; embedding "
                  f"{meta['embedding']} ({escape(meta['embedding_reason'])}); PII recognizers: "
                  f"{escape(meta['pii_recognizers'])}", highlight=False)
    if meta.get("n_clusters_note"):
        console.print(f"note: {escape(meta['n_clusters_note'])}", highlight=False)
    for signal, reason in meta["skipped"].items():
        console.print(f"skipped {signal}: {escape(reason)}", highlight=False)
    console.print(_signals_table(summary))
    for line in _duplicates_lines(summary):
        console.print(escape(line), highlight=False)
    if labelled:
        console.print(f"labelled harmful: {summary['labels']['n_labelled']} records, base rate "
                      f"{_pct(summary['labels']['base_rate'])}", highlight=False)
    console.print(_cluster_table(aggregates["cluster"], methods, labelled))
    for kind in ("source", "domain"):
        console.print(_group_table(kind, aggregates[kind], labelled))
    for kind in ("cluster", "source", "domain"):
        hidden = aggregates[kind]["suppressed"]
        if hidden["n_groups"]:
            console.print(_suppressed_line(kind, hidden, meta.get("min_group_size")),
                          highlight=False)
    if disclosed:
        console.print("[bold]raw text[/] (disclosure recorded in the ledger):")
        for record_id, text in disclosed.items():
            console.print(f"  {escape(record_id)}: {escape(text)}", highlight=False)
