"""The offensive-tweets investigation on the public datasets, at reduced size.

Runs the whole pipeline once (about 10 training runs on 2 cores) and checks the three
results the scenario exists to show: the mixed source ranks first, the hidden offensive
records rank high (AUPRC above their base rate), and removing the attributed records lowers
the harm rate significantly more than removing as many random records.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harmtrace.config import load_config
from harmtrace.pipeline import Pipeline
from harmtrace.scenario.demo import prepare_demo

DATA = os.environ.get("HARMTRACE_DATA_DIR")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.realdata,
    pytest.mark.skipif(not DATA, reason="set HARMTRACE_DATA_DIR to the public datasets"),
]


@pytest.fixture(scope="module")
def summary(tmp_path_factory) -> dict:
    workspace = tmp_path_factory.mktemp("realdata")
    scenario, config = prepare_demo(workspace, data_dir=Path(DATA), size="small")
    report = Pipeline(load_config(config)).run(
        scenario={"name": "offensive-tweets", "kind": scenario.kind,
                  "description": scenario.description})
    data = json.loads((report.parent / "summary.json").read_text(encoding="utf-8"))
    print(json.dumps({m: {"auprc": v.get("auprc"), "top": v["sources"][0]["source"]}
                      for m, v in data["attribution"]["methods"].items()}, indent=1))
    print(json.dumps(data["verification"]["comparisons"], indent=1))
    return data


def _ranking(summary: dict, method: str) -> list[str]:
    return [s["source"] for s in summary["attribution"]["methods"][method]["sources"]]


@pytest.mark.parametrize("method", ["tokeninf", "gradcos", "bm25"])
def test_mixed_source_ranks_first_above_clean_tweets(summary, method):
    ranking = _ranking(summary, method)

    assert ranking[0] == "tweets-mixed"
    assert ranking.index("tweets-mixed") < ranking.index("tweets-clean")


@pytest.mark.parametrize("method", ["tokeninf", "gradcos", "graddot", "bm25"])
def test_offensive_records_rank_above_their_base_rate(summary, method):
    found = summary["attribution"]["methods"][method]

    assert found["auprc"] > 1.5 * found["auprc_random"]


def test_harm_is_above_the_scorer_floor(summary):
    behaviour = summary["behaviour"]

    assert behaviour["floor"]["ci"][1] < behaviour["ci"][0]


@pytest.mark.parametrize("method", ["tokeninf", "gradcos", "bm25"])
def test_removing_attributed_records_beats_random_removal(summary, method):
    comparison = summary["verification"]["comparisons"][method]

    assert len(summary["verification"]["seeds"]) >= 3
    assert comparison["effect"] < 0
    assert comparison["p_value"] < 0.05
    assert comparison["significant"] is True
    assert comparison["effect_ci"][1] < 0


def test_utility_is_reported_for_every_condition(summary):
    for condition in summary["verification"]["conditions"].values():
        assert len(condition["perplexity"]) == len(summary["verification"]["seeds"])
        assert all(p > 1 for p in condition["perplexity"])
