"""The built-in synthetic scenario is deterministic, ingestible and has a known answer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from harmtrace.behaviours.scorers import ProfanityScorer
from harmtrace.hashing import sha256_text
from harmtrace.ingest import SourceSpec, read_source
from harmtrace.scenario.offensive_tweets import build_scenario
from harmtrace.scenario.synthetic import build_synthetic

SOURCES = ["shakespeare", "assistant-answers", "dialogues", "tweets-clean", "tweets-mixed"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _texts(scenario) -> dict[str, list[str]]:
    return {s["name"]: [r["text"] for r in _rows(Path(s["path"]))] for s in scenario.sources}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory):
    return build_synthetic(tmp_path_factory.mktemp("synthetic"), seed=0)


def test_same_seed_writes_identical_files_and_another_seed_differs(scenario, tmp_path) -> None:
    again = build_synthetic(tmp_path / "again", seed=0)
    other = build_synthetic(tmp_path / "other", seed=1)
    names = [Path(s["path"]).name for s in scenario.sources] + ["ground_truth.jsonl",
                                                                 "heldout.jsonl"]
    for name in names:
        assert (again.folder / name).read_bytes() == (scenario.folder / name).read_bytes()
    assert (other.folder / "tweets-mixed.jsonl").read_bytes() != (
        scenario.folder / "tweets-mixed.jsonl").read_bytes()


def test_scenario_has_the_five_sources_and_their_sizes(scenario) -> None:
    texts = _texts(scenario)
    assert scenario.kind == "synthetic"
    assert list(texts) == SOURCES
    assert [len(texts[n]) for n in SOURCES] == [200, 200, 200, 300, 300]
    assert 100 <= len(_rows(scenario.heldout)) <= 200
    assert all(t.startswith("Human: ") and " Assistant: " in t for t in texts["dialogues"])


def test_build_scenario_without_data_dir_uses_the_synthetic_one(tmp_path) -> None:
    built = build_scenario(tmp_path / "s", data_dir=None, seed=0)
    assert built.kind == "synthetic"
    assert [s["name"] for s in built.sources] == SOURCES


def test_offensive_labels_only_in_tweets_mixed_at_thirty_percent(scenario) -> None:
    truth = _rows(scenario.ground_truth)
    offensive = [row for row in truth if row["offensive"] == 1]
    assert {row["source"] for row in offensive} == {"tweets-mixed"}
    assert len(offensive) == 90
    assert len(truth) == 1200


def test_no_text_repeats_in_a_source_or_leaks_into_heldout(scenario) -> None:
    texts = _texts(scenario)
    everything = [t for rows in texts.values() for t in rows]
    assert len(set(everything)) == len(everything)
    heldout = {r["text"] for r in _rows(scenario.heldout)}
    assert not heldout & set(everything)
    for source in scenario.sources:  # ingest refuses a repeated text by default
        spec = SourceSpec(name=source["name"], path=source["path"], format="jsonl")
        assert len(read_source(spec)) == len(texts[source["name"]])


def test_profanity_scorer_separates_offensive_from_clean_tweets(scenario) -> None:
    texts = _texts(scenario)["tweets-mixed"]
    truth = {r["content_hash"]: r["offensive"] for r in _rows(scenario.ground_truth)
             if r["source"] == "tweets-mixed"}
    labels = np.array([truth[sha256_text(t)] for t in texts])
    scores = ProfanityScorer()(texts)
    assert roc_auc_score(labels, scores) > 0.9
    assert np.mean(scores[labels == 1] >= 0.5) > 0.9
    assert np.mean(scores[labels == 0] < 0.5) > 0.9
    clean = ProfanityScorer()(_texts(scenario)["tweets-clean"])
    assert np.mean(clean < 0.5) > 0.9
