"""The data map on the Davidson et al. tweets (all 24,783), read in place.

Clusters use TF-IDF + SVD here: all-MiniLM-L6-v2 embeds about 100 tweets a second on 2 CPU
cores (about 4 minutes for the whole set); the MiniLM path is covered by test_datamap.py.
Labels (class 0 hate or 1 offensive = harmful, 2 neither) reach the map only through
``evaluation.ground_truth``, as they reach the evaluate stage.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from harmtrace.config import load_config
from harmtrace.pipeline import Pipeline
from helpers import toml_text
from test_datamap import artifact_texts

DATA = os.environ.get("HARMTRACE_DATA_DIR")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.realdata,
    pytest.mark.skipif(not DATA, reason="set HARMTRACE_DATA_DIR to the public datasets"),
]

_HANDLE = re.compile(r"@\w+")


@pytest.fixture(scope="module")
def davidson(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("davidson-map")
    csv = Path(DATA) / "davidson-hate-offensive" / "data" / "labeled_data.csv"
    config = tmp / "config.toml"
    config.write_text(toml_text({
        "workspace": {"path": str(tmp / "ws")},
        "sources": [{"name": "davidson", "path": str(csv), "format": "csv",
                     "text_field": "tweet", "on_duplicate": "keep-first",
                     "licence": "MIT", "origin": "github.com/t-davidson/hate-speech-and-"
                                                 "offensive-language"}],
        "behaviour": {"probes": ["@user you"], "scorer": "profanity", "threshold": 0.5},
        "evaluation": {"ground_truth": str(tmp / "labels.jsonl")},
        "datamap": {"embedding": "tfidf", "n_clusters": 12},
    }), encoding="utf-8")
    pipeline = Pipeline(load_config(config))
    version = pipeline.ingest()
    records = pipeline.db.version_records(version)
    with open(tmp / "labels.jsonl", "w", encoding="utf-8") as out:
        for r in records:
            out.write(json.dumps({"source": r.source, "content_hash": r.content_hash,
                                  "offensive": int(r.meta["class"] in ("0", "1"))}) + "\n")
    from click.testing import CliRunner

    from harmtrace.cli import cli

    result = CliRunner().invoke(cli, ["data", "map", str(config)], catch_exceptions=False)
    handles = {h.lower() for r in records for h in _HANDLE.findall(r.text)}
    folder = pipeline.ws.artifact_dir("datamap")
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    aggregates = json.loads((folder / "aggregates.json").read_text(encoding="utf-8"))
    print(json.dumps({"duplicates": summary["duplicates"], "pii": summary["pii"],
                      "labels": summary["labels"],
                      "clusters": [(g["name"], g["n_records"], round(g["labelled_share"], 3))
                                   for g in aggregates["cluster"]["groups"]]}, indent=1))
    return {"out": result.output, "summary": summary, "aggregates": aggregates,
            "folder": folder, "handles": handles, "exit": result.exit_code}


def test_map_finds_exact_and_near_duplicates(davidson):
    duplicates = davidson["summary"]["duplicates"]

    assert davidson["exit"] == 0
    assert duplicates["exact"]["n_groups"] >= 1
    assert duplicates["near"]["n_near_only_pairs"] >= 1


def test_map_flags_user_handles_as_pii(davidson):
    pii = davidson["summary"]["pii"]

    assert pii["records"]["user"] > 1000


def test_no_handle_appears_unmasked_in_output_or_artifacts(davidson):
    blobs = [davidson["out"].lower()] + artifact_texts(davidson["folder"])

    assert len(davidson["handles"]) > 1000
    for blob in blobs:
        found = {h for h in _HANDLE.findall(blob) if h in davidson["handles"]}
        assert not found


def test_most_offensive_cluster_is_named_and_above_the_base_rate(davidson):
    base = davidson["summary"]["labels"]["base_rate"]
    groups = davidson["aggregates"]["cluster"]["groups"]
    top = max(groups, key=lambda g: g["labelled_share"])

    assert not top["name"].startswith("cluster ")
    assert top["labelled_share"] >= base + 0.5 * (1 - base)  # half the way from base to 1
