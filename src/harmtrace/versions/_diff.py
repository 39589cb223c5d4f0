"""What changed between two dataset versions, per source, by stable record key."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from harmtrace.errors import ConfigError
from harmtrace.ledger import Ledger
from harmtrace.store import Database, RecordRef, current_user

__all__ = ["SourceDiff", "VersionDiff", "diff_excerpts", "diff_versions"]

EXCERPT_CHARS = 60


@dataclass(frozen=True)
class SourceDiff:
    """Changes within one source from version A to version B.

    ``added``: record ids in B whose key is not in A; ``removed``: record ids in A whose key
    is not in B; ``changed``: ``(id in A, id in B)`` for keys in both with other content.
    Each is sorted by record id.
    """

    source: str
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[tuple[str, str], ...]

    @property
    def counts(self) -> dict[str, int]:
        return {"added": len(self.added), "removed": len(self.removed),
                "changed": len(self.changed)}


@dataclass(frozen=True)
class VersionDiff:
    """Per-source changes from version ``a`` to version ``b`` (sources with none left out)."""

    a: str
    b: str
    sources: tuple[SourceDiff, ...]

    @property
    def counts(self) -> dict[str, int]:
        """Totals over all sources."""
        totals = {"added": 0, "removed": 0, "changed": 0}
        for diff in self.sources:
            for name, value in diff.counts.items():
                totals[name] += value
        return totals

    def record_ids(self) -> list[str]:
        """Every record id the diff names (both sides of a change), in listing order."""
        ids: list[str] = []
        for diff in self.sources:
            ids += [*diff.added, *diff.removed]
            ids += [rid for pair in diff.changed for rid in pair]
        return ids


def diff_versions(db: Database, a: str, b: str) -> VersionDiff:
    """Compare versions ``a`` and ``b`` (full ids) by record key; reads no text."""
    old, new = _by_key(db.version_refs(a)), _by_key(db.version_refs(b))
    buckets: dict[str, dict[str, list]] = {}

    def bucket(source: str) -> dict[str, list]:
        return buckets.setdefault(source, {"added": [], "removed": [], "changed": []})

    for key, ref in new.items():
        if key not in old:
            bucket(ref.source)["added"].append(ref.record_id)
        elif old[key].record_id != ref.record_id:
            bucket(ref.source)["changed"].append((old[key].record_id, ref.record_id))
    for key, ref in old.items():
        if key not in new:
            bucket(ref.source)["removed"].append(ref.record_id)

    sources = tuple(
        SourceDiff(name, tuple(sorted(b_["added"])), tuple(sorted(b_["removed"])),
                   tuple(sorted(b_["changed"])))
        for name, b_ in sorted(buckets.items())
    )
    return VersionDiff(a, b, sources)


def diff_excerpts(
    db: Database,
    diff: VersionDiff,
    *,
    reason: str,
    max_chars: int = EXCERPT_CHARS,
    actor: str | None = None,
    ledger: Ledger | None = None,
) -> dict[str, str]:
    """Masked excerpts (``mask_text``, at most ``max_chars``) of every record the diff names.

    Showing text is a disclosure, so ``reason`` (why) is required: a ``disclosure`` ledger
    entry records who asked, why, which versions and which record ids, before the excerpts
    are returned. Erased records read ``[erased]``.
    """
    from harmtrace.report.redact import mask_text

    if not isinstance(reason, str) or not reason.strip():
        raise ConfigError("diff_excerpts needs a reason (the CLI's --reason TEXT): every "
                          "disclosure of text is recorded in the ledger with its reason")
    ids = list(dict.fromkeys(diff.record_ids()))
    (ledger or Ledger(db)).append(
        stage="disclosure", actor=actor or current_user(),
        settings={"what": "masked excerpts", "max_chars": max_chars, "via": "data diff",
                  "reason": reason},
        inputs={"a": diff.a, "b": diff.b},
        outputs={"record_ids": ids, "n_records": len(ids)},
    )
    records = db.find_records(ids)
    return {rid: "[erased]" if rec.erased else _excerpt(mask_text(rec.text), max_chars)
            for rid, rec in records.items()}


def _excerpt(text: str, max_chars: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= max_chars else flat[: max_chars - 1] + "…"


def _by_key(refs: Iterable[RecordRef]) -> dict[str, RecordRef]:
    return {ref.key: ref for ref in refs}
