"""The pipeline skips what is current, redoes what changed, and resumes after a kill."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from harmtrace.config import load_config
from harmtrace.pipeline import Pipeline
from harmtrace.workspace import Workspace
from helpers import toml_text


class RecordingReporter:
    """Keeps every stage message, so tests can see what ran and what was skipped."""

    def __init__(self) -> None:
        self.stages: list[tuple[str, str]] = []

    def stage(self, name: str, message: str) -> None:
        self.stages.append((name, message))

    def step(self, label: str, done: int, total: int) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def skipped(self, name: str) -> bool:
        return any(n == name and "up to date, skipped" in m for n, m in self.stages)


def _pipeline(finished_run, tmp_path: Path, **changes: dict) -> tuple[Pipeline, RecordingReporter]:
    """A pipeline on a copy of the finished workspace; ``changes`` update config tables."""
    workspace = Path(shutil.copytree(finished_run.workspace, tmp_path / "ws"))
    tables = copy.deepcopy(finished_run.tables)
    tables["workspace"] = {"path": str(workspace)}
    for table, values in changes.items():
        tables[table] = {**tables.get(table, {}), **values}
    config = tmp_path / "config.toml"
    config.write_text(toml_text(tables), encoding="utf-8")
    reporter = RecordingReporter()
    return Pipeline(load_config(config), reporter=reporter), reporter


def _stages(pipeline: Pipeline) -> list[str]:
    return [entry.stage for entry in pipeline.ledger.entries()]


def test_unchanged_settings_skip_every_stage_but_the_report(finished_run, tmp_path) -> None:
    pipeline, reporter = _pipeline(finished_run, tmp_path)

    pipeline.run()

    for stage in ("ingest", "model", "measure", "attribute"):
        assert reporter.skipped(stage), stage
    assert _stages(pipeline)[5:] == ["report"]
    assert pipeline.ledger.verify().ok


def test_a_changed_behaviour_seed_reruns_measure(finished_run, tmp_path) -> None:
    pipeline, reporter = _pipeline(finished_run, tmp_path, behaviour={"seed": 1})
    old = json.loads((pipeline.ws.artifact_dir("measure") / "meta.json").read_text())

    pipeline.train()
    pipeline.measure()

    assert reporter.skipped("model") and not reporter.skipped("measure")
    new = json.loads((pipeline.ws.artifact_dir("measure") / "meta.json").read_text())
    assert new["identity"]["behaviour"]["seed"] == 1
    assert new["identity_digest"] != old["identity_digest"]
    assert _stages(pipeline)[5:] == ["measure"]


def test_a_partial_artifact_left_by_a_kill_is_removed_and_the_run_completes(
    finished_run, tmp_path
) -> None:
    pipeline, _ = _pipeline(finished_run, tmp_path)
    artifacts = pipeline.ws.artifacts
    shutil.rmtree(artifacts / "model")  # the kill came while training
    leftover = artifacts / ".tmp-model-xyz"
    (leftover / "checkpoint-3").mkdir(parents=True)
    (leftover / "checkpoint-3" / "model.safetensors").write_bytes(b"\x00 half written")

    pipeline = Pipeline(pipeline.config, workspace=pipeline.ws.root)
    assert not leftover.exists()
    report = pipeline.run()

    assert not list(artifacts.glob(".tmp-*"))
    assert Workspace(pipeline.ws.root).read_meta("model") is not None
    assert report.exists()
    assert pipeline.ledger.verify().ok


def test_verify_with_two_seeds_compares_top_k_removal_with_random(
    finished_run, tmp_path
) -> None:
    pipeline, _ = _pipeline(finished_run, tmp_path,
                            verify={"enabled": True, "seeds": [0, 1], "methods": ["bm25"]})

    result = pipeline.verify()

    assert set(result["conditions"]) == {"top-bm25", "random"}
    for condition in result["conditions"].values():
        assert condition["seeds"] == [0, 1]
        assert all(0.0 <= rate <= 1.0 for rate in condition["harm_rates"])
    assert set(result["comparisons"]) == {"bm25"}
    assert _stages(pipeline)[5:] == ["verify-plan", "verify"]
    assert pipeline.ledger.verify().ok


def test_an_existing_model_folder_is_registered_instead_of_trained(finished_run, tmp_path):
    from helpers import tiny_lm, tiny_tokenizer

    folder = tmp_path / "hf-model"
    tiny_lm(seed=5).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    pipeline, reporter = _pipeline(finished_run, tmp_path, train={"model_path": str(folder)})

    model_id = pipeline.train()
    pipeline.measure()
    pipeline.attribute()

    info = pipeline.db.get_model(model_id)
    assert info.base_model == str(folder)
    assert not reporter.skipped("model")
    assert (pipeline.ws.artifact_dir("attribute") / "scores-gradcos.npy").exists()
    assert _stages(pipeline)[5:] == ["train", "measure", "attribute"]


def test_a_stage_refuses_an_upstream_artifact_made_from_other_settings(finished_run, tmp_path):
    from harmtrace.errors import ArtifactError

    pipeline, _ = _pipeline(finished_run, tmp_path, train={"epochs": 2})

    with pytest.raises(ArtifactError, match=r"'model'.*other settings.*harmtrace train"):
        pipeline.measure()
    assert _stages(pipeline)[5:] == []


def test_a_report_leaves_out_stale_results_and_says_so(finished_run, tmp_path):
    pipeline, _ = _pipeline(finished_run, tmp_path, attribute={"k": 3})

    summary, _ = pipeline.summary()

    assert "attribution" not in summary
    assert any("'attribute' results" in c for c in summary["caveats"])


def test_probes_longer_than_the_model_positions_are_a_config_error(finished_run, tmp_path):
    from harmtrace.errors import ConfigError

    pipeline, _ = _pipeline(finished_run, tmp_path, behaviour={"max_new_tokens": 200})

    with pytest.raises(ConfigError, match="behaviour.max_new_tokens"):
        pipeline.measure()


@pytest.mark.parametrize("k, message", [(2.5, "whole count"), (10_000, "not below")])
def test_a_k_that_is_not_a_usable_count_is_a_config_error(finished_run, tmp_path, k, message):
    from harmtrace.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        pipeline, _ = _pipeline(finished_run, tmp_path, attribute={"k": k})
        pipeline.attribute()


def test_verify_tests_named_sources_against_matched_controls_with_correction(
    finished_run, tmp_path
) -> None:
    pipeline, _ = _pipeline(finished_run, tmp_path, verify={
        "enabled": True, "seeds": [0, 1], "methods": ["bm25"],
        "sources": ["tweets-mixed", "tweets-clean"]})

    result = pipeline.verify()

    names = set(result["conditions"])
    assert {"top-bm25", "random", "source-tweets-mixed",
            "source-tweets-mixed/random-records"} <= names
    assert any(n.startswith("source-tweets-mixed/similar-source-") for n in names)
    assert set(result["comparisons"]) == {"bm25"}  # source arms stay out of the method table
    for source in ("tweets-mixed", "tweets-clean"):
        found = result["sources"][source]
        assert found["correction"] == "holm"
        assert found["p_adjusted"] >= found["controls"]["random-records"]["p_value"]
        # two seeds per arm: an exact permutation p cannot go below 1/6, so nothing is causal
        assert found["controls"]["random-records"]["min_attainable_p"] == pytest.approx(1 / 6)
        assert found["causal"] is False and "null result kept" in found["verdict"]
    plan = pipeline.ledger.entries()[5]
    assert plan.stage == "verify-plan" and plan.outputs["runs"] == 2 * len(names)
    assert pipeline.ledger.verify().ok

    report = Path(pipeline.report()).parent / "report.md"
    markdown = report.read_text(encoding="utf-8")
    assert "Removing whole sources against matched controls" in markdown
    assert "not shown causal (null result kept)" in markdown


def test_verify_sources_naming_an_unknown_source_is_refused(finished_run, tmp_path) -> None:
    from harmtrace.errors import ConfigError

    pipeline, _ = _pipeline(finished_run, tmp_path, verify={
        "enabled": True, "seeds": [0, 1], "methods": ["bm25"], "sources": ["nope"]})
    with pytest.raises(ConfigError, match="verify.sources.*'nope' has no records"):
        pipeline.verify()
