"""Offline evidence: exported ledger bundles and proof files, checked without the database.

A bundle (``harmtrace ledger export``) is one JSON file::

    {"format": "harmtrace-ledger-bundle/1", "public_key": HEX, "exported_at": ISO-8601,
     "entries": [{seq, time, actor, stage, settings, inputs, outputs, prev_hash,
                  entry_hash}, ...],
     "heads": [{size, root, time, key_id, signature}, ...],
     "versions": {VERSION_ID: [[record_id, content_hash], ...], ...}}

``versions`` holds the record hashes of every dataset version an entry names (no text), so
a checker recomputes each version's Merkle root too. :func:`verify_bundle` runs the same
checks as ``Ledger.verify`` on it. Proof files (``ledger prove`` / ``ledger consistency``)
are checked by :func:`check_proof`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import select

from harmtrace.errors import InputDataError
from harmtrace.hashing import canonical_json
from harmtrace.ledger._chain import VerifyReport, entry_hash
from harmtrace.ledger._ledger import Ledger
from harmtrace.ledger._signing import PublicKey, TreeHead
from harmtrace.ledger._verify import entry_leaf, verify_log
from harmtrace.merkle import verify_consistency, verify_inclusion
from harmtrace.store import schema as t
from harmtrace.store import utc_now, version_fingerprint
from harmtrace.workspace import atomic_write_json

__all__ = ["BUNDLE_FORMAT", "check_proof", "export_bundle", "load_bundle", "verify_bundle"]

BUNDLE_FORMAT = "harmtrace-ledger-bundle/1"
_ENTRY_KEYS = ("seq", "time", "actor", "stage", "settings", "inputs", "outputs", "prev_hash",
               "entry_hash")


def export_bundle(ledger: Ledger, path: str | Path) -> dict[str, Any]:
    """Write the whole ledger as a bundle to ``path`` (atomically); returns a summary."""
    entries = ledger.entries()
    with ledger.db.transaction() as conn:
        heads = [dict(r) for r in conn.execute(
            select(t.ledger_heads).order_by(t.ledger_heads.c.size)).mappings()]
    versions: dict[str, list[list[str]]] = {}
    for entry in entries:
        version = entry.outputs.get("version_id")
        if isinstance(version, str) and version not in versions:
            if ledger.db.version_exists(version):
                versions[version] = _version_pairs(ledger, version)
    bundle = {
        "format": BUNDLE_FORMAT,
        "exported_at": utc_now(),
        "public_key": ledger.public_key.hex if ledger.public_key else "",
        "entries": [{k: getattr(e, k) for k in _ENTRY_KEYS} for e in entries],
        "heads": heads,
        "versions": versions,
    }
    atomic_write_json(Path(path), bundle)
    return {"entries": len(entries), "heads": len(heads), "versions": len(versions)}


def _version_pairs(ledger: Ledger, version_id: str) -> list[list[str]]:
    rec, link = t.records, t.version_records
    query = (select(rec.c.record_id, rec.c.content_hash)
             .join(link, link.c.record_id == rec.c.record_id)
             .where(link.c.version_id == version_id)
             .order_by(rec.c.record_id))
    with ledger.db.transaction() as conn:
        return [[rid, digest] for rid, digest in conn.execute(query)]


def load_bundle(path: str | Path) -> dict[str, Any]:
    """Read and shape-check a bundle file; InputDataError names what is wrong."""
    path = Path(path)
    try:
        bundle = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputDataError(f"ledger bundle {path} cannot be read as JSON: {err}") from err
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        raise InputDataError(
            f"{path} is not a ledger bundle: its 'format' must be {BUNDLE_FORMAT!r}; make one "
            "with `harmtrace ledger export`"
        )
    for name, kind in (("entries", list), ("heads", list), ("versions", dict)):
        if not isinstance(bundle.get(name), kind):
            raise InputDataError(
                f"ledger bundle {path}: field '{name}' is missing or not a {kind.__name__}"
            )
    return bundle


def verify_bundle(
    path: str | Path, public_key: PublicKey | None = None, *,
    trusted_head: TreeHead | None = None,
) -> VerifyReport:
    """Verify a bundle offline. Without ``public_key`` the bundle's own key is used, which
    proves integrity but not authorship: pin the key from a copy you trust.

    A bundle cut short (its newest entries and heads dropped) is still a valid, shorter
    log; pass ``trusted_head`` (a head file kept elsewhere) to require that the bundle
    reaches it.
    """
    bundle = load_bundle(path)
    key = public_key
    own_key = key is None and bool(bundle.get("public_key"))
    if own_key:
        key = PublicKey.from_hex(str(bundle["public_key"]), where=f"{path}'s public_key")
    try:
        rows = [_row(entry) for entry in bundle["entries"]]
        heads = [TreeHead.from_dict(h) for h in bundle["heads"]]
    except (KeyError, TypeError, ValueError) as err:
        raise InputDataError(
            f"ledger bundle {path}: an entry or head lacks a field or has a wrong type ({err})"
        ) from err
    versions = bundle["versions"]
    report = verify_log(rows, heads, key=key, outside_head=trusted_head,
                        outside_where="the trusted head",
                        check_version=lambda v: _bundle_version_problem(versions, v))
    if report.ok and own_key:
        return VerifyReport(True, report.n_entries, None, report.reason + (
            " (with the bundle's own public key; pass --public-key to pin a trusted one)"))
    return report


def _row(entry: Mapping[str, Any]) -> dict[str, Any]:
    row = {k: entry[k] for k in ("seq", "time", "actor", "stage", "prev_hash", "entry_hash")}
    for name in ("settings", "inputs", "outputs"):
        row[f"{name}_json"] = canonical_json(entry[name])
    return row


def _bundle_version_problem(versions: Mapping[str, Any], version_id: str) -> str | None:
    pairs = versions.get(version_id)
    if pairs is None:
        return f"dataset version {version_id[:12]}... is missing from the bundle's versions"
    try:
        root = version_fingerprint((str(rid), str(digest)) for rid, digest in pairs)
    except (TypeError, ValueError):
        return f"dataset version {version_id[:12]}... has malformed record hashes"
    if root != version_id:
        return (f"dataset version {version_id[:12]}...: the bundle's record hashes give root "
                f"{root[:12]}... (a record hash or the version's membership was changed)")
    return None


def check_proof(proof: Mapping[str, Any], public_key: PublicKey | None) -> tuple[bool, str]:
    """Check an inclusion or consistency proof file's contents; returns (ok, why)."""
    try:
        head = TreeHead.from_dict(proof["head"])
        path = [bytes.fromhex(h) for h in proof["proof"]]
        kind = proof["kind"]
    except (KeyError, TypeError, ValueError) as err:
        return False, f"the proof lacks a field or has a wrong type ({err})"
    if public_key is not None and not public_key.checks(head):
        return False, f"its head (size {head.size}) is not signed by key {public_key.key_id}"

    if kind == "inclusion":
        return _check_inclusion(proof, head, path)
    if kind == "consistency":
        old = TreeHead.from_dict(proof["old_head"])
        if public_key is not None and not public_key.checks(old):
            return False, f"its old head (size {old.size}) is not signed by the key"
        ok = verify_consistency(old.size, head.size, bytes.fromhex(old.root),
                                bytes.fromhex(head.root), path)
        return ok, (f"the log of {old.size} entries is a prefix of the log of {head.size}"
                    if ok else "the consistency proof does not link the two heads")
    return False, f"unknown proof kind {kind!r}; expected 'inclusion' or 'consistency'"


def _check_inclusion(
    proof: Mapping[str, Any], head: TreeHead, path: list[bytes]
) -> tuple[bool, str]:
    entry = proof["entry"]
    try:
        digest = entry_hash(**{k: entry[k] for k in _ENTRY_KEYS if k != "entry_hash"})
    except (KeyError, TypeError) as err:
        return False, f"the proof's entry lacks a field ({err})"
    if digest != entry.get("entry_hash"):
        return False, f"entry {entry.get('seq')}'s contents do not match its entry_hash"
    leaf = entry_leaf(digest)
    stated = {"index": entry["seq"] - 1, "tree_size": head.size, "leaf_hash": leaf.hex()}
    contradicted = [k for k, v in stated.items() if k in proof and proof[k] != v]
    if contradicted:
        return False, (f"the proof's {', '.join(contradicted)} contradict its entry and head "
                       "(the file was edited)")
    ok = verify_inclusion(entry["seq"] - 1, head.size, leaf, path, bytes.fromhex(head.root))
    return ok, (f"entry {entry['seq']} is in the log of {head.size} entries"
                if ok else f"the audit path does not lead from entry {entry['seq']} to the root")

