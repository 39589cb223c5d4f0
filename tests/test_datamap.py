"""The data map: signals on planted data, privacy of every artifact and output, the stage."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from harmtrace.config import load_config, parse_config
from harmtrace.datamap import DatamapSettings, Embedding, build_datamap
from harmtrace.datamap._build import suppressed_groups
from harmtrace.datamap._settings import LANGUAGE_CODES
from harmtrace.datamap.perplexity import record_nll
from harmtrace.datamap.signals import exact_duplicates, near_duplicates, pii_signal
from harmtrace.errors import ConfigError
from harmtrace.models.lm import encode_texts, mean_token_nll
from harmtrace.pipeline import Pipeline
from harmtrace.report.redact import PiiKind, find_pii, mask_text
from helpers import run_cli, tiny_lm, tiny_tokenizer, toml_text

HANDLES = ("@zorblax_q", "@quintessa77")
CARD = "4111 1111 1111 1111"  # a test number with a valid Luhn checksum
NEAR_A = ("the committee will meet on thursday afternoon to discuss the new budget for the "
          "library and the park")
NEAR_B = NEAR_A.replace("park", "garden")  # last word changed: 17 of 19 shingles shared
FAR_B = NEAR_A.replace("discuss", "debate")  # middle word changed: Jaccard 15/21 to NEAR_A
_WORDS = ("apple river stone cloud violin market garden pencil orange window silver forest "
          "ladder candle rocket meadow castle harbor lantern pepper tiger velvet marble "
          "canyon feather island jacket kettle lemon mirror needle ocean puzzle quartz "
          "saddle tunnel umbrella valley wagon yogurt zebra anchor bottle carpet dragon").split()


def _filler(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.sample(_WORDS, 8)) for _ in range(n)]


def _planted() -> dict[str, list[str]]:
    """Three sources: forum and tweets (30 records each) and tiny (4, below any group size).

    Exact duplicates (after lower-casing and collapsing whitespace): 2 groups, 4 records.
    Near duplicates at 0.8: NEAR_A ~ NEAR_B only. Handles in 4 tweets, a card in one post.
    """
    rng = random.Random(0)
    forum = _filler(rng, 24) + [
        "Hello   World, this is a planted duplicate", NEAR_A, FAR_B,
        f"my card is {CARD} please refund", "you are such an idiot and a fool",
        "what an idiot, shut up you fool",
    ]
    tweets = _filler(rng, 24) + [
        "hello world, this is a planted duplicate", NEAR_B,
        "The Quick Brown fox jumps over the lazy dog today",
        "the quick  brown fox jumps over the lazy dog today",
        f"RT {HANDLES[0]}: lunch with {HANDLES[1]} was lovely",
        f"{HANDLES[0]} lovely lunch today http://t.co/xyz123",
    ]
    tweets[0] = f"{HANDLES[1]} {tweets[0]}"
    tweets[1] = f"{HANDLES[0]} {tweets[1]}"
    return {"forum": forum, "tweets": tweets, "tiny": _filler(rng, 4)}


@dataclass(frozen=True)
class Rec:
    record_id: str
    source: str
    text: str


def _records() -> list[Rec]:
    return [Rec(f"{source}:{i}", source, text)
            for source, texts in _planted().items() for i, text in enumerate(texts)]


def _config_tables(tmp: Path, **datamap) -> dict:
    sources = []
    for name, texts in _planted().items():
        path = tmp / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        sources.append({"name": name, "path": str(path), "format": "jsonl"})
    return {"workspace": {"path": str(tmp / "ws")}, "sources": sources,
            "behaviour": {"probes": ["you"], "scorer": "profanity", "threshold": 0.5},
            "datamap": {"n_clusters": 3, "min_group_size": 10, **datamap}}


@pytest.fixture(scope="module")
def mapped(tmp_path_factory) -> dict:
    """``harmtrace ingest`` then ``harmtrace data map`` (twice) on the planted sources."""
    tmp = tmp_path_factory.mktemp("datamap")
    config = tmp / "config.toml"
    config.write_text(toml_text(_config_tables(tmp)), encoding="utf-8")
    assert run_cli("ingest", str(config)).returncode == 0
    first = run_cli("data", "map", str(config))
    assert first.returncode == 0, first.stderr
    second = run_cli("data", "map", str(config))
    assert second.returncode == 0, second.stderr
    return {"config": config, "ws": tmp / "ws", "first": first, "second": second}


def artifact_texts(folder: Path) -> list[str]:
    """Every file under ``folder`` as lower-case text; Parquet files decoded to CSV first, as
    their compressed bytes could hide text from a byte scan."""
    import pandas as pd

    return [(pd.read_parquet(p).to_csv() if p.suffix == ".parquet"
             else p.read_text(encoding="utf-8")).lower()
            for p in sorted(folder.rglob("*")) if p.is_file()]


# -- signals ------------------------------------------------------------------------------


def test_exact_duplicates_are_found_after_case_and_whitespace_normalisation():
    found = exact_duplicates([r.text for r in _records()])

    assert found.info == {"n_groups": 2, "n_duplicate_records": 4, "n_redundant": 2}
    assert sorted(found.score[found.flag]) == [2, 2, 2, 2]
    assert len({found.detail[i] for i in np.flatnonzero(found.flag)}) == 2


def test_near_duplicates_found_are_exactly_the_planted_pairs():
    records = _records()
    texts = [r.text for r in records]
    found = near_duplicates(texts, threshold=0.8, num_perm=128, shingle_size=3, seed=0)

    pairs = {frozenset((texts[i], texts[j])) for i, j, _ in found.pairs}
    planted = {frozenset((NEAR_A, NEAR_B)),
               frozenset(("Hello   World, this is a planted duplicate",
                          "hello world, this is a planted duplicate")),
               frozenset(("The Quick Brown fox jumps over the lazy dog today",
                          "the quick  brown fox jumps over the lazy dog today"))}
    assert pairs == planted
    assert len(set(found.component[found.component >= 0].tolist())) == 3


def test_near_duplicate_threshold_is_respected():
    texts = [NEAR_A, NEAR_B, FAR_B]
    strict = near_duplicates(texts, threshold=0.8, num_perm=256, shingle_size=3, seed=0)
    loose = near_duplicates(texts, threshold=0.5, num_perm=256, shingle_size=3, seed=0)

    assert {(i, j) for i, j, _ in strict.pairs} == {(0, 1)}
    assert {(i, j) for i, j, _ in loose.pairs} == {(0, 1), (0, 2), (1, 2)}
    assert all(s >= 0.8 for *_, s in strict.pairs) and all(s >= 0.5 for *_, s in loose.pairs)


def test_near_only_counts_leave_out_exact_duplicate_pairs():
    built = build_datamap(_records(), DatamapSettings(embedding=Embedding.TFIDF, n_clusters=3))
    near = built.summary["duplicates"]["near"]

    assert (near["n_pairs"], near["n_near_only_pairs"]) == (3, 1)
    assert (near["n_duplicate_records"], near["n_near_only_records"]) == (6, 2)


def test_pii_signal_counts_spans_per_recognizer():
    found = pii_signal([f"RT {HANDLES[0]}: see {HANDLES[1]} http://t.co/abc", "nothing here",
                        f"card {CARD}"])

    assert found.detail == ["url:1,user:2", "", "card:1"]
    assert found.score.tolist() == [3, 0, 1] and found.flag.tolist() == [True, False, True]
    assert found.info["spans"] == {"card": 1, "url": 1, "user": 2}


@pytest.mark.parametrize("text", ["4111 1111 1111 1111", "4111-1111-1111-1111",
                                  "378282246310005", "4012888888881881"])
def test_card_numbers_with_valid_luhn_are_masked(text):
    assert [s.kind for s in find_pii(f"pay {text} now")] == [PiiKind.CARD]
    assert mask_text(f"pay {text} now") == "pay [card] now"


@pytest.mark.parametrize(("text", "address"), [
    ("from 2001:db8::1, then", "2001:db8::1"),
    ("at 2001:0db8:85a3:0000:0000:8a2e:0370:7334.", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
    ("fe80::1ff:fe23:4567:890a: denied", "fe80::1ff:fe23:4567:890a"),
    ("mapped ::ffff:192.0.2.1 here", "::ffff:192.0.2.1"),
    ("net 2001:DB8:: is", "2001:DB8::"),
])
def test_ipv6_addresses_are_masked(text, address):
    assert [(s.kind, text[s.start : s.end]) for s in find_pii(text)] == [(PiiKind.IP, address)]
    assert address not in mask_text(text) and "[ip]" in mask_text(text)


@pytest.mark.parametrize("text", ["at 12:30:45 today", "1:2:3:4:5:6:7:8:9", "std::vector",
                                  "cafe::bad", "ratio 3:2", "#Yankees win"])
def test_colon_runs_that_are_no_ipv6_address_are_kept(text):
    assert find_pii(text) == [] and mask_text(text) == text


@pytest.mark.parametrize("text", ["4111 1111 1111 1112", "1234567890123456"])
def test_card_shaped_numbers_failing_luhn_are_not_cards(text):
    assert PiiKind.CARD not in [s.kind for s in find_pii(f"pay {text} now")]


def test_record_nll_equals_mean_token_nll_of_each_record_alone(one_thread):
    model, tokenizer = tiny_lm(), tiny_tokenizer()
    sequences = encode_texts(tokenizer, ["the cat sat on the mat", "a dog", "the sun is warm"],
                             max_length=32)

    batched = record_nll(model, sequences, tokenizer.pad_token_id, batch_size=2)

    alone = [mean_token_nll(model, [s], tokenizer.pad_token_id) for s in sequences]
    np.testing.assert_allclose(batched, alone, rtol=1e-5)


# -- privacy -------------------------------------------------------------------------------


def test_groups_below_min_group_size_are_suppressed_with_their_exemplars():
    built = build_datamap(_records(), DatamapSettings(embedding=Embedding.TFIDF, n_clusters=4,
                                                      min_group_size=25))
    sizes = np.bincount([int(d) for d in built.signals.query("signal == 'cluster'")["detail"]])
    clusters = built.aggregates["cluster"]
    primary, hidden = suppressed_groups(dict(enumerate(sizes.tolist())), 25)

    assert all(g["n_records"] >= 25 for g in clusters["groups"])
    assert {g["cluster"] for g in clusters["groups"]} == set(range(len(sizes))) - hidden
    assert clusters["suppressed"]["n_groups"] == len(hidden)
    assert clusters["suppressed"]["n_primary"] == int((sizes < 25).sum()) == len(primary)
    assert clusters["suppressed"]["label"] == "suppressed (n < 25)"
    # tiny (4 records) is suppressed, and forum (30; the tie with tweets goes by name) with it
    assert [g["source"] for g in built.aggregates["source"]["groups"]] == ["tweets"]
    assert built.aggregates["source"]["suppressed"] == {
        "n_groups": 2, "n_primary": 1, "n_secondary": 1, "n_records": 34, "secondary": True,
        "label": "suppressed (n < 25)"}
    listed = {e["record_id"] for g in clusters["groups"] for e in g["exemplars"]}
    assert set(built.exemplar_ids) == listed


def _hidden_remainder(built, kind: str) -> int:
    """Records in the totals that no visible group of ``kind`` accounts for."""
    total = built.summary["metadata"]["n_records"]
    return total - sum(g["n_records"] for g in built.aggregates[kind]["groups"])


def _hidden_flagged(built, kind: str, signal: str) -> float:
    total = built.summary["signals"][signal]["n_flagged"]
    return total - sum(g["signals"][signal]["flag_rate"] * g["n_records"]
                       for g in built.aggregates[kind]["groups"])


def test_totals_minus_visible_groups_never_isolate_fewer_than_min_group_size_records():
    rng = random.Random(1)
    tiny = [Rec(f"tiny:{i}", "tiny", f"call me at jane{i}@example.org {t}")
            for i, t in enumerate(_filler(rng, 3))]  # 3 records, all with PII
    records = _records()[:60] + tiny  # forum 30, tweets 30, tiny 3
    for min_group_size in (10, 31, 40, 61, 70):
        built = build_datamap(records, DatamapSettings(embedding=Embedding.TFIDF, n_clusters=5,
                                                       min_group_size=min_group_size))
        for kind in ("source", "domain", "cluster"):
            hidden = _hidden_remainder(built, kind)
            shown = built.aggregates[kind]["groups"]
            assert hidden == 0 or hidden >= min_group_size or not shown, (kind, min_group_size)
            assert hidden == built.aggregates[kind]["suppressed"]["n_records"]
        # the subtraction the example made: 3 PII records can no longer be told apart
        assert _hidden_remainder(built, "source") != 3
        if min_group_size == 10:
            assert built.aggregates["source"]["suppressed"]["secondary"]
            assert _hidden_flagged(built, "source", "pii") >= 3

    sizes_rng = random.Random(2)
    for _ in range(2000):  # the rule itself, on random group sizes
        sizes = {f"g{i}": sizes_rng.randint(1, 30) for i in range(sizes_rng.randint(1, 8))}
        min_size = sizes_rng.randint(1, 40)
        primary, hidden = suppressed_groups(sizes, min_size)
        assert primary == {g for g, n in sizes.items() if n < min_size} and primary <= hidden
        held = sum(sizes[g] for g in hidden)
        assert held == 0 or held >= min_size or hidden == set(sizes)
        if hidden - primary:  # secondary suppression hides the smallest visible groups only
            assert max(sizes[g] for g in hidden - primary) <= min(
                [sizes[g] for g in set(sizes) - hidden] or [np.inf])


def test_cli_states_secondary_suppression(mapped):
    out = " ".join(mapped["first"].stdout.split())

    assert "2 source group(s) suppressed: 1 (n < 10), and secondary suppression of 1 more" \
        in out


def test_handles_never_appear_unmasked_in_artifacts_or_output(mapped):
    folder = mapped["ws"] / "artifacts" / "datamap"
    outputs = [(mapped[k].stdout + mapped[k].stderr).lower() for k in ("first", "second")]

    assert {p.name for p in folder.iterdir()} >= {"signals.parquet", "summary.json",
                                                  "aggregates.json"}
    for blob in artifact_texts(folder) + outputs:
        for handle in HANDLES:
            assert handle.lower() not in blob
            assert handle[1:].split("_")[0].lower() not in blob  # not even without the '@'
        assert CARD not in blob and "t.co/xyz123" not in blob


def test_signal_table_has_one_schema_and_no_text(mapped):
    import pandas as pd

    frame = pd.read_parquet(mapped["ws"] / "artifacts" / "datamap" / "signals.parquet")
    texts = {t for texts in _planted().values() for t in texts}

    assert list(frame.columns) == ["record_id", "source", "signal", "score", "flag", "detail"]
    assert set(frame["signal"]) == {"length", "language", "exact_duplicate", "near_duplicate",
                                    "pii", "toxicity", "cluster"}
    assert not texts & set(frame["detail"]) and not texts & set(frame["record_id"])


def test_show_text_without_reason_is_refused_and_discloses_nothing(mapped):
    result = run_cli("data", "map", str(mapped["config"]), "--show-text")
    stages = [e.stage for e in Pipeline(load_config(mapped["config"])).ledger.entries()]

    assert result.returncode != 0 and "--reason" in result.stderr + result.stdout
    assert "datamap-disclosure" not in stages
    assert "lazy dog" not in result.stdout


def test_show_text_with_reason_records_the_disclosure_in_the_ledger(mapped):
    result = run_cli("data", "map", str(mapped["config"]), "--show-text",
                     "--reason", "audit ticket 42")
    entry = Pipeline(load_config(mapped["config"])).ledger.entries()[-1]
    shown = entry.outputs["record_ids"]

    assert result.returncode == 0, result.stderr
    assert entry.stage == "datamap-disclosure" and entry.settings["reason"] == "audit ticket 42"
    assert entry.actor and shown
    assert all(record_id in result.stdout for record_id in shown)


def test_stage_is_skipped_when_current(mapped):
    entries = Pipeline(load_config(mapped["config"])).ledger.entries()

    assert "datamap up to date, skipped" in mapped["second"].stderr
    assert [e.stage for e in entries].count("datamap") == 1


def test_cli_prints_duplicates_pii_and_clusters(mapped):
    out = mapped["first"].stdout

    assert "exact duplicates: 4 records in 2 groups" in out
    assert "near-only (not exact): 1 pairs, 2 records" in out
    assert "user 5 spans in 4 records" in out and "card 1 spans in 1 records" in out
    assert "clusters" in out and "skipped perplexity" in out


# -- settings --------------------------------------------------------------------------------


def test_tfidf_fallback_is_used_and_stated_when_asked():
    built = build_datamap(_records()[:30], DatamapSettings(embedding=Embedding.TFIDF,
                                                           n_clusters=2))
    meta = built.summary["metadata"]

    assert meta["embedding"] == "tfidf"
    assert "datamap.embedding = 'tfidf'" in meta["embedding_reason"]
    assert meta["pii_recognizers"].startswith("patterns only")


@pytest.mark.parametrize(("table", "key"), [
    ({"n_cluster": 3}, "datamap.n_cluster"), ({"n_clusters": 0}, "datamap.n_clusters"),
    ({"embedding": "bert"}, "datamap.embedding"), ({"num_perm": 4}, "datamap.num_perm"),
    ({"near_duplicate_threshold": 1.5}, "datamap.near_duplicate_threshold"),
    ({"perplexity_quantile": 1.0}, "datamap.perplexity_quantile"),
    ({"min_chars": 10, "max_chars": 5}, "datamap.max_chars"),
    ({"domains": ["tweets"]}, "datamap.domains"),
])
def test_config_errors_name_the_key(tmp_path, table, key):
    tables = _config_tables(tmp_path)
    tables["datamap"] = table

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(tables)


def test_n_clusters_above_the_record_count_is_clamped_and_stated(tmp_path):
    built = build_datamap(_records()[:5], DatamapSettings(embedding=Embedding.TFIDF,
                                                          n_clusters=8, min_group_size=1))
    meta = built.summary["metadata"]

    assert meta["n_clusters"] == 5
    assert meta["n_clusters_note"] == ("datamap.n_clusters = 8 but there are only 5 records: "
                                       "5 clusters were made")
    from io import StringIO

    from rich.console import Console

    from harmtrace.datamap import render_datamap

    out = StringIO()
    render_datamap(built.summary, built.aggregates, Console(file=out, width=200))
    assert "note: datamap.n_clusters = 8 but there are only 5 records" in out.getvalue()
    unclamped = build_datamap(_records()[:5], DatamapSettings(embedding=Embedding.TFIDF,
                                                              n_clusters=2))
    assert "n_clusters_note" not in unclamped.summary["metadata"]


def test_unknown_language_codes_are_refused_naming_key_value_and_example(tmp_path):
    tables = _config_tables(tmp_path, languages=["en", "english"])

    with pytest.raises(ConfigError) as raised:
        parse_config(tables)
    message = str(raised.value)
    assert "datamap.languages" in message and "'english'" in message and '["en"]' in message
    assert parse_config(_config_tables(tmp_path, languages=["en", "de"])).datamap.languages \
        == ("en", "de")


def test_language_codes_are_the_ones_py3langid_gives():
    from harmtrace.datamap.signals import _identifier

    assert set(_identifier().nb_classes) == LANGUAGE_CODES


def test_data_map_without_ingest_creates_nothing(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(toml_text(_config_tables(tmp_path)), encoding="utf-8")
    before = sorted(tmp_path.rglob("*"))

    result = run_cli("data", "map", str(config))

    assert result.returncode != 0
    assert "harmtrace ingest" in result.stderr + result.stdout
    assert sorted(tmp_path.rglob("*")) == before  # no ws/, harmtrace.db or keys/
    assert not (tmp_path / "ws").exists()


def test_domains_group_sources():
    settings = DatamapSettings(embedding=Embedding.TFIDF, n_clusters=2,
                               domains={"forum": "web", "tweets": "web", "tiny": "web"})
    built = build_datamap(_records(), settings)

    assert [(g["domain"], g["n_records"]) for g in built.aggregates["domain"]["groups"]] \
        == [("web", 64)]


# -- joins ---------------------------------------------------------------------------------


def test_cluster_shares_of_labels_and_top_k_add_up_to_the_whole():
    import pandas as pd

    from harmtrace.datamap import Attribution

    records = _records()
    labels = [int("idiot" in r.text) for r in records]
    scores = pd.DataFrame({"record_id": [r.record_id for r in records],
                           "bm25": [float(y) for y in labels]})  # labelled records score top
    built = build_datamap(records, DatamapSettings(embedding=Embedding.TFIDF, n_clusters=2,
                                                   min_group_size=1),
                          labels=labels, attribution=Attribution(scores, k=2))
    groups = built.aggregates["cluster"]["groups"]

    labelled = sum(g["labelled_share"] * g["n_records"] for g in groups)
    assert labelled == pytest.approx(sum(labels))
    assert sum(g["attribution"]["bm25"]["topk_share"] for g in groups) == pytest.approx(1.0)
    holder = [g for g in groups if g["labelled_share"] > 0]
    assert all(g["attribution"]["bm25"]["topk_share"] > 0 for g in holder)


def test_perplexity_flags_records_above_the_quantile(one_thread):
    model, tokenizer = tiny_lm(), tiny_tokenizer()

    def nll(texts):
        return record_nll(model, encode_texts(tokenizer, texts, max_length=32),
                          tokenizer.pad_token_id)

    built = build_datamap(_records(), DatamapSettings(embedding=Embedding.TFIDF, n_clusters=2,
                                                      perplexity_quantile=0.9),
                          perplexity=nll)
    rows = built.signals.query("signal == 'perplexity'")

    cut = np.quantile(rows["score"], 0.9)
    assert rows["flag"].tolist() == (rows["score"] > cut).tolist()
    assert 0 < rows["flag"].sum() <= 0.1 * len(rows) + 1


def test_pipeline_map_joins_model_attribution_and_labels(finished_run, synthetic_scenario,
                                                         tmp_path):
    import dataclasses
    import shutil

    workspace = tmp_path / "ws"
    shutil.copytree(finished_run.workspace, workspace)
    config = load_config(finished_run.config)
    config = dataclasses.replace(
        config, datamap=DatamapSettings(embedding=Embedding.TFIDF, n_clusters=3),
        evaluation=dataclasses.replace(config.evaluation,
                                       ground_truth=str(synthetic_scenario.ground_truth)))

    result = Pipeline(config, workspace=workspace).datamap()

    assert "perplexity" in result.summary["signals"] and not result.summary["metadata"]["skipped"]
    assert result.aggregates["attribution"]["methods"] == ["bm25", "gradcos"]
    assert "labels" in result.summary
    for g in result.aggregates["cluster"]["groups"]:
        assert set(g["attribution"]) == {"bm25", "gradcos"} and "labelled_share" in g
