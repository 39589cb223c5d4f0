"""The command line: a whole run, skipped stages, readable errors, kills, tampering, data."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from harmtrace import datasets
from harmtrace.cli import main
from harmtrace.config import load_config
from harmtrace.errors import InputDataError
from harmtrace.ledger import Ledger
from harmtrace.pipeline import Pipeline
from harmtrace.scenario.demo import prepare_demo
from harmtrace.store import Database
from harmtrace.store import schema as t
from helpers import run_cli, toml_text

REPORT_FILES = ("report.html", "report.md", "summary.json")


def _copy(workspace: Path, dest: Path) -> Path:
    """A copy of ``workspace`` (database, anchor and artifacts) to change freely."""
    return Path(shutil.copytree(workspace, dest))


def _ledger(workspace: Path) -> Ledger:
    db = Database(f"sqlite:///{workspace / 'harmtrace.db'}")
    return Ledger.for_workspace(db, workspace, read_only=True)


# -- a whole run -------------------------------------------------------------------------


def test_run_writes_the_report_and_one_verified_ledger_entry_per_stage(finished_run) -> None:
    report = finished_run.workspace / "artifacts" / "report"
    for name in REPORT_FILES:
        assert (report / name).stat().st_size > 0, name

    result = run_cli("ledger", "verify", "-w", str(finished_run.workspace))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ledger ok: 5 entries verify; signed heads checked")

    stages = [e.stage for e in _ledger(finished_run.workspace).entries()]
    assert stages == ["ingest", "train", "measure", "attribute", "report"]


def test_report_files_hold_no_handle_of_the_synthetic_tweets(finished_run) -> None:
    handles = set()
    for source in finished_run.tables["sources"]:
        for line in Path(source["path"]).read_text(encoding="utf-8").splitlines():
            handles |= set(re.findall(r"@\w+", json.loads(line)["text"]))
    assert len(handles) > 50  # the scenario's tweets do carry handles

    report = finished_run.workspace / "artifacts" / "report"
    texts = {name: (report / name).read_text(encoding="utf-8") for name in REPORT_FILES}
    for name, text in texts.items():
        leaked = sorted(h for h in handles if re.search(re.escape(h) + r"(?!\w)", text))
        assert leaked == [], f"{name} shows handles {leaked[:5]}"
    # The report lists every record, so the tweets are there, masked.
    assert "@[user]" in texts["report.md"]


def test_rerunning_an_unchanged_stage_says_up_to_date_skipped(finished_run, tmp_path) -> None:
    workspace = _copy(finished_run.workspace, tmp_path / "ws")
    before = len(_ledger(workspace).entries())

    result = run_cli("measure", str(finished_run.config), "-w", str(workspace))

    assert result.returncode == 0, result.stderr
    assert "up to date, skipped" in result.stderr
    assert len(_ledger(workspace).entries()) == before  # a skipped stage logs nothing


# -- bad input ---------------------------------------------------------------------------

_SOURCE_CASES = {
    # case: (file bytes, error type, fragments the message must hold)
    "malformed-jsonl-line": (b'{"text": "one"}\n{"text": "two"\n', "InputDataError",
                             ("data.jsonl, line 2", "not valid JSON")),
    "missing-text-field": (b'{"text": "one"}\n{"body": "two"}\n', "InputDataError",
                           ("data.jsonl, line 2", "field 'text' is missing")),
    "empty-source": (b"", "InputDataError", ("data.jsonl, line 1", "has no records")),
    "non-utf8-bytes": (b'{"text": "one"}\n{"text": "caf\xe9"}\n', "InputDataError",
                       ("data.jsonl, line 2", "0xe9", "UTF-8")),
    "duplicated-record": (b'{"text": "one"}\n{"text": "two"}\n{"text": "one"}\n',
                          "InputDataError", ("data.jsonl, line 3", "repeats the text of line 1")),
}

_CONFIG_CASES = {
    "unknown-key": ({"train": {"epoch": 1}}, "ConfigError",
                    ("config.toml", "unknown key 'train.epoch'", "did you mean 'epochs'?")),
    "not-toml": ("[train\nepochs = 1\n", "ConfigError",
                 ("config.toml", "not valid TOML", "line 1")),
}


def _bad_input(tmp_path: Path, source: bytes, extra: dict | str | None = None) -> Path:
    """A config with one source holding ``source``; ``extra`` adds tables or replaces all."""
    (tmp_path / "data.jsonl").write_bytes(source)
    config = tmp_path / "config.toml"
    if isinstance(extra, str):
        config.write_text(extra, encoding="utf-8")
        return config
    tables = {"workspace": {"path": "ws"},
              "sources": [{"name": "chat", "path": "data.jsonl", "format": "jsonl"}],
              "behaviour": {"probes": ["hello"]}, **(extra or {})}
    config.write_text(toml_text(tables), encoding="utf-8")
    return config


def _assert_nothing_stored(workspace: Path) -> None:
    assert not (workspace / "artifacts" / "ingest").exists()
    if not (workspace / "harmtrace.db").exists():
        return
    db = Database(f"sqlite:///{workspace / 'harmtrace.db'}")
    try:
        assert db.list_versions() == []
        with db.engine.connect() as conn:
            for table in (t.records, t.sources, t.ledger):
                assert conn.execute(select(func.count()).select_from(table)).scalar_one() == 0
    finally:
        db.dispose()


def _main(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Exit code and standard error of ``harmtrace ARGV`` run in this process."""
    monkeypatch.setattr(sys, "argv", ["harmtrace", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(_SOURCE_CASES) + sorted(_CONFIG_CASES))
def test_bad_input_gives_one_error_line_exit_2_and_stores_nothing(
    case: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    if case in _SOURCE_CASES:
        content, error, fragments = _SOURCE_CASES[case]
        config = _bad_input(tmp_path, content)
    else:
        extra, error, fragments = _CONFIG_CASES[case]
        config = _bad_input(tmp_path, b'{"text": "one"}\n', extra)

    code, err = _main(["run", "-q", str(config)], monkeypatch, capsys)

    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{error}: ")
    for fragment in fragments:
        assert fragment in lines[0]
    _assert_nothing_stored(tmp_path / "ws")


def test_bad_input_in_a_fresh_process_prints_no_traceback(tmp_path: Path) -> None:
    config = _bad_input(tmp_path, b'{"text": "one"}\n{"text": \n')

    result = run_cli("run", "-q", str(config))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("InputDataError: ")
    assert "data.jsonl, line 2: not valid JSON" in lines[0]
    _assert_nothing_stored(tmp_path / "ws")


# -- a stage killed for real -------------------------------------------------------------


def _wait_for(predicate, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(0.05)


def test_train_killed_midway_leaves_no_model_and_a_rerun_completes(
    finished_run, tmp_path: Path
) -> None:
    tables = {**finished_run.tables, "workspace": {"path": str(tmp_path / "ws")},
              # about 140 steps (5 s on 2 cores): long enough to be killed in the middle
              "train": {**finished_run.tables["train"], "epochs": 20, "n_checkpoints": 4}}
    config = tmp_path / "config.toml"
    config.write_text(toml_text(tables), encoding="utf-8")
    Pipeline(load_config(config)).ingest()
    artifacts = tmp_path / "ws" / "artifacts"

    process = subprocess.Popen([sys.executable, "-m", "harmtrace", "train", "-q", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: any(artifacts.glob(".tmp-model-*")) or process.poll() is not None,
                  timeout=120, what="training to start")
        # Kill after 2 s of training, or as soon as the first of 4 checkpoints is written,
        # whichever comes first: either way the model folder is only partly written.
        started = time.monotonic()
        _wait_for(lambda: (time.monotonic() - started > 2.0
                           or any(artifacts.glob(".tmp-model-*/checkpoint-*"))),
                  timeout=10, what="the first checkpoint")
        assert process.poll() is None, process.stderr.read().decode()
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    assert not (artifacts / "model").exists()
    partial = list(artifacts.glob(".tmp-model-*"))
    assert partial and not (partial[0] / "meta.json").exists()

    Pipeline(load_config(config)).train()

    model = json.loads((artifacts / "model" / "model.json").read_text(encoding="utf-8"))
    assert (artifacts / "model" / "meta.json").exists()
    assert len(model["checkpoints"]) == 4
    for checkpoint in model["checkpoints"]:
        assert (artifacts / "model" / checkpoint["path"]).is_dir()
    report = _ledger(tmp_path / "ws").verify()
    assert report.ok, report.reason
    assert [e.stage for e in _ledger(tmp_path / "ws").entries()] == ["ingest", "train"]


# -- tampering ---------------------------------------------------------------------------


def test_a_changed_ledger_row_fails_verification_naming_the_entry(
    finished_run, tmp_path: Path
) -> None:
    workspace = _copy(finished_run.workspace, tmp_path / "ws")
    with sqlite3.connect(workspace / "harmtrace.db") as conn:
        conn.execute("UPDATE ledger SET actor = 'mallory' WHERE seq = 2")

    result = run_cli("ledger", "verify", "-w", str(workspace))

    assert result.returncode == 1
    assert "ledger FAILED at entry 2" in result.stdout


def test_a_deleted_last_ledger_row_fails_verification_against_the_signed_heads(
    finished_run, tmp_path: Path
) -> None:
    workspace = _copy(finished_run.workspace, tmp_path / "ws")
    with sqlite3.connect(workspace / "harmtrace.db") as conn:
        conn.execute("DELETE FROM ledger WHERE seq = (SELECT MAX(seq) FROM ledger)")

    result = run_cli("ledger", "verify", "-w", str(workspace))

    assert result.returncode == 1
    assert "ledger FAILED at entry 5" in result.stdout
    assert "removed" in result.stdout


# -- public data -------------------------------------------------------------------------


def _real_files() -> dict[str, bytes]:
    """URL -> bytes of each file in $HARMTRACE_DATA_DIR; skips the test when it is unset."""
    folder = os.environ.get("HARMTRACE_DATA_DIR")
    if not folder:
        pytest.skip("HARMTRACE_DATA_DIR is not set; point it at the fetched public datasets")
    return {url: (Path(folder) / rel).read_bytes()
            for rel, (url, _) in datasets.FILES.items()}


def test_fetch_writes_every_file_with_its_checksum(tmp_path: Path) -> None:
    served = _real_files()

    folder = datasets.fetch_all(tmp_path / "data", progress=lambda _: None,
                                opener=served.__getitem__)

    for rel, (_, digest) in datasets.FILES.items():
        assert hashlib.sha256((folder / rel).read_bytes()).hexdigest() == digest


def test_fetch_refuses_a_corrupted_file_naming_the_url_and_writes_nothing(
    tmp_path: Path
) -> None:
    first_url = next(iter(datasets.FILES.values()))[0]
    try:
        original = _real_files()[first_url]
    except pytest.skip.Exception:
        original = b"stand-in bytes: the checksum test needs no real data"
    corrupted = bytes([original[0] ^ 0x01]) + original[1:]

    with pytest.raises(InputDataError, match=re.escape(first_url)):
        datasets.fetch_all(tmp_path / "data", progress=lambda _: None,
                           opener=lambda url: corrupted)

    assert not [p for p in (tmp_path / "data").rglob("*") if p.is_file()]


def test_demo_without_public_data_chooses_the_built_in_scenario_and_says_so(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.delenv("HARMTRACE_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    data_dir, where = datasets.locate_data()

    assert data_dir is None
    assert "no public datasets found" in where and "built-in scenario" in where
    scenario, config = prepare_demo(tmp_path / "demo", data_dir=data_dir, size="small")
    assert scenario.kind == "synthetic"
    assert load_config(config).sources[0].path.exists()


def test_ledger_proofs_and_bundles_check_offline_from_the_command_line(
    finished_run, tmp_path: Path
) -> None:
    workspace = _copy(finished_run.workspace, tmp_path / "ws")
    pub = str(workspace / "keys" / "ledger-ed25519.pub")
    ws = ["-w", str(workspace)]

    assert run_cli("ledger", "prove", "2", *ws, "-o", str(tmp_path / "p.json")).returncode == 0
    checked = run_cli("ledger", "check", str(tmp_path / "p.json"), "--public-key", pub)
    assert checked.returncode == 0 and "entry 2 is in the log of 5" in checked.stdout

    made = run_cli("ledger", "consistency", "2", "4", *ws, "-o", str(tmp_path / "c.json"))
    assert made.returncode == 0
    checked = run_cli("ledger", "check", str(tmp_path / "c.json"), "--public-key", pub)
    assert checked.returncode == 0 and "prefix" in checked.stdout

    bundle = tmp_path / "bundle.json"
    assert run_cli("ledger", "export", *ws, "-o", str(bundle)).returncode == 0
    verified = run_cli("ledger", "verify", "--bundle", str(bundle), "--public-key", pub)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    data = json.loads(bundle.read_text())
    data["entries"][2]["actor"] = "mallory"
    bundle.write_text(json.dumps(data))
    tampered = run_cli("ledger", "verify", "--bundle", str(bundle), "--public-key", pub)
    assert tampered.returncode == 1
    assert "ledger FAILED at entry 3" in tampered.stdout


def test_ledger_verify_without_a_public_key_is_refused(finished_run, tmp_path: Path) -> None:
    workspace = _copy(finished_run.workspace, tmp_path / "ws")
    (workspace / "keys" / "ledger-ed25519.pub").unlink()
    result = run_cli("ledger", "verify", "-w", str(workspace))
    assert result.returncode == 2
    assert "--public-key" in result.stderr


def test_an_erased_record_blocks_training_until_a_version_without_it_is_trained(
    finished_run, tmp_path: Path
) -> None:
    workspace = _copy(finished_run.workspace, tmp_path / "ws")
    ws = ["-w", str(workspace)]
    db = Database(f"sqlite:///{workspace / 'harmtrace.db'}")
    version = db.list_versions()[0].version_id
    erased = db.version_refs(version)[0].record_id
    db.dispose()
    tables = {**finished_run.tables, "workspace": {"path": str(workspace)}}
    config = tmp_path / "config.toml"
    config.write_text(toml_text(tables), encoding="utf-8")

    assert run_cli("data", "erase", erased, *ws, "--reason", "privacy request").returncode == 0
    blocked = run_cli("train", str(config), "--force")
    assert blocked.returncode == 2
    assert erased in blocked.stderr and "train.dataset_version" in blocked.stderr

    edit = run_cli("data", "edit", *ws, "--from", version[:8], "--delete", erased,
                   "--reason", "drop the erased record")
    assert edit.returncode == 0, edit.stderr
    child = Database(f"sqlite:///{workspace / 'harmtrace.db'}").list_versions()[-1]
    assert child.parent == version

    tables["train"] = {**tables["train"], "dataset_version": child.version_id[:10]}
    config.write_text(toml_text(tables), encoding="utf-8")
    trained = run_cli("train", str(config))
    assert trained.returncode == 0, trained.stderr
    models = Database(f"sqlite:///{workspace / 'harmtrace.db'}").list_models()
    assert models[-1].dataset_version == child.version_id
    assert run_cli("ledger", "verify", *ws).returncode == 0
