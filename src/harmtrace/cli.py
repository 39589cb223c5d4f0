"""The ``harmtrace`` command line: parse, call the library, print, map errors to exit codes."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import click
from rich.console import Console

from harmtrace._cli_versions import add_version_commands
from harmtrace.errors import ConfigError, HarmtraceError

__all__ = ["main"]

console = Console(stderr=True)


class ConsoleReporter:
    """Prints stage headers, progress every ~10% and notes to standard error."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._last: dict[str, int] = {}

    def stage(self, name: str, message: str) -> None:
        if not self.quiet:
            console.print(f"[bold cyan]{name}[/] {message}")

    def step(self, label: str, done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if self.quiet or self._last.get(label) == tenth and done != total:
            return
        self._last[label] = tenth
        console.print(f"  {label}: {done}/{total}", highlight=False)

    def note(self, message: str) -> None:
        if not self.quiet:
            console.print(f"  {message}", highlight=False)


def _pipeline(config: str, workspace: str | None, quiet: bool, force: bool = False,
              methods: tuple[str, ...] = ()):
    from harmtrace.config import load_config, with_methods
    from harmtrace.pipeline import Pipeline

    settings = load_config(config)
    if methods:  # validated before the workspace is opened
        try:
            settings = with_methods(settings, methods)
        except ConfigError as err:
            raise ConfigError(f"--method: {err}") from err
    return Pipeline(settings, workspace=workspace, reporter=ConsoleReporter(quiet), force=force)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level to standard error.")
def cli(verbose: bool) -> None:
    """Trace harmful behaviour of a model back to the training data that caused it."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")


_config_arg = click.argument("config", type=click.Path(dir_okay=False))
_ws_opt = click.option("--workspace", "-w", default=None,
                       help="Workspace folder (default: the config's workspace.path).")
_quiet_opt = click.option("--quiet", "-q", is_flag=True, help="No progress output.")
_force_opt = click.option("--force", is_flag=True, help="Redo the stage even if up to date.")


@cli.command()
@_config_arg
@_ws_opt
@_quiet_opt
@_force_opt
def run(config: str, workspace: str | None, quiet: bool, force: bool) -> None:
    """Run every stage of the pipeline described by CONFIG (a TOML file)."""
    report = _pipeline(config, workspace, quiet, force).run()
    click.echo(f"report: {report}")


def _stage_command(name: str, help_text: str) -> None:
    @cli.command(name=name, help=help_text)
    @_config_arg
    @_ws_opt
    @_quiet_opt
    @_force_opt
    def command(config: str, workspace: str | None, quiet: bool, force: bool) -> None:
        pipeline = _pipeline(config, workspace, quiet, force)
        result = getattr(pipeline, name)()
        if isinstance(result, Path):
            click.echo(f"report: {result}")


for _name, _help in [
    ("ingest", "Read the sources into the database and create a dataset version."),
    ("train", "Train the model (or register train.model_path) on the dataset version."),
    ("measure", "Generate from the probes and measure the harm rate with a 95% CI."),
    ("evaluate", "Score attribution against hidden labels (evaluation.ground_truth)."),
    ("verify", "Retrain without top-k and random-k records; test the difference."),
    ("report", "Write report.html, report.md and summary.json."),
]:
    _stage_command(_name, _help)


@cli.command()
@_config_arg
@_ws_opt
@_quiet_opt
@_force_opt
@click.option("--method", "-m", "methods", multiple=True, metavar="NAME[,NAME...]",
              help="Run these methods instead of attribute.methods (repeatable, or a comma "
                   "list), e.g. --method ekfac --method bm25.")
def attribute(config: str, workspace: str | None, quiet: bool, force: bool,
              methods: tuple[str, ...]) -> None:
    """Score training records against the harmful generations."""
    _pipeline(config, workspace, quiet, force, methods).attribute()


@cli.command()
@click.option("--workspace", "-w", default="harmtrace-demo", show_default=True,
              help="Folder for the demo's workspace.")
@click.option("--size", type=click.Choice(["full", "small"]), default="full",
              show_default=True, help="Scenario size when the public datasets are found.")
@_quiet_opt
def demo(workspace: str, size: str, quiet: bool) -> None:
    """Run the offensive-tweets investigation end to end, offline."""
    from harmtrace.config import load_config
    from harmtrace.datasets import locate_data
    from harmtrace.pipeline import Pipeline
    from harmtrace.scenario.demo import prepare_demo

    data_dir, where = locate_data()
    console.print(f"[bold]data[/]: {where}")
    scenario, config_path = prepare_demo(Path(workspace).resolve(), data_dir=data_dir,
                                         size=size)
    console.print(f"[bold]scenario[/]: {scenario.kind} ({scenario.description}); "
                  f"config written to {config_path}")
    pipeline = Pipeline(load_config(config_path), reporter=ConsoleReporter(quiet))
    report = pipeline.run(scenario={"name": "offensive-tweets", "kind": scenario.kind,
                                    "description": scenario.description})
    click.echo(f"report: {report}")


@cli.command()
@_config_arg
@_ws_opt
@_quiet_opt
@click.option("--baseline", required=True, help="The released model: id or unambiguous prefix.")
@click.option("--candidate", required=True, help="The new model: id or unambiguous prefix.")
@click.option("--policy", default=None, type=click.Path(dir_okay=False),
              help="TOML file with a [monitor] table of thresholds (default: built in).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def monitor(config: str, workspace: str | None, quiet: bool, baseline: str, candidate: str,
            policy: str | None, as_json: bool) -> None:
    """Release gate: exit 1 if CANDIDATE is worse than BASELINE on harm rate or held-out
    perplexity (or drift, if the policy says so), 0 if not."""
    import json

    from harmtrace.config import load_config
    from harmtrace.remediate import load_policy, monitor_models, render_monitor

    thresholds = load_policy(policy) if policy else None
    result = monitor_models(load_config(config), baseline=baseline, candidate=candidate,
                            workspace=workspace, policy=thresholds,
                            reporter=ConsoleReporter(quiet))
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        render_monitor(result, Console())
    click.echo(result.summary, err=True)
    if result.regression:
        sys.exit(1)


@cli.group()
def ledger() -> None:
    """Inspect and verify the workspace's ledger."""


_ledger_ws = click.option("--workspace", "-w", default="harmtrace-demo", show_default=True,
                          help="The workspace folder whose ledger to read.")
_ledger_db = click.option("--database-url", default=None,
                          help="Database URL (default: the workspace's SQLite file).")
_ledger_key = click.option("--public-key", "public_key", default=None,
                           type=click.Path(dir_okay=False),
                           help="Trusted public key file (default: the workspace's "
                                "keys/ledger-ed25519.pub).")


def _open_ledger(workspace: str, database_url: str | None, public_key: str | None = None):
    """The ledger of an existing workspace, for reading; creates nothing."""
    import sqlalchemy

    from harmtrace.errors import ArtifactError
    from harmtrace.ledger import Ledger, PublicKey
    from harmtrace.store import Database

    root = Path(workspace).resolve()
    if database_url is None and not (root / "harmtrace.db").is_file():
        raise ArtifactError(f"{root} holds no harmtrace workspace (no harmtrace.db); pass the "
                            "folder of an investigation with -w, or its --database-url")
    db = Database(database_url or f"sqlite:///{root / 'harmtrace.db'}")
    if not sqlalchemy.inspect(db.engine).has_table("ledger"):
        raise ArtifactError(f"the database of {root} has no ledger table: no stage has run "
                            "there yet; run `harmtrace ingest CONFIG` first")
    key = PublicKey.load(public_key) if public_key else None
    return Ledger.for_workspace(db, root, public_key=key, read_only=True)


def _write_json(data: dict, out: str | None) -> None:
    import json

    from harmtrace.workspace import atomic_write_json

    if out:
        atomic_write_json(Path(out), data)
        click.echo(f"written to {out}")
    else:
        click.echo(json.dumps(data, indent=2))


@ledger.command(name="verify")
@_ledger_ws
@_ledger_db
@_ledger_key
@click.option("--bundle", default=None, type=click.Path(dir_okay=False),
              help="Verify an exported bundle offline instead of the workspace.")
@click.option("--head", "head_file", default=None, type=click.Path(dir_okay=False),
              help="With --bundle: a head file kept elsewhere (ledger-head.json) that the "
                   "bundle must reach, so a bundle cut short fails.")
def ledger_verify(workspace: str, database_url: str | None, public_key: str | None,
                  bundle: str | None, head_file: str | None) -> None:
    """Check every entry, the Merkle tree, the signed heads and the data; exit 1 on any
    change, naming the first bad entry."""
    if bundle:
        from harmtrace.ledger import PublicKey, verify_bundle

        report = verify_bundle(bundle, PublicKey.load(public_key) if public_key else None,
                               trusted_head=_load_head(head_file) if head_file else None)
    else:
        opened = _open_ledger(workspace, database_url, public_key)
        if opened.public_key is None:
            from harmtrace.errors import LedgerError

            raise LedgerError(f"no public key to check the signatures: {workspace}/keys/"
                              "ledger-ed25519.pub is missing; pass --public-key FILE (the "
                              ".pub file kept when the key was made)")
        report = opened.verify()
        if report.ok and not public_key:
            report = dataclasses.replace(report, reason=report.reason + (
                " (key read from the workspace's keys/ledger-ed25519.pub; pass --public-key "
                "with a copy kept elsewhere to rule out a rewrite under a new key)"))
    if report.ok:
        click.echo(f"ledger ok: {report.reason}")
        return
    where = f" at entry {report.first_bad_seq}" if report.first_bad_seq is not None else ""
    click.echo(f"ledger FAILED{where}: {report.reason}")
    sys.exit(1)


def _load_head(path: str):
    import json

    from harmtrace.errors import InputDataError
    from harmtrace.ledger import TreeHead

    try:
        return TreeHead.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputDataError(f"--head {path} is not a signed head file (ledger-head.json): "
                             f"{err}") from err


@ledger.command(name="show")
@_ledger_ws
@_ledger_db
def ledger_show(workspace: str, database_url: str | None) -> None:
    """List the ledger's entries."""
    for e in _open_ledger(workspace, database_url).entries():
        click.echo(f"{e.seq:4d} {e.time} {e.actor:10s} {e.stage:18s} {e.entry_hash[:16]}")


@ledger.command(name="prove")
@click.argument("seq", type=int)
@_ledger_ws
@_ledger_db
@click.option("--size", type=int, default=None, help="Tree size to prove against "
              "(default: the newest signed head).")
@click.option("--out", "-o", default=None, help="Write the proof to this JSON file.")
def ledger_prove(seq: int, workspace: str, database_url: str | None, size: int | None,
                 out: str | None) -> None:
    """Inclusion proof that entry SEQ is in the signed log (check it with `ledger check`)."""
    _write_json(_open_ledger(workspace, database_url).prove(seq, size), out)


@ledger.command(name="consistency")
@click.argument("old", type=int)
@click.argument("new", type=int, required=False)
@_ledger_ws
@_ledger_db
@click.option("--out", "-o", default=None, help="Write the proof to this JSON file.")
def ledger_consistency(old: int, new: int | None, workspace: str, database_url: str | None,
                       out: str | None) -> None:
    """Consistency proof that the log of OLD entries is a prefix of the log of NEW (default:
    the newest signed head)."""
    _write_json(_open_ledger(workspace, database_url).consistency(old, new), out)


@ledger.command(name="check")
@click.argument("proof_file", type=click.Path(dir_okay=False, exists=True))
@click.option("--public-key", "public_key", required=True, type=click.Path(dir_okay=False),
              help="Trusted public key file (ledger-ed25519.pub).")
def ledger_check(proof_file: str, public_key: str) -> None:
    """Check a proof file from `ledger prove` or `ledger consistency` offline; exit 1 if it
    does not hold."""
    import json

    from harmtrace.errors import InputDataError
    from harmtrace.ledger import PublicKey, check_proof

    try:
        proof = json.loads(Path(proof_file).read_text(encoding="utf-8"))
    except ValueError as err:
        raise InputDataError(f"proof file {proof_file} is not JSON: {err}") from err
    ok, why = check_proof(proof, PublicKey.load(public_key))
    click.echo(f"proof {'ok' if ok else 'FAILED'}: {why}")
    if not ok:
        sys.exit(1)


@ledger.command(name="export")
@_ledger_ws
@_ledger_db
@click.option("--out", "-o", required=True, help="The bundle file to write (JSON).")
def ledger_export(workspace: str, database_url: str | None, out: str) -> None:
    """Write the log, its signed heads and the record hashes of every named dataset version
    to one file that `ledger verify --bundle` checks offline."""
    from harmtrace.ledger import export_bundle

    summary = export_bundle(_open_ledger(workspace, database_url), out)
    click.echo(f"bundle {out}: {summary['entries']} entries, {summary['heads']} signed heads, "
               f"{summary['versions']} dataset versions")


@cli.group()
def data() -> None:
    """Datasets: the demo's public data, and the workspace's dataset versions."""


# versions, prove, diff, edit, erase, export; and the `models` group
add_version_commands(data, cli)


@data.command(name="fetch")
@click.option("--dest", default=None, help="Target folder (default: the user cache).")
def data_fetch(dest: str | None) -> None:
    """Download the demo's public datasets and check their SHA-256 checksums."""
    from harmtrace.datasets import fetch_all

    folder = fetch_all(Path(dest) if dest else None, progress=click.echo)
    click.echo(f"datasets in {folder}; set HARMTRACE_DATA_DIR={folder} or run `harmtrace demo`")


def _require_ingest(config: str, workspace: str | None) -> None:
    """Refuse a workspace without a dataset version before the pipeline opens it (which
    creates the folder, the database and the ledger keys), so the refusal creates nothing."""
    from harmtrace.config import load_config
    from harmtrace.errors import ArtifactError

    settings = load_config(config)
    root = Path(workspace or settings.workspace).resolve()
    if settings.train.dataset_version:  # resolved in the database, which must exist
        if settings.database_url or (root / "harmtrace.db").is_file():
            return
        raise ArtifactError(f"{root} holds no harmtrace workspace (no harmtrace.db); run "
                            f"`harmtrace ingest {config}` first, or pass -w WORKSPACE")
    if not (root / "artifacts" / "ingest" / "meta.json").is_file():
        raise ArtifactError(f"artifact 'ingest' is missing from {root / 'artifacts'}; run "
                            f"`harmtrace ingest {config}` first, or pass -w WORKSPACE")


@data.command(name="map")
@_config_arg
@_ws_opt
@_quiet_opt
@_force_opt
@click.option("--show-text", is_flag=True,
              help="Also print the raw text of the exemplars; needs --reason and is recorded "
                   "in the ledger before anything is printed.")
@click.option("--reason", default="", help="Why raw text is shown (required with --show-text).")
@click.option("--json", "as_json", is_flag=True, help="Print the map as JSON instead of tables.")
def data_map(config: str, workspace: str | None, quiet: bool, force: bool, show_text: bool,
             reason: str, as_json: bool) -> None:
    """Map the dataset version: signals, duplicates, PII, clusters; aggregates only."""
    import json

    from harmtrace.datamap import render_datamap

    if show_text and not reason.strip():
        raise click.UsageError("--show-text needs --reason TEXT: every disclosure of raw text "
                               "is recorded in the ledger with its reason")
    if reason and not show_text:
        raise click.UsageError("--reason is only used with --show-text")
    _require_ingest(config, workspace)
    result = _pipeline(config, workspace, quiet, force).datamap(show_text=show_text,
                                                                 reason=reason)
    if as_json:
        click.echo(json.dumps({"summary": result.summary, "aggregates": result.aggregates,
                               **({"disclosed": result.disclosed} if show_text else {})},
                              indent=1, ensure_ascii=False))
        return
    render_datamap(result.summary, result.aggregates, Console(), disclosed=result.disclosed)


def _quiet_dependencies() -> None:
    """The command line shows harmtrace's own progress; silence the libraries' chatter."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main() -> None:
    _quiet_dependencies()
    try:
        cli.main(standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted; finished artifacts are kept and nothing half-written "
                   "remains; rerun the same command to resume", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except HarmtraceError as err:
        click.echo(f"{type(err).__name__}: {err}", err=True)
        sys.exit(2)
