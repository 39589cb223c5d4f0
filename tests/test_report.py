"""Report stage: masking of personal details and the three report files."""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path

import matplotlib
import pandas as pd
import pytest

from harmtrace.errors import ConfigError, InputDataError
from harmtrace.report import PiiKind, find_pii, mask_text, masked_summary, write_report

HANDLE, EMAIL, LINK = "@realperson", "jane.doe@example.org", "http://t.co/abc123"
PLANTED = f"RT {HANDLE}: write to {EMAIL} or see {LINK}"
# Substrings that must not survive masking anywhere.
LEAKS = ("realperson", "jane.doe", "example.org", "t.co/abc123", "abc123")


# ---------------------------------------------------------------- redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("@realperson hello", "@[user] hello"),
        ("hello @realperson", "hello @[user]"),
        ("hello @realperson.", "hello @[user]."),
        ("hi @realperson, @other_one! (@third)", "hi @[user], @[user]! (@[user])"),
        ("RT @realperson: so true", "RT @[user]: so true"),
    ],
)
def test_handles_are_masked_wherever_they_stand(text, expected):
    assert mask_text(text) == expected


def test_email_is_one_email_span_not_a_handle():
    spans = find_pii(f"mail {EMAIL} now")

    assert [span.kind for span in spans] == [PiiKind.EMAIL]
    assert mask_text(f"mail {EMAIL} now") == "mail [email] now"


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/a/b?user=jane&ref=@realperson#frag",
        "http://t.co/abc123",
        "t.co/abc123",
        "bit.ly/3xYz",
        "www.example.com/path?q=1",
        "HTTPS://EXAMPLE.COM",
    ],
)
def test_urls_with_query_strings_and_short_links_are_masked_whole(url):
    assert mask_text(f"see {url}. thanks") == "see [url]. thanks"


@pytest.mark.parametrize(
    "disguised",
    ["&#64;realperson", "&#x40;realperson", "&amp;#64;realperson", "&commat;realperson",
     "＠realperson", "@\u200brealperson"],
)
def test_entities_and_invisible_characters_cannot_hide_a_handle(disguised):
    assert mask_text(f"hey {disguised}") == "hey @[user]"


def test_ip_addresses_and_phone_numbers_are_masked():
    text = "from 192.168.10.10, call (555) 123-4567 or +44 20 7946 0958."

    assert mask_text(text) == "from [ip], call [phone] or [phone]."


@pytest.mark.parametrize(
    "text",
    ["posted 2024-05-01 12:30", "score 0.123 after 12345 steps", "version 1.2.3", "a & b < c"],
)
def test_text_without_personal_details_is_unchanged(text):
    assert mask_text(text) == text


def test_masking_is_idempotent():
    once = mask_text(PLANTED + " &amp;#64;x 10.0.0.1 555-123-4567")

    assert mask_text(once) == once


def test_pii_spans_do_not_overlap_and_cover_each_detail():
    spans = find_pii(PLANTED)

    assert [span.kind for span in spans] == [PiiKind.USER, PiiKind.EMAIL, PiiKind.URL]
    assert all(a.end <= b.start for a, b in zip(spans, spans[1:], strict=False))
    assert [PLANTED[s.start : s.end] for s in spans] == [HANDLE, EMAIL, LINK]


def test_mask_text_refuses_non_strings():
    with pytest.raises(InputDataError, match="must be a str"):
        mask_text(None)


# ---------------------------------------------------------------- render


