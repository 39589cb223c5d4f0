"""Export a dataset version as a Croissant 1.0 dataset (JSON-LD) with the RAI vocabulary.

``croissant.json`` describes the version: its Merkle root, parent and transform, each
source's provenance (``isBasedOn``: origin, licence, who added it), the responsible-AI
fields (``rai:dataCollection``, ``rai:dataBiases``, ``rai:personalSensitiveInformation``,
``rai:dataLimitations``, ``rai:dataUseCases``) and, when the workspace holds them, the
known-harm findings of the attribute, evaluate and verify stages. It points to
``records.jsonl`` (a ``cr:FileObject`` with its SHA-256): one line per record, sorted by
record id (the Merkle leaf order), with ``record_id``, ``key``, ``source``, ``content_hash``
and ``text``, masked with :func:`harmtrace.report.redact.mask_text` unless raw text is asked
for. Erased records have ``text: null``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harmtrace import __version__
from harmtrace.errors import ConfigError
from harmtrace.hashing import canonical_json, sha256_file
from harmtrace.ledger import Ledger
from harmtrace.store import Database, Record, SourceInfo, VersionInfo, current_user, utc_now
from harmtrace.workspace import atomic_write_text

__all__ = ["CROISSANT_FILE", "RECORDS_FILE", "ExportResult", "check_export_folder",
           "export_croissant", "known_harm_findings"]

CROISSANT_FILE = "croissant.json"
RECORDS_FILE = "records.jsonl"
LEDGER_LOCK = "ledger"

# The terms this export uses, as the Croissant 1.0 specification defines them, plus a
# vocabulary of harmtrace's own for values that Croissant has no term for.
_CONTEXT: dict[str, Any] = {
    "@language": "en",
    "@vocab": "https://schema.org/",
    "sc": "https://schema.org/",
    "cr": "http://mlcommons.org/croissant/",
    "rai": "http://mlcommons.org/croissant/RAI/",
    "dct": "http://purl.org/dc/terms/",
    "ht": "urn:harmtrace:vocab:",
    "citeAs": "cr:citeAs",
    "column": "cr:column",
    "conformsTo": "dct:conformsTo",
    "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "examples": {"@id": "cr:examples", "@type": "@json"},
    "equivalentProperty": "cr:equivalentProperty",
    "extract": "cr:extract",
    "field": "cr:field",
    "fileObject": "cr:fileObject",
    "fileProperty": "cr:fileProperty",
    "fileSet": "cr:fileSet",
    "format": "cr:format",
    "includes": "cr:includes",
    "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath",
    "key": "cr:key",
    "md5": "cr:md5",
    "parentField": "cr:parentField",
    "path": "cr:path",
    "recordSet": "cr:recordSet",
    "references": "cr:references",
    "regex": "cr:regex",
    "repeated": "cr:repeated",
    "replace": "cr:replace",
    "samplingRate": "cr:samplingRate",
    "separator": "cr:separator",
    "source": "cr:source",
    "subField": "cr:subField",
    "transform": "cr:transform",
    "datasetVersion": {"@id": "ht:datasetVersion", "@type": "@json"},
    "knownHarms": {"@id": "ht:knownHarms", "@type": "@json"},
}

_FIELDS = (
    ("record_id", "sc:Text", "the record's id: source, dash, 16 hex digits of content_hash"),
    ("key", "sc:Text", "the record's stable key across edits"),
    ("source", "sc:Text", "the provenance group the record came from"),
    ("content_hash", "sc:Text", "SHA-256 of the record's UTF-8 text (the Merkle leaf's)"),
    ("text", "sc:Text", "the record's text, masked unless exported raw; null when erased"),
)


@dataclass(frozen=True)
class ExportResult:
    """Where the export was written, the files' SHA-256 and the ledger entry."""

    croissant: Path
    records: Path
    digests: dict[str, str]
    n_records: int
    ledger_seq: int


