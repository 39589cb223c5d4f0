"""Invariants of the verification statistics: corrections, exact tests, intervals and power."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from harmtrace.errors import ConfigError, HarmtraceError, InputDataError
from harmtrace.verify.stats import (
    adjust,
    binomial_sd,
    bootstrap_ci,
    compare,
    compare_removals,
    correct,
    decisions,
    min_attainable_p,
    minimum_detectable_effect,
    permutation_test,
    power_two_sample,
)

# Benjamini & Hochberg (1995), section 3.2: 15 p-values from a clinical trial. At 0.05 the
# FDR procedure rejects the four smallest; Holm's step-down Bonferroni rejects three.
BH_1995 = [0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459,
           0.3240, 0.4262, 0.5719, 0.6528, 0.7590, 1.0000]


# --- multiple testing -----------------------------------------------------------------------

def test_holm_matches_the_hand_computed_step_down_values():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, max(1*0.04, 0.06)
    adjusted = adjust([0.01, 0.04, 0.03, 0.005], method="holm")

    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])


def test_bh_matches_the_hand_computed_step_up_values():
    # sorted p * 4 / rank = 0.02, 0.02, 0.04, 0.04; running min from the largest
    adjusted = adjust([0.01, 0.04, 0.03, 0.005], method="bh")

    np.testing.assert_allclose(adjusted, [0.02, 0.04, 0.04, 0.02])


def test_the_textbook_example_rejects_four_with_bh_and_three_with_holm():
    assert decisions(BH_1995, alpha=0.05, method="bh").sum() == 4
    assert decisions(BH_1995, alpha=0.05, method="holm").sum() == 3
    assert decisions(BH_1995, alpha=0.05, method="bh")[:4].all()


@pytest.mark.parametrize("method", ["holm", "bh"])
def test_adjusted_p_values_are_monotone_in_the_raw_ones_at_least_raw_and_at_most_one(method):
    raw = np.random.default_rng(3).uniform(0, 0.3, size=40) ** 2 * 10
    raw = np.clip(raw, 0, 1)

    adjusted = adjust(raw, method=method)

    order = np.argsort(raw)
    assert np.all(np.diff(adjusted[order]) >= 0)
    assert np.all(adjusted >= raw)
    assert np.all((adjusted >= 0) & (adjusted <= 1))


def test_a_single_p_value_is_left_unchanged_by_either_correction():
    assert adjust([0.03], "holm")[0] == pytest.approx(0.03)
    assert adjust([0.03], "bh")[0] == pytest.approx(0.03)


def test_an_unknown_correction_method_is_refused_with_the_allowed_names():
    with pytest.raises(ConfigError, match="method='bonferoni'.*holm"):
        adjust([0.01, 0.2], method="bonferoni")


def test_correct_sets_adjusted_p_and_significance_on_every_comparison():
    separated = compare([0.1, 0.11, 0.12, 0.1], [0.3, 0.31, 0.29, 0.3])
    null = compare([0.2, 0.25, 0.22, 0.21], [0.21, 0.24, 0.2, 0.23])

    out = correct([separated, null], method="holm")

    assert [c.p_adjusted for c in out] == pytest.approx(list(adjust(
        [separated.p_value, null.p_value], "holm")))
    assert out[0].significant is True and out[1].significant is False
    assert separated.significant is None  # the inputs are frozen and untouched


# --- permutation test -----------------------------------------------------------------------

def test_exact_permutation_p_for_three_vs_three_separated_seeds_is_one_in_twenty():
    result = permutation_test([0.10, 0.11, 0.12], [0.20, 0.21, 0.22], alternative="less")

    assert result.exact
    assert result.n_relabelings == 20
    assert result.p_value == pytest.approx(0.05)


def test_min_attainable_p_matches_the_exact_test_at_full_separation():
    assert min_attainable_p(3, 3, "less") == pytest.approx(1 / 20)
    assert min_attainable_p(3, 3, "two-sided") == pytest.approx(2 / 20)
    assert min_attainable_p(5, 4, "greater") == pytest.approx(1 / math.comb(9, 4))
    result = permutation_test([1.0, 2.0, 3.0, 4.0, 5.0], [-4.0, -3.0, -2.0, -1.0],
                              alternative="greater")
    assert result.p_value == pytest.approx(min_attainable_p(5, 4, "greater"))


def test_three_seeds_per_group_can_never_be_significant_at_five_percent():
    cmp = compare([0.0, 0.01, 0.02], [0.5, 0.51, 0.52], alpha=0.05)

    assert cmp.min_attainable_p >= cmp.alpha
    assert correct([cmp])[0].significant is False


def test_large_designs_switch_to_a_seeded_monte_carlo_permutation_test():
    rng = np.random.default_rng(0)
    treated, control = rng.normal(-1, 1, 12), rng.normal(0, 1, 12)

    first = permutation_test(treated, control, seed=7)
    again = permutation_test(treated, control, seed=7)

    assert not first.exact
    assert first.n_relabelings == math.comb(24, 12)
    assert first.p_value == again.p_value


# --- bootstrap interval ---------------------------------------------------------------------

def test_bootstrap_interval_covers_the_true_difference_in_about_95_percent_of_experiments():
    rng = np.random.default_rng(2024)
    true_effect, covered = -0.5, 0
    for i in range(200):
        treated, control = rng.normal(true_effect, 1, 8), rng.normal(0, 1, 8)
        ci = bootstrap_ci(treated, control, method="percentile", n_resamples=999, seed=i)
        covered += ci.low <= true_effect <= ci.high

    assert covered / 200 >= 0.88


def test_degenerate_data_fall_back_from_bca_to_percentile_and_say_so():
    ci = bootstrap_ci([0.1, 0.1], [0.2, 0.2], seed=0)

    assert ci.method == "percentile"
    assert "BCa undefined" in ci.note
    assert ci.low == pytest.approx(-0.1) and ci.high == pytest.approx(-0.1)


def test_tiny_groups_are_flagged_as_giving_too_narrow_an_interval():
    ci = bootstrap_ci([0.1, 0.12, 0.11], [0.2, 0.25, 0.21], seed=0)

    assert ci.method == "BCa"
    assert "only 3 seeds" in ci.note
    assert ci.low <= ci.high < 0


def test_bootstrap_interval_is_reproducible_for_one_seed():
    args = ([0.1, 0.2, 0.15, 0.12], [0.3, 0.25, 0.2, 0.28])

    assert bootstrap_ci(*args, seed=5) == bootstrap_ci(*args, seed=5)


# --- power ----------------------------------------------------------------------------------

def test_power_matches_a_monte_carlo_rate_of_welch_rejections():
    rng = np.random.default_rng(11)
    n, effect, sd, alpha = 6, -1.0, 1.0, 0.05
    treated = rng.normal(effect, sd, size=(20_000, n))
    control = rng.normal(0.0, sd, size=(20_000, n))

    p = stats.ttest_ind(treated, control, axis=1, equal_var=False, alternative="less").pvalue
    simulated = float(np.mean(p < alpha))

    assert power_two_sample(effect, sd, n, alpha, "less") == pytest.approx(simulated, abs=0.05)


def test_power_increases_with_seeds_and_with_the_size_of_the_effect():
    by_n = [power_two_sample(-0.5, 1.0, n) for n in (3, 5, 10, 20)]
    by_effect = [power_two_sample(e, 1.0, 5) for e in (-0.1, -0.5, -1.0, -2.0)]

    assert np.all(np.diff(by_n) > 0)
    assert np.all(np.diff(by_effect) > 0)


def test_power_at_zero_effect_equals_alpha():
    for alternative in ("less", "greater", "two-sided"):
        assert power_two_sample(0.0, 1.0, 4, 0.05, alternative) == pytest.approx(0.05)


def test_minimum_detectable_effect_inverts_power():
    for sd, n, alternative in [(1.0, 5, "less"), (0.03, (4, 6), "greater"), (2.0, 8, "two-sided")]:
        mde = minimum_detectable_effect(sd, n, alpha=0.05, power=0.8, alternative=alternative)

        assert (mde < 0) == (alternative == "less")
        assert power_two_sample(mde, sd, n, 0.05, alternative) == pytest.approx(0.8, abs=1e-6)


def test_binomial_sd_is_the_sampling_sd_of_a_rate():
    assert binomial_sd(0.2, 400) == pytest.approx(0.02)
    assert binomial_sd(0.0, 50) == 0.0


def test_compare_reports_the_power_the_design_had_for_a_target_effect():
    cmp = compare([0.10, 0.12, 0.11, 0.13], [0.20, 0.22, 0.19, 0.21], target_effect=-0.02)

    expected = power_two_sample(-0.02, cmp.sd, (4, 4), cmp.alpha, "less")
    assert cmp.power_target == pytest.approx(expected)
    assert cmp.effect == pytest.approx(0.115 - 0.205)
    assert cmp.as_dict()["ci"] == list(cmp.ci)


# --- errors ---------------------------------------------------------------------------------

def test_nan_input_is_refused_naming_the_argument():
    with pytest.raises(InputDataError, match="control.*non-finite"):
        compare([0.1, 0.2], [0.3, float("nan")])
    with pytest.raises(InputDataError, match="treated.*non-finite"):
        bootstrap_ci([np.inf, 0.2], [0.3, 0.4])


def test_a_group_with_one_seed_is_refused_naming_the_argument():
    with pytest.raises(ConfigError, match="treated has 1 value"):
        permutation_test([0.1], [0.3, 0.4])


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 5])
def test_alpha_outside_zero_one_is_refused(alpha):
    with pytest.raises(ConfigError, match="alpha="):
        compare([0.1, 0.2], [0.3, 0.4], alpha=alpha)


def test_unknown_alternative_and_statistic_are_refused():
    with pytest.raises(ConfigError, match="alternative='lower'"):
        permutation_test([0.1, 0.2], [0.3, 0.4], alternative="lower")
    with pytest.raises(ConfigError, match="statistic='mean'"):
        bootstrap_ci([0.1, 0.2], [0.3, 0.4], statistic="mean")


def test_errors_belong_to_the_harmtrace_tree_and_to_value_error():
    with pytest.raises(HarmtraceError):
        adjust([0.1, float("nan")])
    with pytest.raises(ValueError):
        adjust([1.5])


# --- the pipeline's summary -----------------------------------------------------------------

def test_compare_removals_keeps_the_keys_the_pipeline_and_report_read():
    out = compare_removals([0.10, 0.11, 0.12], [0.20, 0.22, 0.21], alpha=0.05)

    assert set(out) == {"effect", "effect_ci", "p_value", "p_permutation", "test", "alpha",
                        "significant"}
    assert out["effect"] == pytest.approx(-0.1)
    assert out["effect_ci"][0] < out["effect"] < out["effect_ci"][1] < 0
    assert out["p_permutation"] == pytest.approx(0.05)
    assert out["significant"] is True


def test_compare_removals_without_variation_is_a_kept_null_result():
    out = compare_removals([0.2, 0.2], [0.2, 0.2])

    assert out["p_value"] == 1.0 and out["significant"] is False
