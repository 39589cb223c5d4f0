"""Config files become validated settings; every mistake names the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from harmtrace.config import AttributeSettings, Preconditioner, load_config, parse_config
from harmtrace.errors import ConfigError

BASE = {
    "sources": [{"name": "a", "path": "data/a.jsonl", "format": "jsonl"}],
    "behaviour": {"probes": ["hello"]},
}


def _with(**tables) -> dict:
    data = {key: (dict(value) if isinstance(value, dict) else value)
            for key, value in BASE.items()}
    for table, values in tables.items():
        data[table] = {**data.get(table, {}), **values}
    return data


def test_relative_paths_are_read_from_the_config_folder(tmp_path: Path) -> None:
    config = parse_config(_with(heldout={"path": "held.jsonl"}), base=tmp_path)

    assert Path(config.sources[0].path) == tmp_path / "data" / "a.jsonl"
    assert Path(config.heldout) == tmp_path / "held.jsonl"


@pytest.mark.parametrize("table, values, match", [
    ("behaviour", {"treshold": 0.3}, r"behaviour.treshold.*did you mean 'threshold'"),
    ("train", {"epoch": 2}, r"train.epoch.*did you mean 'epochs'"),
    ("attribute", {"methods": ["magic"]}, r"attribute.methods.*choose from"),
    ("attribute", {"preconditioner": "kfac"}, r"attribute.preconditioner = 'kfac'"),
    ("train", {"epochs": "three"}, r"train.epochs must be of type int"),
    ("train", {"epochs": True}, r"train.epochs must be of type int"),
    ("verify", {"seeds": [0]}, r"verify.seeds"),
    ("behaviour", {"threshold": 2.0}, r"behaviour.threshold must be in \[0, 1\]"),
    ("behaviour", {"scorer": "wordlist"}, r"behaviour.words"),
    ("train", {"dataset_version": 12}, r"train.dataset_version must be of type str"),
])
def test_a_wrong_key_or_value_names_it(table, values, match) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(_with(**{table: values}), origin="my.toml")


def test_unknown_top_level_table_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        parse_config({**BASE, "trian": {}})


def test_a_config_without_sources_says_how_to_add_one() -> None:
    with pytest.raises(ConfigError, match=r"\[\[sources\]\]"):
        parse_config({"behaviour": {"probes": ["x"]}})


def test_missing_and_invalid_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 1", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)


def test_k_below_one_is_a_fraction_and_above_is_a_count() -> None:
    assert AttributeSettings(k=0.1).k_records(1970) == 197
    assert AttributeSettings(k=50).k_records(1970) == 50
    assert AttributeSettings(preconditioner=Preconditioner.ADAM).preconditioner == "adam"


def test_a_source_without_a_required_key_names_the_table_and_the_key() -> None:
    tables = {"sources": [{"name": "a", "path": "x.jsonl"}], "behaviour": {"probes": ["a"]}}

    with pytest.raises(ConfigError, match=r"\[sources\[0\]\] needs the key\(s\) format"):
        parse_config(tables)


def test_an_unknown_train_key_lists_seed_and_model_path_among_the_allowed() -> None:
    tables = {"sources": [{"name": "a", "path": "x.jsonl", "format": "jsonl"}],
              "behaviour": {"probes": ["a"]}, "train": {"epoch": 3}}

    with pytest.raises(ConfigError, match=r"did you mean 'epochs'.*model_path.*seed"):
        parse_config(tables)
