"""Experiment designs: matched controls have the target's size, never touch the target, and
the budget planner counts runs exactly."""

from __future__ import annotations

import pytest

from harmtrace.errors import ConfigError
from harmtrace.verify.design import (
    Action,
    TargetKind,
    plan_budget,
    random_control,
    resolve_size,
    similar_source,
    source_arms,
)

SOURCES = ["clean"] * 40 + ["mixed"] * 10 + ["forum"] * 12 + ["tiny"] * 2


def test_sizes_below_one_are_fractions_and_from_one_counts() -> None:
    assert resolve_size(0.1, 200) == 20
    assert resolve_size(7, 200) == 7
    for bad in (0, 200, float("nan"), "5", True):
        with pytest.raises(ConfigError, match="size"):
            resolve_size(bad, 200)


def test_random_controls_have_the_size_avoid_the_target_and_depend_only_on_the_seed() -> None:
    target = tuple(range(10))
    draws = [random_control(64, 10, seed, exclude=target) for seed in range(20)]
    for draw in draws:
        assert len(draw) == len(set(draw)) == 10
        assert not set(draw) & set(target)
    assert draws[3] == random_control(64, 10, 3, exclude=target)
    assert len(set(draws)) == 20  # a fresh draw per seed


def test_a_random_control_larger_than_the_records_left_is_refused() -> None:
    with pytest.raises(ConfigError, match="only 4 are left"):
        random_control(10, 5, 0, exclude=range(6))


def test_the_similar_source_is_the_closest_in_size_within_the_tolerance() -> None:
    sizes = {"clean": 40, "mixed": 10, "forum": 12, "tiny": 2}
    assert similar_source("mixed", sizes)[0] == "forum"
    other, why = similar_source("clean", sizes)
    assert other is None and "closest: 'forum'" in why
    assert similar_source("tiny", sizes, size_tolerance=10)[0] == "mixed"


def test_source_arms_pair_each_target_with_controls_of_its_size() -> None:
    arms, notes = source_arms(SOURCES, ["mixed", "clean"])
    by_name = {arm.name: arm for arm in arms}

    mixed = by_name["source-mixed"]
    assert (mixed.kind, mixed.action, mixed.size) == (TargetKind.SOURCE, Action.REMOVE, 10)
    assert {SOURCES[i] for i in mixed.indices} == {"mixed"}
    control = by_name["source-mixed/random-records"]
    assert control.indices is None and control.size == 10
    assert control.exclude == mixed.indices and control.control_of == "source-mixed"
    similar = by_name["source-mixed/similar-source-forum"]
    assert {SOURCES[i] for i in similar.indices} == {"forum"}

    assert "source-clean/random-records" in by_name
    assert not any(name.startswith("source-clean/similar") for name in by_name)
    assert "no source within" in notes[1]


def test_source_arms_refuse_unknown_or_all_covering_sources() -> None:
    with pytest.raises(ConfigError, match="'nope' has no records"):
        source_arms(SOURCES, ["nope"])
    with pytest.raises(ConfigError, match="holds every record"):
        source_arms(["a"] * 5, ["a"])


def test_the_budget_counts_runs_and_reused_runs_cost_nothing() -> None:
    plan = plan_budget(4, 3, seconds_per_run=30, budget_seconds=400)
    assert (plan.runs_needed, plan.runs_fitting, plan.fits) == (12, 13, True)
    assert plan.seconds_needed == 360

    short = plan_budget(4, 3, seconds_per_run=30, budget_seconds=250)
    assert (short.runs_fitting, short.fits, short.max_seeds) == (8, False, 2)
    assert "use 2 seeds per arm" in short.advice

    resumed = plan_budget(4, 3, seconds_per_run=30, budget_seconds=250, reusable_runs=6)
    assert (resumed.runs_needed, resumed.fits) == (6, True)

    hopeless = plan_budget(5, 3, seconds_per_run=100, budget_seconds=250)
    assert hopeless.max_seeds == 0 and "fewer than 2 seeds" in hopeless.advice


def test_budget_inputs_are_checked() -> None:
    with pytest.raises(ConfigError, match="n_seeds"):
        plan_budget(2, 0, seconds_per_run=1, budget_seconds=1)
    with pytest.raises(ConfigError, match="seconds_per_run"):
        plan_budget(2, 2, seconds_per_run=0, budget_seconds=1)