def _full_summary() -> dict:
    sources = [
        {"source": "forum", "score": 0.4, "ci": [0.3, 0.5], "share_topk": 0.8, "n_records": 60},
        {"source": HANDLE, "score": -0.1, "ci": [-0.2, 0.0], "share_topk": 0.2, "n_records": 40},
    ]
    condition = {"harm_rates": [0.12, 0.13, 0.11], "mean": 0.12, "ci": [0.1, 0.14],
                 "perplexity": [20.0, 21.0, 20.5], "perplexity_mean": 20.5}
    return {
        "harmtrace_version": "0.1.0",
        "created_at": "2024-05-01T12:00:00+00:00",
        "scenario": {"name": "planted", "kind": "synthetic", "description": PLANTED},
        "dataset": {"version": "v1", "n_records": 100, "sources": [
            {"name": "forum", "n_records": 60, "origin": LINK, "licence": "CC-BY-4.0"},
            {"name": HANDLE, "n_records": 40, "origin": EMAIL, "licence": "unknown"},
        ]},
        "model": {"model_id": "tiny-gpt", "n_params": 123456, "checkpoints": [100, 200]},
        "behaviour": {
            "name": "toxicity", "scorer": "profanity", "threshold": 0.5, "n_probes": 40,
            "n_samples": 8, "harm_rate": 0.125, "ci": [0.1, 0.15],
            "floor": {"harm_rate": 0.02, "ci": [0.01, 0.03], "description": f"base {LINK}"},
            "examples": [PLANTED, f"<script>alert('{HANDLE}')</script>"],
        },
        "attribution": {
            "k": 10,
            "methods": {
                "trak": {"description": f"TRAK by {EMAIL}", "sign": "positive = more harm",
                         "auprc": 0.6, "auprc_random": 0.1, "sources": sources},
                "bm25": {"description": "lexical", "sign": "positive = more harm",
                         "auprc": None, "auprc_random": None, "sources": sources[:1]},
            },
            "agreement": [{"a": "trak", "b": "bm25", "spearman": 0.7, "topk_overlap": 0.4}],
            "reliability": "moderate",
        },
        "verification": {
            "k": 10, "seeds": [0, 1, 2], "alpha": 0.05, "full_perplexity": 30.0,
            "conditions": {
                "top-trak": {**condition, "harm_rates": [0.05, 0.06, 0.04], "mean": 0.05},
                "random": condition,
            },
            "comparisons": {
                "trak": {"effect": -0.07, "effect_ci": [-0.09, -0.05], "p_value": 0.0004,
                         "p_permutation": 0.05, "test": "Welch t-test", "alpha": 0.05,
                         "significant": True, "utility_change": 0.1},
            },
        },
        "ledger": {"n_entries": 12, "head": "ab" * 32},
        "caveats": ["tiny model", f"ask {HANDLE}"],
    }


def _top_records() -> pd.DataFrame:
    return pd.DataFrame({
        "rank": [1, 2],
        "record_id": ["r-1", "r-2"],
        "source": ["forum", HANDLE],
        "text": [PLANTED, "x" * 500],
        "trak": [0.5, 0.4],
        "bm25": [0.3, 0.1],
    })


def _written(paths) -> dict[str, str]:
    files = (paths.html, paths.markdown, paths.summary_json)
    return {p.name: p.read_text(encoding="utf-8") for p in files}


def test_full_summary_writes_three_files_with_every_section_run(tmp_path):
    paths = write_report(_full_summary(), tmp_path / "out", top_records=_top_records())
    files = _written(paths)

    assert set(files) == {"report.html", "report.md", "summary.json"}
    for title in ("Behaviour", "Data", "Attribution", "Verification", "Caveats", "Provenance"):
        assert title in files["report.html"] and title in files["report.md"]
    assert "not run" not in files["report.html"] and "not run" not in files["report.md"]
    assert "Top records" in files["report.md"] and "Agreement between methods" in files["report.md"]
    assert "12.5% (95% CI [10.0%, 15.0%])" in files["report.md"]


def test_minimal_summary_renders_missing_sections_as_not_run(tmp_path):
    summary = {"behaviour": {"name": "toxicity", "harm_rate": 0.0}}

    files = _written(write_report(summary, tmp_path))

    assert files["report.md"].count("*not run*") == 5
    assert files["report.html"].count("not run") == 5
    assert "0.0%" in files["report.md"]
    assert json.loads(files["summary.json"]) == summary