def export_croissant(
    db: Database,
    version_id: str,
    out_dir: str | Path,
    *,
    include_text: bool = False,
    reason: str | None = None,
    artifacts: str | Path | None = None,
    actor: str | None = None,
    ledger: Ledger | None = None,
) -> ExportResult:
    """Write ``croissant.json`` and ``records.jsonl`` for ``version_id`` into ``out_dir``.

    ``out_dir`` must be a new or empty folder, or one holding only an earlier export's two
    files (they are replaced); see :func:`check_export_folder`. ``include_text`` exports
    raw text instead of masked text; it needs a ``reason`` and is logged to the ledger as a
    ``disclosure`` entry (actor, reason, version, record ids). ``artifacts`` is the
    workspace's artifacts folder, read for known-harm findings. An ``export`` ledger entry
    holds the output files' SHA-256.
    """
    if include_text and (not isinstance(reason, str) or not reason.strip()):
        raise ConfigError("include_text=True needs a reason (the CLI's --reason TEXT): every "
                          "disclosure of raw text is recorded in the ledger with its reason")
    out = check_export_folder(out_dir)
    actor = actor or current_user()
    info = db.get_version(version_id)
    records = sorted(db.version_records(version_id, allow_erased=True),
                     key=lambda rec: rec.record_id)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"out_dir {out}: cannot make the folder ({err}); give a new or "
                          "empty folder") from err

    records_path = out / RECORDS_FILE
    atomic_write_text(records_path, "".join(
        canonical_json(_record_line(rec, include_text)) + "\n" for rec in records))
    findings = known_harm_findings(Path(artifacts)) if artifacts else {}
    document = croissant_document(info, records, db.get_sources(), findings,
                                  records_sha256=sha256_file(records_path),
                                  include_text=include_text)
    croissant_path = out / CROISSANT_FILE
    atomic_write_text(croissant_path, json.dumps(document, indent=2, ensure_ascii=False))
    digests = {CROISSANT_FILE: sha256_file(croissant_path), RECORDS_FILE:
               document["distribution"][0]["sha256"]}

    ledger = ledger or Ledger(db)
    with db.transaction(lock=LEDGER_LOCK):
        if include_text:
            ledger.append(stage="disclosure", actor=actor,
                          settings={"what": "raw text", "via": "data export",
                                    "reason": reason},
                          inputs={"version_id": version_id},
                          outputs={"path": str(records_path), "n_records": len(records),
                                   "sha256": digests[RECORDS_FILE],
                                   "record_ids": [rec.record_id for rec in records]})
        entry = ledger.append(stage="export", actor=actor,
                              settings={"format": "croissant-1.0", "include_text": include_text},
                              inputs={"version_id": version_id},
                              outputs={"files": digests, "n_records": len(records)})
    return ExportResult(croissant_path, records_path, digests, len(records), entry.seq)


def check_export_folder(out_dir: str | Path, argument: str = "out_dir") -> Path:
    """``out_dir`` as a Path if an export may be written there, else :class:`ConfigError`.

    Allowed: a path that does not exist yet (it is made, with its parents), an empty folder,
    or a folder holding only ``croissant.json`` and/or ``records.jsonl`` (an earlier export,
    replaced). A file, or a folder with anything else in it, is refused: nothing is written.
    ``argument`` names the option in the message (``--out`` for the CLI).
    """
    out = Path(out_dir)
    fix = "give a new folder, or an empty one"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{argument} {out_dir}: is a file, but it must be a folder; {fix} "
                          f"(the export writes {CROISSANT_FILE} and {RECORDS_FILE} into it)")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir()
                        if p.name not in (CROISSANT_FILE, RECORDS_FILE) or not p.is_file())
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise ConfigError(f"{argument} {out_dir}: the folder holds other files ({shown}); "
                              f"{fix} (only an earlier export's {CROISSANT_FILE} and "
                              f"{RECORDS_FILE} may be replaced)")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{argument} {out_dir}: {parent} is a file, not a folder; "
                                  f"{fix}")
            break
    return out


def croissant_document(
    info: VersionInfo,
    records: list[Record],
    sources: list[SourceInfo],
    findings: dict[str, Any],
    *,
    records_sha256: str,
    include_text: bool,
) -> dict[str, Any]:
    """The Croissant JSON-LD object for one version (see the module docstring)."""
    used = sorted({rec.source for rec in records})
    provenance = [s for s in sources if s.name in used]
    n_erased = sum(rec.erased for rec in records)
    return {
        "@context": _CONTEXT,
        "@type": "sc:Dataset",
        "conformsTo": "http://mlcommons.org/croissant/1.0",
        "name": f"harmtrace-dataset-{info.version_id[:12]}",
        "description": (
            f"Dataset version {info.version_id} ({info.n_records} records from "
            f"{len(used)} sources: {', '.join(used)}), made by transform '{info.transform}'"
            + (f" from version {info.parent}" if info.parent else "")
            + ". Exported by harmtrace."
        ),
        "identifier": info.version_id,
        "url": f"urn:harmtrace:dataset-version:{info.version_id}",
        "license": sorted({s.licence for s in provenance}),
        "creator": {"@type": "sc:Person", "name": info.created_by},
        "dateCreated": info.created_at,
        "datePublished": utc_now(),
        "citeAs": f"harmtrace dataset version {info.version_id}",
        "isBasedOn": [_source_entry(s) for s in provenance],
        "datasetVersion": {
            "merkle_root": info.version_id, "parent": info.parent,
            "transform": info.transform, "args": dict(info.args),
            "n_records": info.n_records, "created_by": info.created_by,
            "leaf": "UTF-8 of record_id + '\\n' + content_hash, sorted by record_id "
                    "(RFC 6962)",
        },
        "rai:dataCollection": _collection(provenance),
        "rai:dataBiases": _biases(findings),
        "rai:personalSensitiveInformation": (
            "Records may hold personal details (handles, e-mail and web addresses, phone "
            "and card numbers). "
            + ("This export holds the raw text." if include_text else
               "This export masks them in the text (harmtrace mask_text); masking misses "
               "spelled-out addresses and short numbers.")
            + (f" {n_erased} records were erased on request: only their hashes remain."
               if n_erased else "")
        ),
        "rai:dataLimitations": (
            "Records were gathered for a harm investigation, not sampled to represent any "
            "population. Attribution findings are estimates; only removal experiments test "
            "causation, and only for the methods and k that were run."
        ),
        "rai:dataUseCases": (
            "Auditing and reproducing the harmtrace investigation of this dataset version; "
            "retraining with records removed. Not validated for training production models."
        ),
        "knownHarms": findings,
        "distribution": [{
            "@type": "cr:FileObject", "@id": RECORDS_FILE, "name": RECORDS_FILE,
            "contentUrl": RECORDS_FILE, "encodingFormat": "application/jsonlines",
            "sha256": records_sha256,
        }],
        "recordSet": [{
            "@type": "cr:RecordSet", "@id": "records", "name": "records",
            "description": "One training record per line, in Merkle leaf order.",
            "key": {"@id": "records/record_id"},
            "field": [_field(name, kind, about) for name, kind, about in _FIELDS],
        }],
        # Croissant asks for MAJOR.MINOR.PATCH; the Merkle root rides as build metadata.
        "version": f"1.0.0+{info.version_id[:12]}",
        "ht:harmtraceVersion": __version__,
    }


