"""Checking a whole ledger, from the database or from an exported bundle, as one function.

:func:`verify_log` runs every check and reports the smallest entry seq any check blames:

1. the hash chain: each entry's ``entry_hash`` matches its contents, each ``prev_hash``
   names the entry before, seqs run 1..n without gaps (:func:`verify_chain`);
2. the Merkle tree: stored perfect-subtree hashes equal those recomputed from the entries;
3. the signed tree heads: each head's root equals the recomputed root at its size, its
   signature checks under the trusted key, and the newest head covers every entry (an
   entry past it was written by someone without the key);
4. the head kept outside the database: signed, no larger than the log (else entries were
   removed) and consistent with it;
5. the data: every dataset version an entry names still has the Merkle root it had, over
   stored record hashes, and every stored text still hashes to its record hash;
6. (database only, passed in as ``extra``) record lineage: a record's ``key`` and
   ``supersedes`` are its own id and nothing unless a ``record-add``/``record-edit`` entry
   says otherwise, and a record's text is gone exactly when a ``record-erase`` entry erased
   it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from harmtrace.ledger._chain import VerifyReport, verify_chain
from harmtrace.ledger._signing import PublicKey, TreeHead
from harmtrace.merkle import MemoryTree, leaf_hash

__all__ = ["VersionCheck", "entry_leaf", "verify_log"]

# version id -> None if it still holds, else what is wrong (without the entry's seq).
VersionCheck = Callable[[str], str | None]


def entry_leaf(entry_hash: str) -> bytes:
    """The Merkle leaf hash of one entry: ``leaf_hash`` of its 32-byte ``entry_hash``."""
    return leaf_hash(bytes.fromhex(entry_hash))


@dataclass
class _Findings:
    problems: list[tuple[int, str]]

    def add(self, seq: int, reason: str) -> None:
        self.problems.append((seq, reason))


def verify_log(
    rows: Sequence[Mapping[str, Any]],
    heads: Sequence[TreeHead],
    *,
    key: PublicKey | None,
    nodes: Mapping[tuple[int, int], str] | None = None,
    outside_head: TreeHead | None = None,
    outside_where: str = "the head file",
    check_version: VersionCheck | None = None,
    extra: Sequence[tuple[int, str]] = (),
) -> VerifyReport:
    """Verify ledger ``rows`` (ordered by seq) with their ``heads``; see the module docstring.

    ``key`` is the trusted public key (``None`` checks structure only and says so);
    ``nodes`` the stored Merkle nodes by ``(height, index)``; ``outside_head`` the head
    kept outside the database; ``check_version`` checks one dataset version's records;
    ``extra`` adds ``(seq, reason)`` problems found by the caller's own checks.
    """
    findings = _Findings([])
    chain = verify_chain(rows)
    if not chain.ok and chain.first_bad_seq is not None:
        findings.add(chain.first_bad_seq, chain.reason)

    tree = _tree(rows, findings)
    if nodes is not None:
        _check_nodes(tree, nodes, findings)
    _check_heads(tree, heads, key, findings)
    if outside_head is not None:
        _check_outside_head(tree, outside_head, key, outside_where, findings)
    if check_version is not None:
        _check_versions(rows, check_version, findings)

    for seq, reason in extra:
        findings.add(seq, reason)

    n = len(rows)
    if findings.problems:
        seq, reason = min(findings.problems, key=lambda p: p[0])
        more = len(findings.problems) - 1
        suffix = f" ({more} more problem{'s' * (more != 1)} found after it)" if more else ""
        return VerifyReport(False, n, seq, reason + suffix)
    signed = f"signed heads checked with key {key.key_id}" if key else "signatures NOT checked"
    outside = ""
    if outside_head is not None:
        lag = "" if outside_head.size == n else f", {n - outside_head.size} entries behind"
        outside = f"; {outside_where} is consistent (size {outside_head.size}{lag})"
    return VerifyReport(True, n, None, f"{n} entries verify; {signed}{outside}")


def _tree(rows: Sequence[Mapping[str, Any]], findings: _Findings) -> MemoryTree:
    tree = MemoryTree()
    for row in rows:
        try:
            tree.append(entry_leaf(row["entry_hash"]))
        except (ValueError, TypeError):
            findings.add(row["seq"], f"entry {row['seq']} has an entry_hash that is not hex")
            tree.append(leaf_hash(b""))
    return tree


def _check_nodes(
    tree: MemoryTree, nodes: Mapping[tuple[int, int], str], findings: _Findings
) -> None:
    for height, level in enumerate(tree.levels):
        for index, value in enumerate(level):
            stored = nodes.get((height, index))
            if stored != value.hex():
                first = index * (1 << height) + 1
                what = "is missing" if stored is None else "differs from the entries"
                findings.add(first, (
                    f"stored Merkle node (height {height}, index {index}) {what}; it covers "
                    f"entries {first} to {first + (1 << height) - 1}"
                ))
                return
    extra = sorted(k for k in nodes if k[0] >= len(tree.levels) or k[1] >= len(tree.levels[k[0]]))
    if extra:
        height, index = extra[0]
        findings.add(len(tree) + 1, (
            f"a stored Merkle node (height {height}, index {index}) lies past the last entry "
            f"{len(tree)}: entries were removed"
        ))


def _check_heads(
    tree: MemoryTree, heads: Sequence[TreeHead], key: PublicKey | None, findings: _Findings
) -> None:
    n = len(tree)
    for head in heads:
        if head.size > n or head.size < 1:
            findings.add(n + 1, (
                f"a signed head names {head.size} entries but the ledger holds {n}: entries "
                f"{n + 1} to {head.size} were removed"
            ))
            continue
        if key is not None and not key.checks(head):
            findings.add(head.size, (
                f"the head for size {head.size} has no valid signature by key {key.key_id}: "
                "it was forged or rewritten"
            ))
        elif tree.root(head.size).hex() != head.root:
            findings.add(head.size, (
                f"the signed root for size {head.size} differs from the entries' root: an "
                f"entry up to {head.size} was changed"
            ))
    present = {h.size for h in heads}
    missing = next((size for size in range(1, n + 1) if size not in present), None)
    if missing is not None:
        findings.add(missing, (
            f"the signed head for size {missing} is missing: every append writes one, so "
            "heads were deleted (or entries written outside harmtrace's append)"
        ))
    covered = max((h.size for h in heads if h.size <= n), default=0)
    if covered < n:
        findings.add(covered + 1, (
            f"entries {covered + 1} to {n} are covered by no signed head: they were written "
            "outside harmtrace's append (forged or inserted)"
        ))


def _check_outside_head(
    tree: MemoryTree,
    head: TreeHead,
    key: PublicKey | None,
    where: str,
    findings: _Findings,
) -> None:
    n = len(tree)
    if key is not None and not key.checks(head):
        findings.add(min(head.size, n) or 1, f"{where} has no valid signature by key {key.key_id}")
    elif head.size > n:
        findings.add(n + 1, (
            f"entries {n + 1} to {head.size} were removed: {where} names {head.size} entries "
            f"but the ledger ends at {n}"
        ))
    elif head.size >= 1 and tree.root(head.size).hex() != head.root:
        findings.add(head.size, (
            f"{where} (size {head.size}) does not match the entries: the log was rewritten "
            f"up to entry {head.size}"
        ))


def _check_versions(
    rows: Sequence[Mapping[str, Any]], check: VersionCheck, findings: _Findings
) -> None:
    seen: dict[str, str | None] = {}
    for row in rows:
        version = _named_version(row)
        if version is None:
            continue
        if version not in seen:
            seen[version] = check(version)
        if seen[version] is not None:
            findings.add(row["seq"], f"entry {row['seq']}: {seen[version]}")
            return


def _named_version(row: Mapping[str, Any]) -> str | None:
    try:
        outputs = json.loads(row["outputs_json"])
    except (TypeError, ValueError):
        return None
    version = outputs.get("version_id") if isinstance(outputs, dict) else None
    return version if isinstance(version, str) else None
