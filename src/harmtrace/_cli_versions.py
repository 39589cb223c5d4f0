"""The command line for dataset versions and the model registry.

``harmtrace data versions|records|prove|diff|edit|erase|export`` and ``harmtrace models
list|show``: each parses its arguments, opens an existing workspace, calls
:mod:`harmtrace.versions` or :class:`~harmtrace.store.Database`, and prints. Errors are
:class:`~harmtrace.errors.HarmtraceError` that name the argument and the fix; ``main`` prints
them on one line and exits 2.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any

import click

__all__ = ["add_version_commands"]

_ws = click.option("--workspace", "-w", default="harmtrace-demo", show_default=True,
                   help="The workspace folder.")
_db = click.option("--database-url", default=None,
                   help="Database URL (default: the workspace's SQLite file).")


def _checked_actor(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """``--actor`` as given, or ConfigError if it is blank or holds control characters."""
    from harmtrace.errors import ConfigError

    if value is not None and (not value.strip() or any(
            unicodedata.category(ch) == "Cc" for ch in value)):
        raise ConfigError(f"--actor {value!r}: is blank or holds control characters "
                          "(newlines, tabs); give a plain one-line name, or leave --actor out "
                          "to use your login")
    return value


_actor = click.option("--actor", default=None, callback=_checked_actor,
                      help="Who makes the change (default: login).")
_reason = click.option("--reason", default=None,
                       help="Why (required; kept in the ledger).")


def _open(workspace: str, database_url: str | None):
    """The database of an existing workspace and its folder; creates nothing."""
    import sqlalchemy

    from harmtrace.errors import ArtifactError
    from harmtrace.store import Database
    from harmtrace.store import schema as t

    root = Path(workspace).resolve()
    if database_url is None and not (root / "harmtrace.db").is_file():
        raise ArtifactError(f"-w {workspace}: {root} holds no harmtrace workspace (no "
                            "harmtrace.db); pass the folder of an investigation, or its "
                            "--database-url")
    db = Database(database_url or f"sqlite:///{root / 'harmtrace.db'}")
    db.check_schema()
    if not sqlalchemy.inspect(db.engine).has_table(t.dataset_versions.name):
        raise ArtifactError(f"the database of {root} has no dataset versions yet; run "
                            "`harmtrace ingest CONFIG` first")
    return db, root


def _ledger(db: Any, root: Path):
    from harmtrace.ledger import Ledger

    return Ledger.for_workspace(db, root)


def _version(db: Any, value: str, argument: str) -> str:
    from harmtrace.errors import ConfigError

    try:
        return db.resolve_version(value)
    except ConfigError as err:
        raise ConfigError(f"{argument} {value!r}: {err}") from err


def _require_reason(reason: str | None) -> str:
    from harmtrace.errors import ConfigError

    if reason is None or not reason.strip():
        raise ConfigError("--reason is required: say why the data changes (e.g. --reason "
                          "'GDPR request 2024-17'); it is kept in the ledger")
    return reason


def _disclosure_reason(flag: str, shown: bool, reason: str | None) -> str | None:
    """The reason a text-showing ``flag`` needs; refused before any work if it is missing."""
    from harmtrace.errors import ConfigError

    if shown and (reason is None or not reason.strip()):
        raise ConfigError(f"{flag} needs --reason TEXT: every disclosure of text is recorded "
                          "in the ledger with its reason (e.g. --reason 'audit 2024-17')")
    if reason is not None and not shown:
        raise ConfigError(f"--reason is only used with {flag}; drop it, or add {flag}")
    return reason


def _read_text(path: str, argument: str) -> str:
    from harmtrace.errors import InputDataError

    try:
        return Path(path).read_text(encoding="utf-8").removesuffix("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise InputDataError(f"{argument} {path}: cannot read it as UTF-8 text ({err}); give "
                             "an existing text file") from err


# -- data ---------------------------------------------------------------------------------


@click.command(name="versions")
@_ws
@_db
def data_versions(workspace: str, database_url: str | None) -> None:
    """List the dataset versions, oldest first."""
    db, _ = _open(workspace, database_url)
    click.echo(f"{'version':14}{'parent':14}{'transform':12}{'records':>8}  "
               f"{'created_by':14}created_at")
    for v in db.list_versions():
        parent = v.parent[:12] if v.parent else "-"
        click.echo(f"{v.version_id[:12]:14}{parent:14}{v.transform:12}{v.n_records:>8}  "
                   f"{v.created_by:14}{v.created_at}")


@click.command(name="records")
@click.argument("version")
@_ws
@_db
@click.option("--source", default=None, help="Only the records of this source.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Print at most this many records.")
def data_records(version: str, workspace: str, database_url: str | None, source: str | None,
                 limit: int | None) -> None:
    """List VERSION's records (id, source, key, hash prefix, erased), never their text."""
    from harmtrace.errors import ConfigError

    db, _ = _open(workspace, database_url)
    version_id = _version(db, version, "VERSION")
    refs = db.version_refs(version_id)
    if source is not None:
        names = sorted({ref.source for ref in refs})
        if source not in names:
            raise ConfigError(f"--source {source!r}: version {version_id[:12]} holds no "
                              f"records of that source; its sources: {', '.join(names)}")
        refs = [ref for ref in refs if ref.source == source]
    shown = refs[:limit] if limit is not None else refs
    width = max([len("record_id"), *(len(ref.record_id) for ref in shown)]) + 2
    src_width = max([len("source"), *(len(ref.source) for ref in shown)]) + 2
    key_width = max([len("key"), *(len(ref.key) for ref in shown)]) + 2
    click.echo(f"{'record_id':{width}}{'source':{src_width}}{'key':{key_width}}"
               f"{'content_hash':14}erased")
    for ref in shown:
        click.echo(f"{ref.record_id:{width}}{ref.source:{src_width}}{ref.key:{key_width}}"
                   f"{ref.content_hash[:12]:14}{'yes' if ref.erased else 'no'}")
    if len(shown) < len(refs):
        click.echo(f"({len(refs) - len(shown)} more; raise --limit to see them)")


