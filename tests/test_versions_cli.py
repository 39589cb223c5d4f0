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
    shown = run_cli("data", "diff", version[:8], child[:8], *ws, "--show-text")
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
