"""The engines registered as methods: finite scores of the right shape, a planted copy of the
query ranks first, metadata is written beside every score file, and the command line's
--method override recomputes with the named methods and refuses unknown ones."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from harmtrace.attribute.methods import (
    AttributionInputs,
    LMTraining,
    compute_scores,
    method_names,
    run_method,
)
from harmtrace.behaviours.focus import FocusedQuery
from harmtrace.cli import main
from harmtrace.config import load_config, parse_config
from harmtrace.errors import ConfigError, NumericalError
from harmtrace.models.lm import encode_texts, train_lm
from harmtrace.pipeline import Pipeline
from helpers import CORPUS, TINY, tiny_tokenizer, toml_text

NEW = ("ekfac", "kfac", "trak", "logra", "repsim", "exact", "tokeninf")
TEXTS = list(CORPUS[:16])
COPY = 3  # the train record the query copies


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    """A tiny LM trained by ``train_lm`` for 16 steps on 16 records, the records' token ids
    and how it was trained (for the exact replay)."""
    tokenizer = tiny_tokenizer()
    seqs = encode_texts(tokenizer, TEXTS, max_length=12)
    settings = replace(TINY, epochs=4, batch_size=4, learning_rate=5e-3, n_checkpoints=1)
    model = train_lm(seqs, tokenizer, settings, seed=0).model
    return model, seqs, LMTraining(settings, 0, tokenizer)


def _inputs(trained, **changes) -> AttributionInputs:
    model, seqs, training = trained
    seq = seqs[COPY]
    query = FocusedQuery(tuple(seq), (False,) + (True,) * (len(seq) - 1), "cat", False)
    other = FocusedQuery(tuple(seqs[9]), (False,) * 4 + (True,) * (len(seqs[9]) - 4), "x",
                         True)
    fields = {"train_sequences": seqs, "train_texts": TEXTS, "queries": [query, other],
              "checkpoints": [(model, 1.0)], "trak_projection_dim": 256, "batch_size": 8,
              "pad_id": tiny_tokenizer().pad_token_id, "training": training}
    return AttributionInputs(**{**fields, **changes})


@pytest.mark.parametrize("method", NEW)
def test_every_new_method_gives_finite_scores_of_shape_n_query_by_n_train(trained, method):
    scores = compute_scores(method, _inputs(trained))

    assert scores.shape == (2, len(TEXTS))
    assert np.isfinite(scores).all()


@pytest.mark.parametrize("method", NEW)
def test_a_verbatim_train_copy_of_the_query_ranks_first_with_a_positive_score(trained, method):
    scores = compute_scores(method, _inputs(trained))[0]

    assert int(scores.argmax()) == COPY
    assert scores[COPY] > 0  # sign: the copy made the query's tokens more likely


@pytest.mark.parametrize("method", method_names())
def test_metadata_states_sign_normalisation_damping_projection_parameters_and_citation(
        trained, method):
    meta = run_method(method, _inputs(trained)).metadata

    for key in ("method", "sign", "normalisation", "damping", "projection_dim", "projected",
                "parameters", "citation", "description"):
        assert key in meta, key
    assert meta["method"] == method and meta["citation"]
    json.dumps(meta)  # written as JSON beside the score file


def test_influence_metadata_gives_the_damping_used_per_module(trained):
    meta = run_method("ekfac", _inputs(trained)).metadata
    assert set(meta["damping"]["per_module"]) == set(meta["parameters"])
    assert all(v > 0 for v in meta["damping"]["per_module"].values())

    given = run_method("kfac", _inputs(trained, influence_damping=0.5)).metadata
    assert set(given["damping"]["per_module"].values()) == {0.5}


def test_projection_dimension_actually_used_is_reported(trained):
    assert run_method("trak", _inputs(trained)).metadata["projection_dim"] == 256
    meta = run_method("logra", _inputs(trained, logra_k_in=4, logra_k_out=2)).metadata
    # every layer of the tiny GPT-2 is wider than 4 and 2 on both sides: 2 x 4 per layer
    assert meta["projection_dim"] == 8 * len(meta["details"]["modules"])


def test_attribute_parameters_restrict_the_layers_of_the_engines(trained):
    inputs = _inputs(trained, parameters=("mlp.c_fc",))
    assert run_method("ekfac", inputs).metadata["parameters"] == ["transformer.h.0.mlp.c_fc"]
    with pytest.raises(ConfigError, match=r"attribute.parameters.*no Linear/Conv1D"):
        run_method("logra", _inputs(trained, parameters=("wte",)))


@pytest.mark.parametrize("method", ["ekfac", "trak", "logra", "repsim"])
def test_a_non_finite_model_raises_numerical_error_naming_the_record(trained, method):
    model = copy.deepcopy(trained[0])
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")

    with pytest.raises(NumericalError, match=r"(record|example)s? \[?0"):
        compute_scores(method, _inputs(trained, checkpoints=[(model, 1.0)]))


def test_exact_without_the_training_refuses_and_points_to_the_python_api(trained):
    with pytest.raises(ConfigError, match=r"exact_scores"):
        compute_scores("exact", _inputs(trained, training=None))


def test_exact_refuses_a_model_its_replay_does_not_reproduce(trained):
    other = replace(trained[2], seed=1)  # another initialisation and data order
    with pytest.raises(ConfigError, match="does not reproduce the final checkpoint"):
        compute_scores("exact", _inputs(trained, training=other))


def test_exact_refuses_a_graph_over_its_memory_limit(trained):
    with pytest.raises(ConfigError, match="attribute.exact_max_gib"):
        compute_scores("exact", _inputs(trained, exact_max_bytes=1024))


# ------------------------------------------------------------------------- config

BASE = {"sources": [{"name": "a", "path": "a.jsonl", "format": "jsonl"}],
        "behaviour": {"probes": ["hello"]}}


@pytest.mark.parametrize("key, value", [
    ("influence_damping", -1.0), ("influence_damping", "auto"),
    ("trak_projection_dim", -1), ("trak_projection_dim", 1.5),
    ("trak_ensemble", "every"), ("logra_k_in", 0), ("logra_k_out", 0),
    ("exact_max_gib", 0.0), ("projection_dim", -4), ("batch_size", 0),
])
def test_a_bad_value_of_an_attribute_key_is_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"attribute\.{key}"):
        parse_config({**BASE, "attribute": {key: value}}, origin="my.toml")


def test_new_attribute_keys_are_accepted_and_unknown_ones_still_refused():
    config = parse_config({**BASE, "attribute": {
        "methods": ["ekfac", "trak", "logra", "repsim", "exact", "kfac"],
        "influence_damping": 0.01, "trak_projection_dim": 512, "trak_ensemble": "final",
        "logra_k_in": 8, "logra_k_out": 4, "exact_max_gib": 1.5}})
    assert config.attribute.methods[0] == "ekfac"
    assert config.attribute.influence_damping == 0.01
    assert config.attribute.trak_ensemble == "final"
    with pytest.raises(ConfigError, match="unknown key 'attribute.trak_dim'"):
        parse_config({**BASE, "attribute": {"trak_dim": 8}})


def test_a_method_listed_twice_is_refused():
    with pytest.raises(ConfigError, match="more than once"):
        parse_config({**BASE, "attribute": {"methods": ["ekfac", "ekfac"]}})


# ------------------------------------------------------------------------- pipeline, CLI


def _run_main(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["harmtrace", *argv])
    try:
        main()
    except SystemExit as done:
        return int(done.code or 0), capsys.readouterr().err
    return 0, capsys.readouterr().err


@pytest.fixture
def copied_run(finished_run, tmp_path) -> Path:
    """A config on a copy of the finished workspace, with a small TRAK projection."""
    workspace = Path(shutil.copytree(finished_run.workspace, tmp_path / "ws"))
    tables = copy.deepcopy(finished_run.tables)
    tables["workspace"] = {"path": str(workspace)}
    tables["attribute"] = {**tables["attribute"], "trak_projection_dim": 128}
    config = tmp_path / "config.toml"
    config.write_text(toml_text(tables), encoding="utf-8")
    return config


def test_cli_method_override_recomputes_and_writes_metadata_beside_each_score_file(
        copied_run, monkeypatch, capsys):
    code, err = _run_main(["attribute", str(copied_run), "--method", "ekfac",
                           "--method", "repsim,bm25"], monkeypatch, capsys)
    assert code == 0, err
    assert "up to date" not in err  # another method list is another artifact

    folder = load_config(copied_run).workspace + "/artifacts/attribute"
    scores = sorted(p.name for p in Path(folder).glob("scores-*"))
    assert scores == [f"scores-{m}.{ext}" for m in ("bm25", "ekfac", "repsim")
                      for ext in ("json", "npy")]
    meta = json.loads((Path(folder) / "scores-ekfac.json").read_text())
    assert meta["damping"]["per_module"] and meta["tokenizer"]["max_length"] == 32
    assert "Grosse" in meta["citation"] and "> 0" in meta["sign"]
    summary = json.loads((Path(folder) / "attribution.json").read_text())
    assert set(summary["methods"]) == {"ekfac", "repsim", "bm25"}
    assert summary["methods"]["ekfac"]["metadata"]["normalisation"] == meta["normalisation"]
    assert {(a["a"], a["b"]) for a in summary["agreement"]} == {
        ("ekfac", "repsim"), ("ekfac", "bm25"), ("repsim", "bm25")}
    assert {"spearman", "kendall", "topk_jaccard", "topk_overlap", "hint"} <= set(
        summary["agreement"][0])
    assert len(summary["source_agreement"]) == 3
    assert summary["agreement_hint"].startswith("methods")


def test_cli_unknown_method_is_one_error_line_listing_the_valid_names(
        copied_run, monkeypatch, capsys):
    code, err = _run_main(["attribute", "-q", str(copied_run), "--method", "magic"],
                          monkeypatch, capsys)

    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ConfigError: --method: ")
    assert "magic" in lines[0]
    for name in method_names():
        assert name in lines[0]


def test_python_api_override_reruns_only_when_the_methods_change(copied_run):
    pipeline = Pipeline(load_config(copied_run))
    summary = pipeline.attribute(methods=["trak", "repsim"])
    assert set(summary["methods"]) == {"trak", "repsim"}
    assert summary["projection_dim_used"]["trak"] == 128
    assert pipeline.config.attribute.methods == ("trak", "repsim")
    assert pipeline.ws.is_current("attribute", pipeline._identity("attribute"))

    again = Pipeline(load_config(copied_run))
    assert not again.ws.is_current("attribute", again._identity("attribute"))
    with pytest.raises(ConfigError, match="choose from"):
        again.attribute(methods="trak,nosuch")


def test_report_renders_the_triangulation_of_the_new_methods(copied_run):
    pipeline = Pipeline(load_config(copied_run))
    pipeline.attribute(methods=["logra", "bm25"])
    html = pipeline.report().read_text(encoding="utf-8")

    assert "Agreement between methods on sources" in html
    assert "Choe et al. 2024" in html


def test_exact_replays_the_train_stage_of_the_pipeline(copied_run):
    pipeline = Pipeline(load_config(copied_run))
    summary = pipeline.attribute(methods="exact,repsim")

    meta = summary["methods"]["exact"]["metadata"]
    assert meta["details"]["optimizer"] == "adamw" and meta["details"]["steps"] >= 1
    scores = np.load(pipeline.ws.artifact_dir("attribute") / "scores-exact.npy")
    assert scores.shape == (summary["n_queries"], summary["n_train"])
    assert np.isfinite(scores).all() and np.abs(scores).max() > 0


@pytest.mark.parametrize("command", ["verify", "show"])
def test_ledger_of_a_folder_without_a_workspace_is_one_error_line_and_creates_nothing(
        tmp_path, monkeypatch, capsys, command):
    missing = tmp_path / "nowhere"
    code, err = _run_main(["ledger", command, "-w", str(missing)], monkeypatch, capsys)

    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"ArtifactError: {missing} holds no harmtrace workspace")
    assert not missing.exists()