@click.command(name="prove")
@click.argument("version")
@click.argument("record_id")
@_ws
@_db
def data_prove(version: str, record_id: str, workspace: str, database_url: str | None) -> None:
    """Print the Merkle inclusion proof that RECORD_ID is in VERSION (JSON)."""
    from harmtrace.errors import InputDataError

    db, _ = _open(workspace, database_url)
    version_id = _version(db, version, "VERSION")
    if record_id not in {ref.record_id for ref in db.version_refs(version_id)}:
        raise InputDataError(f"RECORD_ID {record_id!r} is not in dataset version "
                             f"{version_id[:12]}; list its records with `harmtrace data "
                             f"records {version_id[:12]} -w {workspace}`")
    proof = db.record_inclusion_proof(version_id, record_id)
    click.echo(json.dumps({
        "version_id": proof.version_id, "record_id": proof.record_id,
        "content_hash": proof.content_hash, "leaf_index": proof.index,
        "tree_size": proof.size, "proof": list(proof.proof), "verified": proof.verify(),
        "leaf": "SHA-256(0x00 || UTF-8(record_id + '\\n' + content_hash)), RFC 6962",
    }, indent=2))


@click.command(name="diff")
@click.argument("a")
@click.argument("b")
@_ws
@_db
@click.option("--show-text", is_flag=True,
              help="Also show masked excerpts of the records named; needs --reason and is "
                   "logged to the ledger before anything is shown.")
@click.option("--reason", default=None, help="Why text is shown (required with --show-text).")
@_actor
def data_diff(a: str, b: str, workspace: str, database_url: str | None, show_text: bool,
              reason: str | None, actor: str | None) -> None:
    """Records added, removed and changed (same key, other content) from A to B, per source."""
    from harmtrace.versions import diff_excerpts, diff_versions

    reason = _disclosure_reason("--show-text", show_text, reason)
    db, root = _open(workspace, database_url)
    diff = diff_versions(db, _version(db, a, "A"), _version(db, b, "B"))
    excerpts = (diff_excerpts(db, diff, reason=reason, actor=actor, ledger=_ledger(db, root))
                if show_text else {})

    def line(mark: str, text: str, rid: str) -> str:
        shown = f"  {json.dumps(excerpts[rid], ensure_ascii=False)}" if rid in excerpts else ""
        return f"  {mark} {text}{shown}"

    click.echo(f"diff {diff.a[:12]} -> {diff.b[:12]}: {_counts(diff.counts)}")
    for src in diff.sources:
        click.echo(f"source {src.source}: {_counts(src.counts)}")
        for rid in src.added:
            click.echo(line("+", rid, rid))
        for rid in src.removed:
            click.echo(line("-", rid, rid))
        for old, new in src.changed:
            click.echo(line("~", f"{old} -> {new}", new))


def _counts(counts: dict[str, int]) -> str:
    return (f"+{counts['added']} added, -{counts['removed']} removed, "
            f"~{counts['changed']} changed")


@click.command(name="edit")
@_ws
@_db
@click.option("--from", "parent", required=True, help="The dataset version to edit (id or "
              "unambiguous prefix).")
