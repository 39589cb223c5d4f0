"""The ledger's hash chain as pure functions: hashing one entry and verifying a sequence.

Each entry's ``entry_hash`` is ``sha256_json`` (SHA-256 of canonical JSON) of the object
``{seq, time, actor, stage, settings, inputs, outputs, prev_hash}``; ``prev_hash`` is the
previous entry's ``entry_hash``, or :data:`GENESIS_HASH` (64 zeros) for entry 1. Sequence
numbers start at 1 and have no gaps.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from harmtrace.errors import LedgerError
from harmtrace.hashing import canonical_json, sha256_json

__all__ = ["GENESIS_HASH", "LedgerEntry", "VerifyReport", "entry_hash", "verify_chain"]

GENESIS_HASH = "0" * 64
_JSON_FIELDS = ("settings", "inputs", "outputs")
# How far from its seq a moved entry is looked for when diagnosing a bad hash.
_SHIFT_WINDOW = 1000


@dataclass(frozen=True, kw_only=True)
class LedgerEntry:
    """One ledger entry: who ran which stage when, with which settings, inputs and outputs."""

    seq: int
    time: str
    actor: str
    stage: str
    settings: Mapping[str, Any]
    inputs: Mapping[str, Any]
    outputs: Mapping[str, Any]
    prev_hash: str
    entry_hash: str


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of verifying the ledger.

    ``first_bad_seq`` is the seq of the first entry that is changed, missing, inserted or
    out of place (``None`` when ``ok`` or when no entry can be named); ``reason`` says what
    is wrong in words.
    """

    ok: bool
    n_entries: int
    first_bad_seq: int | None
    reason: str

    def raise_if_bad(self) -> None:
        """Raise :class:`LedgerError` with the reason unless the ledger verified."""
        if not self.ok:
            raise LedgerError(f"the ledger does not verify: {self.reason}")


def normalise(value: Mapping[str, Any] | None) -> dict[str, Any]:
    """``value`` as it reads back from canonical JSON (tuples become lists, paths strings)."""
    return json.loads(canonical_json(dict(value or {})))


def entry_hash(
    *,
    seq: int,
    time: str,
    actor: str,
    stage: str,
    settings: Mapping[str, Any],
    inputs: Mapping[str, Any],
    outputs: Mapping[str, Any],
    prev_hash: str,
) -> str:
    """The hash of one entry's contents; see the module docstring."""
    return sha256_json(
        {
            "seq": seq,
            "time": time,
            "actor": actor,
            "stage": stage,
            "settings": settings,
            "inputs": inputs,
            "outputs": outputs,
            "prev_hash": prev_hash,
        }
    )


def verify_chain(rows: Sequence[Mapping[str, Any]]) -> VerifyReport:
    """Verify the hash chain of ledger rows (database columns, ordered by seq)."""
    prev = GENESIS_HASH
    for index, row in enumerate(rows):
        bad = _check_row(row, index + 1, prev)
        if bad is not None:
            return VerifyReport(False, len(rows), *bad)
        prev = row["entry_hash"]
    return VerifyReport(True, len(rows), None, f"the chain of {len(rows)} entries holds")


def _check_row(
    row: Mapping[str, Any], expected_seq: int, prev: str
) -> tuple[int, str] | None:
    seq = row["seq"]
    if seq != expected_seq:
        return expected_seq, (
            f"entry {expected_seq} is missing: the entry after seq {expected_seq - 1} has "
            f"seq {seq} (an entry was removed)"
        )
    contents = _parse(row)
    if contents is None:
        return seq, f"entry {seq} holds settings, inputs or outputs that are not valid JSON"

    if entry_hash(seq=seq, prev_hash=row["prev_hash"], **contents) != row["entry_hash"]:
        return _diagnose_changed(row, contents)
    if row["prev_hash"] != prev:
        return seq - 1, (
            f"entry {seq - 1} was rewritten: its hash {prev[:12]}... differs from the "
            f"prev_hash {row['prev_hash'][:12]}... that entry {seq} recorded for it"
        )
    return None


def _parse(row: Mapping[str, Any]) -> dict[str, Any] | None:
    try:
        parsed = {name: json.loads(row[f"{name}_json"]) for name in _JSON_FIELDS}
    except (TypeError, ValueError):
        return None
    return {"time": row["time"], "actor": row["actor"], "stage": row["stage"], **parsed}


def _diagnose_changed(row: Mapping[str, Any], contents: dict[str, Any]) -> tuple[int, str]:
    """Name the first bad seq for an entry whose contents do not match its hash.

    If the contents hash correctly under another seq, the entry was moved there by entries
    inserted before it (the first inserted one is the first bad entry), or by entries
    removed or reordered around it.
    """
    seq = row["seq"]
    nearby = range(max(1, seq - _SHIFT_WINDOW), seq + _SHIFT_WINDOW + 1)
    for other in (s for s in nearby if s != seq):
        if entry_hash(seq=other, prev_hash=row["prev_hash"], **contents) == row["entry_hash"]:
            return min(seq, other), (
                f"entry {seq} holds the contents written as entry {other}: entries were "
                "inserted, removed or reordered"
            )
    return seq, (
        f"entry {seq} was changed after it was written: its contents do not match its "
        "entry_hash"
    )
