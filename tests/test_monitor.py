"""The release gate: its statistics on arrays, its policy file, and `harmtrace monitor`."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from harmtrace.cli import main
from harmtrace.config import load_config
from harmtrace.errors import ConfigError, InputDataError
from harmtrace.ledger import Ledger
from harmtrace.remediate import (
    ModelMeasurement,
    MonitorPolicy,
    compare_measurements,
    load_policy,
    monitor_models,
)
from harmtrace.remediate.monitor import _ks_statistics
from harmtrace.store import Checkpoint, Database, ModelInfo
from helpers import run_cli

N_PROBES, N_SAMPLES, N_TEXTS = 8, 30, 200
WORDS = ("the cat sat", "a dog ran", "sun and rain", "you idiot", "what a day")


def _measurement(model_id: str, *, rate: float, seed: int, nll_factor: float = 1.0,
                 score_shift: float = 0.0, heldout: bool = True) -> ModelMeasurement:
    """Generations of N_PROBES x N_SAMPLES with about ``rate`` harmful; held-out texts of 10
    tokens whose summed NLL is the shared base times ``nll_factor``."""
    rng = np.random.default_rng(seed)
    n = N_PROBES * N_SAMPLES
    base = np.random.default_rng(99).gamma(5.0, 6.0, N_TEXTS)  # same texts for every model
    tokens = np.full(N_TEXTS, 10)
    return ModelMeasurement(
        model_id=model_id, probe_index=np.repeat(np.arange(N_PROBES), N_SAMPLES),
        harm_score=np.clip(rng.random(n) * 0.6 + score_shift, 0, 1),
        harmful=rng.random(n) < rate, texts=tuple(rng.choice(WORDS, n)),
        heldout_nll=base * nll_factor if heldout else None,
        heldout_tokens=tokens if heldout else None)


def _fast(baseline, candidate, **kwargs):
    return compare_measurements(baseline, candidate, n_resamples=999, **kwargs)


# -- the statistics ----------------------------------------------------------------------

def test_a_clearly_higher_candidate_harm_rate_is_a_regression() -> None:
    result = _fast(_measurement("b" * 16, rate=0.05, seed=0),
                   _measurement("c" * 16, rate=0.40, seed=1))

    harm = result.check("harm_rate")
    assert result.regression and "harm_rate" in result.failed
    assert harm.verdict == "REGRESSION" and harm.change > 0.25
    assert harm.interval[0] > 0 < harm.p_adjusted < 0.05
    assert result.summary.startswith("REGRESSION:") and "harm_rate" in result.summary


def test_equal_harm_rates_are_not_a_regression() -> None:
    same = _measurement("b" * 16, rate=0.2, seed=0)
    other_draw = dataclasses.replace(_measurement("c" * 16, rate=0.2, seed=1),
                                     heldout_nll=same.heldout_nll)

    assert not _fast(same, dataclasses.replace(same, model_id="c" * 16)).regression
    result = _fast(same, other_draw)
    assert result.check("harm_rate").verdict == "pass"
    assert result.check("perplexity").change == pytest.approx(0.0)


def test_a_model_compared_with_itself_passes_every_check_with_p_one() -> None:
    model = _measurement("a" * 16, rate=0.3, seed=0)

    result = _fast(model, model)

    assert not result.regression and result.warnings == ()
    for check in result.checks:
        assert check.change == pytest.approx(0.0) and check.p_value == 1.0, check.name


def test_perplexity_ten_percent_higher_fails_at_five_percent_tolerance() -> None:
    base = _measurement("b" * 16, rate=0.2, seed=0)
    worse = dataclasses.replace(base, model_id="c" * 16,
                                heldout_nll=base.heldout_nll + np.log(1.10) * 10)

    result = _fast(base, worse)

    ppl = result.check("perplexity")
    assert result.failed == ("perplexity",)
    assert ppl.change == pytest.approx(0.10) and ppl.verdict == "REGRESSION"
    assert ppl.interval[0] == pytest.approx(0.10) and ppl.candidate > ppl.baseline
    assert not _fast(base, worse, policy=MonitorPolicy(max_perplexity_increase=0.15)
                     ).regression


def test_swapping_baseline_and_candidate_flips_a_regression_into_a_pass() -> None:
    low = _measurement("b" * 16, rate=0.05, seed=0)
    high = _measurement("c" * 16, rate=0.40, seed=1, nll_factor=1.2)

    forward, backward = _fast(low, high), _fast(high, low)

    assert forward.failed == ("harm_rate", "perplexity") and not backward.regression
    f, b = forward.check("harm_rate"), backward.check("harm_rate")
    assert b.change == pytest.approx(-f.change)
    assert b.interval == pytest.approx((-f.interval[1], -f.interval[0]))
    assert (1 + forward.check("perplexity").change) * (
        1 + backward.check("perplexity").change) == pytest.approx(1.0)
    for name in ("drift_harm_score_ks", "drift_unigram_jsd"):  # symmetric statistics
        assert forward.check(name).change == pytest.approx(backward.check(name).change)
        assert forward.check(name).p_value == pytest.approx(backward.check(name).p_value)


def test_a_significant_rise_within_max_harm_increase_passes() -> None:
    low, high = (_measurement("b" * 16, rate=0.05, seed=0),
                 _measurement("c" * 16, rate=0.40, seed=1))

    result = _fast(low, high, policy=MonitorPolicy(max_harm_increase=0.5))

    assert result.check("harm_rate").verdict == "pass"
    assert "within the tolerance" in result.check("harm_rate").reason


def test_drift_warns_by_default_and_fails_only_when_the_policy_says_so() -> None:
    base = _measurement("b" * 16, rate=0.2, seed=0)
    drifted = dataclasses.replace(
        _measurement("c" * 16, rate=0.2, seed=0, score_shift=0.4),
        texts=tuple("lorem ipsum dolor" for _ in base.texts))

    warned = _fast(base, drifted)
    failed = _fast(base, drifted, policy=MonitorPolicy(fail_on_drift=True))

    assert not warned.regression
    assert {c.verdict for c in warned.checks if c.name.startswith("drift_")} == {"warning"}
    assert any("fail_on_drift" in w for w in warned.warnings)
    assert set(failed.failed) == {"drift_harm_score_ks", "drift_unigram_jsd"}
    assert failed.check("drift_unigram_jsd").change == pytest.approx(1.0)  # disjoint words


def test_holm_adjusts_over_the_checks_that_can_fail_only() -> None:
    result = _fast(_measurement("b" * 16, rate=0.05, seed=0),
                   _measurement("c" * 16, rate=0.40, seed=1, nll_factor=1.2))

    gate = [c for c in result.checks if c.family == "gate"]
    assert [c.name for c in gate] == ["harm_rate", "perplexity"]
    smaller = min(gate, key=lambda c: c.p_value)
    assert smaller.p_adjusted == pytest.approx(min(1.0, 2 * smaller.p_value))
    assert {c.family for c in result.checks if c.name.startswith("drift_")} == {"drift"}


def test_with_few_probes_the_harm_test_warns_it_cannot_detect_a_regression() -> None:
    keep = np.repeat(np.arange(N_PROBES), N_SAMPLES) < 3

    def cut(m: ModelMeasurement) -> ModelMeasurement:
        return dataclasses.replace(m, probe_index=m.probe_index[keep],
                                   harm_score=m.harm_score[keep], harmful=m.harmful[keep],
                                   texts=tuple(np.array(m.texts)[keep]))

    result = _fast(cut(_measurement("b" * 16, rate=0.0, seed=0)),
                   cut(_measurement("c" * 16, rate=0.9, seed=1)))

    assert result.check("harm_rate").p_value == pytest.approx(1 / 8)  # 2^-3: all flips
    assert not result.regression
    assert any("3 probes" in w for w in result.warnings)


def test_without_heldout_the_utility_check_is_skipped_and_says_so() -> None:
    result = _fast(_measurement("b" * 16, rate=0.2, seed=0, heldout=False),
                   _measurement("c" * 16, rate=0.2, seed=1, heldout=False))

    assert result.check("perplexity").verdict == "skipped"
    assert result.notes == ("utility skipped: the config has no [heldout] text",)
    json.dumps(result.as_dict())  # JSON-ready


def test_ks_statistic_matches_scipy_including_ties() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 5, 50).astype(float), rng.integers(1, 6, 50).astype(float)

    ours = _ks_statistics(a, b, np.zeros((1, 50), dtype=bool))[0]

    assert ours == pytest.approx(stats.ks_2samp(a, b).statistic)


def test_measurements_of_other_probes_are_refused() -> None:
    a = _measurement("b" * 16, rate=0.2, seed=0)
    b = dataclasses.replace(a, probe_index=a.probe_index[::-1].copy())

    with pytest.raises(InputDataError, match="same behaviour spec"):
        compare_measurements(a, b)


# -- the policy file -----------------------------------------------------------------------

def test_policy_file_values_and_provenance_are_read(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[monitor]\nalpha = 0.01\nmax_harm_increase = 0.02\n"
                    "max_perplexity_increase = 0.1\nfail_on_drift = true\n"
                    'set_by = "safety-team"\nset_at = 2025-03-01\n', encoding="utf-8")

    policy = load_policy(path)

    assert (policy.alpha, policy.max_harm_increase, policy.max_perplexity_increase,
            policy.fail_on_drift) == (0.01, 0.02, 0.1, True)
    assert (policy.set_by, policy.set_at, policy.source) == ("safety-team", "2025-03-01",
                                                             str(path))


@pytest.mark.parametrize(("text", "named"), [
    ("[monitor]\nmax_harm_increse = 0.1\n", "monitor.max_harm_increse"),
    ("[monitor]\nalpha = 0.05\n[gate]\nx = 1\n", "'gate'"),
    ('[monitor]\nfail_on_drift = "yes"\n', "monitor.fail_on_drift"),
    ("[monitor]\nalpha = 1.5\n", "monitor.alpha"),
    ("[monitor]\nmax_perplexity_increase = -0.1\n", "monitor.max_perplexity_increase"),
])
def test_policy_file_errors_name_the_key(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(ConfigError, match=named) as err:
        load_policy(path)
    assert str(path) in str(err.value)


def test_an_unknown_policy_key_suggests_the_close_one(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[monitor]\nmax_harm_increse = 0.1\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="did you mean 'max_harm_increase'"):
        load_policy(path)


# -- end to end on the finished run ---------------------------------------------------------

@pytest.fixture
def workspace(finished_run, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_run.workspace, tmp_path / "ws"))


def _final_model(workspace: Path) -> dict:
    return json.loads((workspace / "artifacts" / "model" / "model.json").read_text("utf-8"))


def _keep_earlier_checkpoint(workspace: Path) -> str:
    """Register the run's first checkpoint as a model of its own, kept in
    artifacts/models/<id>: an undertrained 'candidate' without any training."""
    info = _final_model(workspace)
    first = info["checkpoints"][0]
    model_id = "e" * 16
    folder = workspace / "artifacts" / "models" / model_id
    shutil.copytree(workspace / "artifacts" / "model", folder)
    (folder / "model.json").write_text(json.dumps(
        {**info, "model_id": model_id, "checkpoints": [first]}), encoding="utf-8")
    db = Database(f"sqlite:///{workspace / 'harmtrace.db'}")
    final = db.get_model(info["model_id"])
    db.register_model(ModelInfo(model_id=model_id, dataset_version=final.dataset_version,
                                config={"note": "first checkpoint"},
                                checkpoints=(Checkpoint(first["step"], first["path"],
                                                        first["sha256"]),)))
    db.dispose()
    return model_id


def _main(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Exit code and standard error of ``harmtrace ARGV`` run in this process (no start-up
    cost; for the refusals, which load no model)."""
    monkeypatch.setattr(sys, "argv", ["harmtrace", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def test_cli_model_against_itself_passes_and_is_logged(finished_run, workspace: Path) -> None:
    model_id = _final_model(workspace)["model_id"]

    result = run_cli("monitor", str(finished_run.config), "-w", str(workspace), "--json",
                     "--baseline", model_id[:8], "--candidate", model_id)

    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["verdict"] == "pass" and out["failed"] == []
    assert {c["name"]: c["change"] for c in out["checks"]} == pytest.approx(
        {"harm_rate": 0.0, "perplexity": 0.0, "drift_harm_score_ks": 0.0,
         "drift_unigram_jsd": 0.0})
    assert "PASS:" in result.stderr
    db = Database(f"sqlite:///{workspace / 'harmtrace.db'}")
    entry = Ledger.for_workspace(db, workspace, read_only=True).entries()[-1]
    assert entry.stage == "monitor" and entry.seq == out["ledger_seq"]
    assert entry.inputs["baseline"] == entry.inputs["candidate"] == model_id
    assert run_cli("ledger", "verify", "-w", str(workspace)).returncode == 0


def test_undertrained_candidate_fails_on_perplexity_and_the_swap_passes(
        finished_run, workspace: Path, tmp_path: Path) -> None:
    final = _final_model(workspace)["model_id"]
    earlier = _keep_earlier_checkpoint(workspace)
    policy = tmp_path / "policy.toml"
    # the first checkpoint's held-out perplexity is about 5% higher: under the default 5%
    policy.write_text('[monitor]\nmax_perplexity_increase = 0.02\nset_by = "ci"\n',
                      encoding="utf-8")

    worse = run_cli("monitor", str(finished_run.config), "-w", str(workspace), "--policy",
                    str(policy), "--baseline", final, "--candidate", earlier)
    better = monitor_models(load_config(finished_run.config), baseline=earlier,
                            candidate=final, workspace=workspace,
                            policy=load_policy(policy), n_resamples=999)

    assert worse.returncode == 1, worse.stderr
    assert "REGRESSION:" in worse.stderr and "perplexity" in worse.stderr.split("REGRESSION")[1]
    assert "held-out perplexity" in worse.stdout  # the table
    assert not better.regression and better.check("perplexity").change < -0.02
    assert better.policy.set_by == "ci" and better.ledger_seq is not None


def test_cli_bad_prefix_is_one_line_exit_2(finished_run, workspace: Path, monkeypatch,
                                           capsys) -> None:
    model_id = _final_model(workspace)["model_id"]

    code, err = _main(["monitor", str(finished_run.config), "-w", str(workspace),
                       "--baseline", model_id, "--candidate", "zzzz"], monkeypatch, capsys)

    assert code == 2
    assert err.strip().count("\n") == 0
    assert err.startswith("ConfigError: --candidate 'zzzz'")


def test_cli_model_whose_files_are_not_in_the_workspace_is_named_with_the_fix(
        finished_run, workspace: Path, monkeypatch, capsys) -> None:
    model_id = _keep_earlier_checkpoint(workspace)
    shutil.rmtree(workspace / "artifacts" / "models")
    before = len(Ledger.for_workspace(Database(f"sqlite:///{workspace / 'harmtrace.db'}"),
                                      workspace, read_only=True).entries())

    code, err = _main(["monitor", str(finished_run.config), "-w", str(workspace),
                       "--baseline", model_id, "--candidate",
                       _final_model(workspace)["model_id"]], monkeypatch, capsys)

    assert code == 2
    assert err.startswith(f"ArtifactError: model {model_id}: its files are not in")
    assert "harmtrace train" in err and "artifacts/models" in err
    after = Ledger.for_workspace(Database(f"sqlite:///{workspace / 'harmtrace.db'}"),
                                 workspace, read_only=True).entries()
    assert len(after) == before  # refused before anything was measured or logged


def test_cli_bad_policy_key_is_refused_before_any_model_runs(
        finished_run, workspace: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[monitor]\nalfa = 0.1\n", encoding="utf-8")
    model_id = _final_model(workspace)["model_id"]

    code, err = _main(["monitor", str(finished_run.config), "-w", str(workspace), "--policy",
                       str(policy), "--baseline", model_id, "--candidate", model_id],
                      monkeypatch, capsys)

    assert code == 2
    assert "unknown key 'monitor.alfa'" in err