@click.option("--delete", "deletes", multiple=True, metavar="RECORD_ID",
              help="Leave this record out (repeatable).")
@click.option("--replace", "replaces", multiple=True, nargs=2, metavar="RECORD_ID TEXTFILE",
              help="Replace the record's text with the file's (repeatable).")
@click.option("--add-jsonl", default=None, metavar="FILE",
              help="Add the records of this JSONL file (needs --source).")
@click.option("--source", default=None, help="The registered source the added records join.")
@click.option("--text-field", default="text", show_default=True,
              help="The JSONL field that holds the text.")
@_reason
@_actor
def data_edit(workspace: str, database_url: str | None, parent: str, deletes: tuple[str, ...],
              replaces: tuple[tuple[str, str], ...], add_jsonl: str | None,
              source: str | None, text_field: str, reason: str | None,
              actor: str | None) -> None:
    """Make a child version of --from with records deleted, replaced or added."""
    from harmtrace.errors import ConfigError
    from harmtrace.versions import RecordEdit, edit_version

    reason = _require_reason(reason)
    if (add_jsonl is None) != (source is None):
        raise ConfigError("--add-jsonl and --source go together: name the file and the "
                          "registered source its records join")
    edits = [RecordEdit.delete(rid) for rid in deletes]
    edits += [RecordEdit.replace(rid, _read_text(path, f"--replace {rid}"))
              for rid, path in replaces]
    if add_jsonl is not None:
        edits += _jsonl_adds(add_jsonl, source, text_field)
    if not edits:
        raise ConfigError("no edit given; pass --delete RECORD_ID, --replace RECORD_ID "
                          "TEXTFILE or --add-jsonl FILE --source NAME")
    db, root = _open(workspace, database_url)
    result = edit_version(db, _version(db, parent, "--from"), edits, reason=reason,
                          actor=actor, ledger=_ledger(db, root))
    click.echo(f"version {result.version_id} ({result.n_records} records) from "
               f"{result.parent[:12]}: {len(result.changes)} record edits, ledger entries "
               f"{result.ledger_seqs[0]}-{result.ledger_seqs[-1]}")
    if result.existing is not None:
        old = result.existing
        origin = f" from {old.parent[:12]}" if old.parent else ""
        click.echo(f"note: this version already existed (created by {old.created_by} at "
                   f"{old.created_at}{origin}, transform {old.transform}); it was not stored "
                   "again, and the ledger entries above record this edit")


def _jsonl_adds(path: str, source: str, text_field: str) -> list:
    """One add per line of the JSONL file; errors name --add-jsonl, the line and the fix."""
    import gzip

    from harmtrace.errors import InputDataError
    from harmtrace.hashing import canonical_json
    from harmtrace.versions import RecordEdit

    where = f"--add-jsonl {path}"
    file = Path(path)
    if not file.is_file():
        raise InputDataError(f"{where}: no such file; give the path of a JSONL file with one "
                             "object per line")
    try:
        data = file.read_bytes()
        text = (gzip.decompress(data) if file.suffix == ".gz" else data).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise InputDataError(f"{where}: cannot read it as UTF-8 JSONL ({err}); give a UTF-8 "
                             "text file (gzip if it ends in .gz)") from err
    first: dict[str, int] = {}  # text -> line it first appears on
    adds = []
    for line_no, line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputDataError(f"{where}, line {line_no}: not valid JSON ({err.msg}, column "
                                 f"{err.colno}); each line must hold one JSON object") from err
        if not isinstance(obj, dict):
            raise InputDataError(f"{where}, line {line_no}: expected a JSON object, found a "
                                 f"{type(obj).__name__}; write each record as {{\"text\": ...}}")
        value = obj.get(text_field)
        if not isinstance(value, str) or not value.strip():
            found = ("is missing (fields: " + ", ".join(sorted(obj)) + ")"
                     if text_field not in obj else "holds no text")
            raise InputDataError(f"{where}, line {line_no}: field {text_field!r} {found}; "
                                 "pass --text-field NAME for the field that holds the text, "
                                 "or fix the line")
        if value in first:
            raise InputDataError(f"{where}, line {line_no}: the file repeats the text of line "
                                 f"{first[value]}; remove line {line_no} (each added record "
                                 "needs its own text)")
        first[value] = line_no
        meta = {k: v if isinstance(v, str) else canonical_json(v)
                for k, v in obj.items() if k != text_field}
        adds.append(RecordEdit.add(source, value, meta))
    if not adds:
        raise InputDataError(f"{where}: the add file has no records (it is empty or blank); "
                             "give a JSONL file with one object per line, or drop --add-jsonl")
    return adds


