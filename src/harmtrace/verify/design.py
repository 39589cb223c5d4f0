"""Experiment designs: which training records an intervention touches, its matched controls,
and whether the runs fit the user's compute budget.

An *arm* is one intervention (remove, down-weight or replace a set of train records: a
method's top-k, a cluster or a whole source) or one of its controls. Every treated arm is
compared with controls of the same size:

- ``random-records``: as many records drawn at random from outside the target, a fresh
  draw per seed, so the comparison asks "more than removing any k records?";
- ``similar-source`` (source targets only): the other source whose size is closest to the
  target's, within ``size_tolerance`` (relative), so the comparison asks "more than
  removing another source of this size?". When no source is close enough the control is
  left out and the plan says why.

All functions here are pure: indices in, indices out.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from harmtrace.errors import ConfigError

__all__ = [
    "Action",
    "Arm",
    "BudgetPlan",
    "TargetKind",
    "plan_budget",
    "random_control",
    "resolve_size",
    "similar_source",
    "source_arms",
]


class TargetKind(StrEnum):
    """What an intervention's records are: a method's top records, a cluster or a source."""

    RECORDS = "records"
    CLUSTER = "cluster"
    SOURCE = "source"


class Action(StrEnum):
    """What is done to the target's records before retraining."""

    REMOVE = "remove"
    DOWNWEIGHT = "downweight"  # their loss is multiplied by ``weight`` (0 < weight < 1)
    REPLACE = "replace"  # each is swapped for a record drawn from a replacement pool


@dataclass(frozen=True)
class Arm:
    """One condition of an experiment: ``indices`` of the train records it changes, or
    ``None`` for a fresh random draw of ``size`` records per seed (``exclude`` left out)."""

    name: str
    kind: TargetKind
    action: Action
    size: int
    indices: tuple[int, ...] | None
    control_of: str | None = None  # the treated arm this arm controls for
    exclude: tuple[int, ...] = ()


def resolve_size(size: float, n_records: int, *, name: str = "size") -> int:
    """A count from ``size``: below 1 a fraction of ``n_records``, from 1 a count."""
    if isinstance(size, bool) or not isinstance(size, int | float) or not math.isfinite(size):
        raise ConfigError(f"{name} = {size!r} must be a number: a fraction below 1 or a count")
    count = round(size * n_records) if size < 1 else int(size)
    if not 1 <= count < n_records:
        raise ConfigError(
            f"{name} = {size!r} gives {count} of {n_records} records; it must leave at least "
            "one record in and take at least one out"
        )
    return count


def random_control(n_records: int, size: int, seed: int,
                   exclude: Sequence[int] = ()) -> tuple[int, ...]:
    """``size`` record indices drawn without replacement outside ``exclude``; the draw
    depends only on ``seed`` and the arguments."""
    pool = np.setdiff1d(np.arange(n_records), np.asarray(exclude, dtype=np.int64))
    if size > len(pool):
        raise ConfigError(
            f"a random control of {size} records needs that many records outside the target, "
            f"but only {len(pool)} are left; use a smaller intervention"
        )
    rng = np.random.default_rng([20_000, seed, n_records, size])
    return tuple(sorted(rng.choice(pool, size=size, replace=False).tolist()))


def similar_source(target: str, sizes: Mapping[str, int], *,
                   size_tolerance: float = 0.5) -> tuple[str | None, str]:
    """The other source closest in size to ``target`` within ``size_tolerance`` (relative
    difference), or ``None``; and a sentence saying what was chosen and why."""
    if target not in sizes:
        raise ConfigError(f"source {target!r} is not in the data; choose from {sorted(sizes)}")
    want = sizes[target]
    others = sorted((abs(n - want) / want, name) for name, n in sizes.items() if name != target)
    if not others:
        return None, f"no other source to compare {target!r} with"
    gap, name = others[0]
    if gap > size_tolerance:
        return None, (f"no source within {size_tolerance:.0%} of {target!r}'s {want} records "
                      f"(closest: {name!r} with {sizes[name]})")
    return name, f"{name!r} ({sizes[name]} records) is the closest in size to {target!r} ({want})"


def source_arms(sources: Sequence[str], targets: Sequence[str], *,
                action: Action = Action.REMOVE,
                size_tolerance: float = 0.5) -> tuple[list[Arm], list[str]]:
    """Arms for removing (or changing) each source in ``targets``, with matched controls.

    ``sources[i]`` names the source of train record ``i``. Each target gets a treated arm,
    a ``random-records`` control of the same size and, where one exists, a
    ``similar-source`` control. Returns the arms and one note per target on its controls.
    """
    sizes = Counter(sources)
    arms: list[Arm] = []
    notes: list[str] = []
    for target in targets:
        index = tuple(i for i, s in enumerate(sources) if s == target)
        if not index:
            raise ConfigError(f"source {target!r} has no records; choose from {sorted(sizes)}")
        if len(index) == len(sources):
            raise ConfigError(f"source {target!r} holds every record; removing it leaves none")
        name = f"source-{target}"
        arms.append(Arm(name, TargetKind.SOURCE, action, len(index), index))
        arms.append(Arm(f"{name}/random-records", TargetKind.RECORDS, action, len(index), None,
                        control_of=name, exclude=index))
        other, why = similar_source(target, sizes, size_tolerance=size_tolerance)
        if other is not None:
            other_index = tuple(i for i, s in enumerate(sources) if s == other)
            arms.append(Arm(f"{name}/similar-source-{other}", TargetKind.SOURCE, action,
                            len(other_index), other_index, control_of=name))
        notes.append(why)
    return arms, notes


@dataclass(frozen=True)
class BudgetPlan:
    """How many runs a design needs, how many fit the budget, and what to cut if not."""

    runs_needed: int
    seconds_per_run: float
    seconds_needed: float
    budget_seconds: float
    runs_fitting: int
    fits: bool
    max_seeds: int  # the most seeds per arm that fit, with every arm kept
    advice: str


def plan_budget(n_arms: int, n_seeds: int, *, seconds_per_run: float,
                budget_seconds: float, reusable_runs: int = 0) -> BudgetPlan:
    """Whether ``n_arms x n_seeds`` training runs fit ``budget_seconds``.

    ``seconds_per_run`` is an estimate (e.g. the timed training of the model under test,
    scaled to the data each arm keeps); ``reusable_runs`` finished runs cost nothing.
    """
    for value, name in ((n_arms, "n_arms"), (n_seeds, "n_seeds")):
        if value < 1:
            raise ConfigError(f"{name} = {value} must be at least 1")
    if not seconds_per_run > 0 or not budget_seconds > 0:
        raise ConfigError(
            f"seconds_per_run ({seconds_per_run}) and budget_seconds ({budget_seconds}) must "
            "be positive; time one training run to estimate the first"
        )
    needed = max(n_arms * n_seeds - reusable_runs, 0)
    fitting = int(budget_seconds // seconds_per_run)
    max_seeds = (fitting + reusable_runs) // n_arms
    fits = needed <= fitting
    if fits:
        advice = f"{needed} runs of about {seconds_per_run:.0f} s fit the budget"
    elif max_seeds >= 2:
        advice = (f"only {fitting} of {needed} runs fit: use {max_seeds} seeds per arm, drop "
                  "arms, or raise the budget")
    else:
        advice = (f"only {fitting} of {needed} runs fit, fewer than 2 seeds per arm: drop "
                  "arms, use a smaller proxy model, or raise the budget")
    return BudgetPlan(needed, seconds_per_run, needed * seconds_per_run, budget_seconds,
                      fitting, fits, max_seeds, advice)