def known_harm_findings(artifacts: Path) -> dict[str, Any]:
    """Top sources per method, AUPRC and removal effects from a workspace's artifacts.

    Each part names the dataset version it was computed on; missing artifacts are left out.
    """
    findings: dict[str, Any] = {}
    attribution = _artifact(artifacts, "attribute", "attribution.json")
    if attribution is not None:
        data, version = attribution
        findings["attribution"] = {
            "dataset_version": version, "k": data.get("k"),
            "top_sources": {m: [{"source": s["source"], "score": s["score"]}
                                for s in v.get("sources", [])[:3]]
                            for m, v in data.get("methods", {}).items()},
            "agreement": data.get("agreement_hint"),
        }
    evaluation = _artifact(artifacts, "evaluate", "evaluation.json")
    if evaluation is not None:
        data, version = evaluation
        findings["evaluation"] = {"dataset_version": version, "auprc": data.get("auprc"),
                                  "base_rate": data.get("base_rate")}
    verification = _artifact(artifacts, "verify", "verification.json")
    if verification is not None:
        data, version = verification
        findings["removal_effects"] = {
            "dataset_version": version, "k": data.get("k"),
            "methods": {m: {key: c.get(key) for key in ("effect", "ci", "p_value")}
                        for m, c in data.get("comparisons", {}).items()},
        }
    return findings


def _artifact(artifacts: Path, name: str, file: str) -> tuple[dict, str | None] | None:
    folder = artifacts / name
    if not (folder / "meta.json").is_file() or not (folder / file).is_file():
        return None
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    data = json.loads((folder / file).read_text(encoding="utf-8"))
    return data, meta.get("identity", {}).get("version")


def _record_line(rec: Record, include_text: bool) -> dict[str, Any]:
    from harmtrace.report.redact import mask_text

    text = None if rec.erased else rec.text if include_text else mask_text(rec.text)
    return {"record_id": rec.record_id, "key": rec.key, "source": rec.source,
            "content_hash": rec.content_hash, "text": text}


def _field(name: str, kind: str, about: str) -> dict[str, Any]:
    return {
        "@type": "cr:Field", "@id": f"records/{name}", "name": name, "description": about,
        "dataType": kind,
        "source": {"fileObject": {"@id": RECORDS_FILE}, "extract": {"column": name}},
    }


def _source_entry(source: SourceInfo) -> dict[str, Any]:
    entry = {"@type": "sc:CreativeWork", "name": source.name, "license": source.licence,
             "description": source.description or f"source '{source.name}'",
             "sourceOrganization": source.origin,
             "contributor": {"@type": "sc:Person", "name": source.added_by},
             "dateCreated": source.added_at}
    if source.origin.startswith(("http://", "https://")):
        entry["url"] = source.origin
    return entry


def _collection(sources: list[SourceInfo]) -> str:
    parts = [f"{s.name}: from {s.origin} under licence {s.licence}, added by {s.added_by} "
             f"on {s.added_at[:10]}" for s in sources]
    return "Records were read from these sources by harmtrace ingest: " + "; ".join(parts) + "."


def _biases(findings: dict[str, Any]) -> str:
    attribution = findings.get("attribution")
    if not attribution:
        return ("No attribution was run on this workspace; the sources' share of harmful "
                "behaviour is unknown.")
    tops = {m: v[0]["source"] for m, v in attribution["top_sources"].items() if v}
    listed = ", ".join(f"{m}: {s}" for m, s in tops.items())
    text = (f"Attribution of harmful generations (dataset version "
            f"{(attribution['dataset_version'] or 'unknown')[:12]}) ranks these sources "
            f"first: {listed}.")
    effects = findings.get("removal_effects")
    if effects:
        shown = ", ".join(f"{m}: effect {v['effect']:.3g} (p = {v['p_value']:.3g})"
                          for m, v in effects["methods"].items()
                          if v.get("effect") is not None and v.get("p_value") is not None)
        text += f" Removing each method's top {effects['k']} records: {shown}."
    return text