@click.command(name="erase")
@click.argument("record_id")
@_ws
@_db
@_reason
@_actor
def data_erase(record_id: str, workspace: str, database_url: str | None, reason: str | None,
               actor: str | None) -> None:
    """Erase RECORD_ID's text from the database; its hash stays, so versions still verify."""
    from harmtrace.versions import erase_record

    reason = _require_reason(reason)
    db, root = _open(workspace, database_url)
    result = erase_record(db, record_id, reason=reason, actor=actor, ledger=_ledger(db, root))
    click.echo(f"erased the text of {record_id} (ledger entry {result.ledger_seq}); "
               f"{len(result.versions)} versions list it: "
               f"{', '.join(v[:12] for v in result.versions)}")
    if result.versions:
        click.echo("to train or report again, make a version without it: harmtrace data edit "
                   f"--from {result.versions[-1][:12]} --delete {record_id} --reason ...")


@click.command(name="export")
@click.argument("version")
@_ws
@_db
@click.option("--out", required=True,
              help="Folder for croissant.json and records.jsonl: new, empty, or holding only "
                   "an earlier export.")
@click.option("--include-text", is_flag=True,
              help="Export raw text instead of masked text; needs --reason and is logged to "
                   "the ledger.")
@click.option("--reason", default=None,
              help="Why raw text is exported (required with --include-text).")
@_actor
def data_export(version: str, workspace: str, database_url: str | None, out: str,
                include_text: bool, reason: str | None, actor: str | None) -> None:
    """Write VERSION as a Croissant 1.0 dataset (JSON-LD with RAI fields) into --out."""
    from harmtrace.versions import check_export_folder, export_croissant

    reason = _disclosure_reason("--include-text", include_text, reason)
    check_export_folder(out, "--out")
    db, root = _open(workspace, database_url)
    result = export_croissant(db, _version(db, version, "VERSION"), out,
                              include_text=include_text, reason=reason,
                              artifacts=root / "artifacts", actor=actor,
                              ledger=_ledger(db, root))
    click.echo(f"croissant: {result.croissant} ({result.n_records} records in "
               f"{result.records.name}, ledger entry {result.ledger_seq})")


# -- models -------------------------------------------------------------------------------


@click.group(name="models")
def models() -> None:
    """The model registry: models, their checkpoints and attribution runs."""


@models.command(name="list")
@_ws
@_db
def models_list(workspace: str, database_url: str | None) -> None:
    """List the registered models, oldest first."""
    db, _ = _open(workspace, database_url)
    runs = db.attribution_runs()
    click.echo(f"{'model':18}{'dataset':14}{'checkpoints':>12}{'runs':>6}  {'base_model':20}"
               "created_at")
    for m in db.list_models():
        n_runs = sum(r.model_id == m.model_id for r in runs)
        click.echo(f"{m.model_id:18}{m.dataset_version[:12]:14}{len(m.checkpoints):>12}"
                   f"{n_runs:>6}  {m.base_model or '-':20}{m.created_at}")


@models.command(name="show")
@click.argument("model_id")
@_ws
@_db
def models_show(model_id: str, workspace: str, database_url: str | None) -> None:
    """Show MODEL_ID: config, dataset version, base model, checkpoints, attribution runs."""
    from harmtrace.errors import ConfigError

    db, _ = _open(workspace, database_url)
    try:
        model = db.get_model(db.resolve_model(model_id))
    except ConfigError as err:
        raise ConfigError(f"MODEL_ID {model_id!r}: {err}") from err
    runs = db.attribution_runs(model_id=model.model_id)
    click.echo(json.dumps({
        "model_id": model.model_id, "dataset_version": model.dataset_version,
        "base_model": model.base_model, "created_at": model.created_at,
        "config": dict(model.config),
        "checkpoints": [{"step": c.step, "path": c.path, "sha256": c.sha256}
                        for c in model.checkpoints],
        "attribution_runs": [{"run_id": r.run_id, "method": r.method,
                              "dataset_version": r.dataset_version,
                              "scores_sha256": r.scores_sha256, "created_at": r.created_at,
                              "settings": dict(r.settings)} for r in runs],
    }, indent=2, default=str))


def add_version_commands(data: click.Group, cli: click.Group) -> None:
    """Attach the dataset-version commands to ``data`` and the ``models`` group to ``cli``."""
    for command in (data_versions, data_records, data_prove, data_diff, data_edit, data_erase,
                    data_export):
        data.add_command(command)
    cli.add_command(models)
