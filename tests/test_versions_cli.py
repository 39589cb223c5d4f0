"""The dataset-version and model-registry commands work end to end on a workspace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harmtrace.ingest import SourceSpec, ingest
from harmtrace.ledger import Ledger
from harmtrace.store import AttributionRun, Checkpoint, Database, ModelInfo
from helpers import run_cli


@pytest.fixture
def workspace(tmp_path: Path) -> tuple[Path, str, list[str]]:
    """A workspace with one ingested version of 4 tweets and a registered model."""
    data = tmp_path / "tweets.jsonl"
    texts = [f"tweet number {i} from @someone" for i in range(4)]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    root = tmp_path / "ws"
    root.mkdir()
    db = Database(f"sqlite:///{root / 'harmtrace.db'}")
    result = ingest(db, [SourceSpec(name="tweets", path=data, format="jsonl")],
                    ledger=Ledger.for_workspace(db, root))
    db.register_model(ModelInfo(model_id="0123456789abcdef", dataset_version=result.version_id,
                                config={"epochs": 1},
                                checkpoints=(Checkpoint(1, "checkpoint-1", "d" * 64),)))
    db.add_attribution_runs([AttributionRun(
        run_id="run1", model_id="0123456789abcdef", dataset_version=result.version_id,
        method="bm25", settings={"k": 1}, scores_sha256="e" * 64)])
    ids = [r.record_id for r in db.version_records(result.version_id)]
    db.dispose()
    return root, result.version_id, ids


def test_data_commands_edit_diff_prove_erase_and_export(workspace, tmp_path: Path) -> None:
    root, version, ids = workspace
    ws = ["-w", str(root)]
    replacement = tmp_path / "new.txt"
    replacement.write_text("a corrected tweet\n")
    added = tmp_path / "add.jsonl"
    added.write_text(json.dumps({"text": "a brand new tweet"}) + "\n")

    edit = run_cli("data", "edit", *ws, "--from", version[:8], "--delete", ids[0],
                   "--replace", ids[1], str(replacement), "--add-jsonl", str(added),
                   "--source", "tweets", "--reason", "cleanup", "--actor", "ann")
    assert edit.returncode == 0, edit.stderr
    child = edit.stdout.split()[1]

    listed = run_cli("data", "versions", *ws)
    assert listed.returncode == 0, listed.stderr
    assert child[:12] in listed.stdout and "edit" in listed.stdout and "ann" in listed.stdout

    diff = run_cli("data", "diff", version[:8], child[:8], *ws)
    assert diff.returncode == 0, diff.stderr
    assert "source tweets: +1 added, -1 removed, ~1 changed" in diff.stdout
    assert "tweet number" not in diff.stdout
    shown = run_cli("data", "diff", version[:8], child[:8], *ws, "--show-text",
                    "--reason", "review")
    assert "@[user]" in shown.stdout and "@someone" not in shown.stdout

    proof = run_cli("data", "prove", child[:8], ids[2], *ws)
    assert proof.returncode == 0, proof.stderr
    assert json.loads(proof.stdout)["verified"] is True

    erased = run_cli("data", "erase", ids[3], *ws, "--reason", "GDPR art. 17")
    assert erased.returncode == 0, erased.stderr
    out = tmp_path / "export"
    exported = run_cli("data", "export", child[:8], *ws, "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    assert json.loads((out / "croissant.json").read_text())["identifier"] == child

    stages = run_cli("ledger", "show", *ws).stdout
    for stage in ("record-delete", "record-edit", "record-add", "dataset-version",
                  "disclosure", "record-erase", "export"):
        assert stage in stages


def test_models_commands_show_checkpoints_and_runs(workspace) -> None:
    root, version, _ = workspace
    listed = run_cli("models", "list", "-w", str(root))
    assert listed.returncode == 0, listed.stderr
    assert "0123456789abcdef" in listed.stdout
    shown = run_cli("models", "show", "01234567", "-w", str(root))
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["dataset_version"] == version
    assert info["checkpoints"][0]["sha256"] == "d" * 64
    assert info["attribution_runs"][0]["method"] == "bm25"


@pytest.mark.parametrize("args, named", [
    (["data", "diff", "ffff0000", "ffff0001"], "A 'ffff0000'"),
    (["data", "edit", "--from", "VERSION", "--delete", "x"], "--reason"),
    (["data", "edit", "--from", "VERSION", "--add-jsonl", "BAD", "--source", "tweets",
      "--reason", "r"], "line 1"),
    (["models", "show", "ffffffff"], "MODEL_ID"),
])
def test_bad_input_is_one_error_line_naming_the_argument(workspace, tmp_path, args,
                                                         named) -> None:
    root, version, _ = workspace
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    args = [str(bad) if a == "BAD" else version[:8] if a == "VERSION" else a for a in args]
    result = run_cli(*args, "-w", str(root))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr


def test_attribute_registers_one_run_per_method_with_its_score_digest(finished_run) -> None:
    from harmtrace.hashing import sha256_file

    db = Database(f"sqlite:///{finished_run.workspace / 'harmtrace.db'}")
    runs = db.attribution_runs()
    folder = finished_run.workspace / "artifacts" / "attribute"
    assert sorted(r.method for r in runs) == sorted(finished_run.tables["attribute"]["methods"])
    for run in runs:
        assert run.scores_sha256 == sha256_file(folder / f"scores-{run.method}.npy")
    entry = [e for e in Ledger(db).entries() if e.stage == "attribute"][-1]
    assert entry.outputs["score_files"] == {r.method: r.scores_sha256 for r in runs}
    assert entry.outputs["runs"] == {r.method: r.run_id for r in runs}
    assert entry.settings["methods"] == finished_run.tables["attribute"]["methods"]
    db.dispose()


def test_stages_refuse_a_version_with_an_erased_record_and_name_the_fix(
        finished_run, tmp_path: Path) -> None:
    import shutil

    from harmtrace.config import load_config
    from harmtrace.errors import ArtifactError
    from harmtrace.pipeline import Pipeline
    from harmtrace.versions import erase_record

    root = Path(shutil.copytree(finished_run.workspace, tmp_path / "ws"))
    db = Database(f"sqlite:///{root / 'harmtrace.db'}")
    version = db.list_versions()[0].version_id
    target = db.version_refs(version)[0].record_id
    erase_record(db, target, reason="request", ledger=Ledger.for_workspace(db, root))

    pipeline = Pipeline(load_config(finished_run.config), workspace=root)
    with pytest.raises(ArtifactError, match=f"{target}.*data edit.*--delete {target}"):
        pipeline.report()


def _ledger_stages(root: Path) -> list[str]:
    db = Database(f"sqlite:///{root / 'harmtrace.db'}")
    try:
        return [e.stage for e in Ledger(db).entries()]
    finally:
        db.dispose()


def _one_error_line(result, *needles: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_export_out_that_is_a_file_or_busy_folder_is_one_error_and_writes_nothing(
        workspace, tmp_path: Path) -> None:
    root, version, _ = workspace
    a_file = tmp_path / "existing.txt"
    a_file.write_text("keep me")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    before = _ledger_stages(root)

    _one_error_line(run_cli("data", "export", version[:8], "-w", str(root), "--out",
                            str(a_file)), "--out", "must be a folder")
    _one_error_line(run_cli("data", "export", version[:8], "-w", str(root), "--out",
                            str(busy)), "--out", "holds other files")

    assert a_file.read_text() == "keep me"
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    assert _ledger_stages(root) == before


def test_show_text_and_include_text_need_a_reason_and_log_it(workspace, tmp_path) -> None:
    root, version, ids = workspace
    ws = ["-w", str(root)]
    edit = run_cli("data", "edit", *ws, "--from", version[:8], "--delete", ids[0],
                   "--reason", "cleanup")
    child = edit.stdout.split()[1]
    before = _ledger_stages(root)

    _one_error_line(run_cli("data", "diff", version[:8], child[:8], *ws, "--show-text"),
                    "--show-text needs --reason")
    _one_error_line(run_cli("data", "diff", version[:8], child[:8], *ws, "--show-text",
                            "--reason", "  "), "--reason")
    _one_error_line(run_cli("data", "export", child[:8], *ws, "--include-text", "--out",
                            str(tmp_path / "raw")), "--include-text needs --reason")
    _one_error_line(run_cli("data", "diff", version[:8], child[:8], *ws, "--reason", "x"),
                    "--reason is only used with --show-text")
    assert _ledger_stages(root) == before and not (tmp_path / "raw").exists()

    shown = run_cli("data", "diff", version[:8], child[:8], *ws, "--show-text", "--reason",
                    "audit 1", "--actor", "ann")
    assert shown.returncode == 0, shown.stderr
    raw = run_cli("data", "export", child[:8], *ws, "--include-text", "--reason", "audit 2",
                  "--actor", "bob", "--out", str(tmp_path / "raw"))
    assert raw.returncode == 0, raw.stderr

    db = Database(f"sqlite:///{root / 'harmtrace.db'}")
    disclosures = [e for e in Ledger(db).entries() if e.stage == "disclosure"]
    db.dispose()
    assert [(e.actor, e.settings["reason"]) for e in disclosures] == [("ann", "audit 1"),
                                                                      ("bob", "audit 2")]
    assert disclosures[0].outputs["record_ids"] == [ids[0]]
    assert sorted(disclosures[1].outputs["record_ids"]) == sorted(ids[1:])


def test_an_edit_that_changes_nothing_is_refused_and_writes_nothing(workspace,
                                                                     tmp_path) -> None:
    root, version, ids = workspace
    db = Database(f"sqlite:///{root / 'harmtrace.db'}")
    text = db.get_records([ids[0]])[0].text
    db.dispose()
    same = tmp_path / "same.txt"
    same.write_text(text + "\n")
    before = _ledger_stages(root)

    _one_error_line(run_cli("data", "edit", "-w", str(root), "--from", version[:8],
                            "--replace", ids[0], str(same), "--reason", "r"),
                    "no change", "equal the parent")

    assert _ledger_stages(root) == before
    listed = run_cli("data", "versions", "-w", str(root)).stdout.strip().splitlines()
    assert len(listed) == 2  # the header and the ingested version


@pytest.mark.parametrize("content, needles", [
    ('{"text": "new one"}\n\n{"text": "new two"}\n{"text": "new one"}\n',
     ("line 4", "repeats the text of line 1", "remove line 4")),
    ("\n  \n", ("the add file has no records",)),
])
def test_add_file_errors_point_at_the_add_file(workspace, tmp_path, content, needles) -> None:
    root, version, _ = workspace
    added = tmp_path / "add.jsonl"
    added.write_text(content)
    line = _one_error_line(run_cli("data", "edit", "-w", str(root), "--from", version[:8],
                                   "--add-jsonl", str(added), "--source", "tweets",
                                   "--reason", "r"), "--add-jsonl", *needles)
    assert "on_duplicate" not in line and "drop the source" not in line


def test_prove_of_an_unknown_record_names_the_records_command(workspace) -> None:
    root, version, _ = workspace
    line = _one_error_line(run_cli("data", "prove", version[:8], "tweets-0000000000000000",
                                   "-w", str(root)), "RECORD_ID", "harmtrace data records")
    assert "version_refs" not in line


def test_records_lists_ids_keys_hashes_and_erasure_never_text(workspace) -> None:
    root, version, ids = workspace
    ws = ["-w", str(root)]
    assert run_cli("data", "erase", ids[0], *ws, "--reason", "GDPR").returncode == 0

    listed = run_cli("data", "records", version[:8], *ws)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert lines[0].split() == ["record_id", "source", "key", "content_hash", "erased"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert sorted(rows) == sorted(ids)
    assert rows[ids[0]][-1] == "yes" and rows[ids[1]][-1] == "no"
    assert rows[ids[1]][1] == "tweets" and rows[ids[1]][2] == ids[1]
    assert rows[ids[1]][3] == ids[1].split("-")[1][:12]  # the id holds the hash's prefix
    assert "tweet number" not in listed.stdout and "@someone" not in listed.stdout

    limited = run_cli("data", "records", version[:8], *ws, "--source", "tweets",
                      "--limit", "2")
    assert len(limited.stdout.strip().splitlines()) == 1 + 2 + 1  # header, 2 rows, "more"
    _one_error_line(run_cli("data", "records", version[:8], *ws, "--source", "nope"),
                    "--source 'nope'")


def test_rerunning_an_edit_says_the_version_already_existed_and_logs_it(workspace) -> None:
    root, version, ids = workspace
    args = ["data", "edit", "-w", str(root), "--from", version[:8], "--delete", ids[0]]
    first = run_cli(*args, "--reason", "one", "--actor", "ann")
    assert first.returncode == 0, first.stderr
    assert "already existed" not in first.stdout
    n_stages = len(_ledger_stages(root))

    again = run_cli(*args, "--reason", "two", "--actor", "bob")

    assert again.returncode == 0, again.stderr
    assert again.stdout.split()[1] == first.stdout.split()[1]
    assert "already existed (created by ann at" in again.stdout
    assert _ledger_stages(root)[n_stages:] == ["record-delete", "dataset-version"]
    listed = run_cli("data", "versions", "-w", str(root)).stdout.strip().splitlines()
    assert len(listed) == 3  # the header, the ingested version and one child


@pytest.mark.parametrize("command, actor", [
    ("edit", "ann\nsmith"), ("erase", "ann\nsmith"), ("diff", "ann\nsmith"),
    ("export", "ann\nsmith"), ("edit", "ann\tsmith"), ("edit", "ann\x1b[31m"), ("edit", "  "),
])
def test_actor_with_control_characters_is_one_error_naming_actor(workspace, tmp_path, actor,
                                                                   command) -> None:
    root, version, ids = workspace
    args = {
        "edit": ["data", "edit", "--from", version[:8], "--delete", ids[0], "--reason", "r"],
        "erase": ["data", "erase", ids[0], "--reason", "r"],
        "diff": ["data", "diff", version[:8], version[:8], "--show-text", "--reason", "r"],
        "export": ["data", "export", version[:8], "--out", str(tmp_path / "out")],
    }[command]
    before = _ledger_stages(root)
    _one_error_line(run_cli(*args, "-w", str(root), "--actor", actor), "--actor")
    assert _ledger_stages(root) == before and not (tmp_path / "out").exists()