@pytest.mark.parametrize("name", ["report.html", "report.md", "summary.json"])
def test_planted_personal_details_appear_in_no_written_file(tmp_path, name):
    paths = write_report(_full_summary(), tmp_path, top_records=_top_records())

    written = (tmp_path / name).read_text(encoding="utf-8")

    assert paths.html.exists()
    for leak in LEAKS:
        assert leak not in written, f"{leak!r} leaked into {name}"
    assert "@[user]" in written and "[email]" in written and "[url]" in written


def test_html_is_self_contained_with_inline_base64_png_figures(tmp_path):
    html = write_report(_full_summary(), tmp_path).html.read_text(encoding="utf-8")

    assert 'src="http' not in html and "<link" not in html
    assert "<style>" in html
    sources = re.findall(r'src="([^"]*)"', html)
    assert len(sources) == 3  # two attribution methods and the verification plot
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]).startswith(b"\x89PNG")


def test_data_cannot_inject_html_or_break_markdown(tmp_path):
    paths = write_report(_full_summary(), tmp_path, top_records=_top_records())
    html, markdown = paths.html.read_text(), paths.markdown.read_text()

    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<script>" not in markdown
    table_rows = [line for line in markdown.splitlines() if line.startswith("| 1 |")]
    assert len(table_rows) == 1 and table_rows[0].count(" | ") == 5


def test_top_record_texts_are_cut_to_200_characters(tmp_path):
    markdown = write_report(_full_summary(), tmp_path, top_records=_top_records()).markdown

    cells = [line.split(" | ")[3] for line in markdown.read_text().splitlines()
             if line.startswith("| 2 |")]

    assert len(cells) == 1 and len(cells[0]) <= 202  # 199 characters plus an ellipsis


def test_no_temporary_files_are_left_behind(tmp_path):
    write_report(_full_summary(), tmp_path, top_records=_top_records())
    write_report({"behaviour": {}}, tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.md",
                                                          "summary.json"]


def test_written_summary_keeps_numbers_and_identifiers(tmp_path):
    summary = _full_summary()
    original = copy.deepcopy(summary)

    written = json.loads(write_report(summary, tmp_path).summary_json.read_text())

    assert summary == original  # the caller's dict is not modified
    assert written["ledger"] == summary["ledger"]
    assert written["created_at"] == summary["created_at"]
    assert written["verification"]["conditions"] == summary["verification"]["conditions"]
    assert written == masked_summary(summary)


def test_null_result_is_reported_as_kept(tmp_path):
    summary = _full_summary()
    summary["verification"]["comparisons"]["trak"].update(significant=False, p_value=0.4)

    markdown = write_report(summary, tmp_path).markdown.read_text()

    assert "not significant (null result kept)" in markdown


def test_top_records_without_required_columns_are_refused(tmp_path):
    with pytest.raises(InputDataError, match="text"):
        write_report(_full_summary(), tmp_path, top_records=_top_records().drop(columns="text"))
    assert list(tmp_path.iterdir()) == []


def test_bad_summary_or_out_dir_is_refused_before_writing(tmp_path):
    with pytest.raises(InputDataError, match="summary must be a dict"):
        write_report([], tmp_path)
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        write_report({}, target)


def test_writing_a_report_leaves_the_matplotlib_backend_alone(tmp_path):
    before = matplotlib.get_backend()

    write_report(_full_summary(), tmp_path)

    assert matplotlib.get_backend() == before


def test_report_files_are_identical_for_identical_inputs(tmp_path):
    first = _written(write_report(_full_summary(), tmp_path / "a", top_records=_top_records()))
    second = _written(write_report(_full_summary(), tmp_path / "b", top_records=_top_records()))

    assert first == second


def test_out_dir_accepts_a_string(tmp_path):
    paths = write_report({}, str(tmp_path / "s"))

    assert isinstance(paths.html, Path) and paths.html.exists()
