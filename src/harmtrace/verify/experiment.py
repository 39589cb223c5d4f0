"""Retrain without chosen records and re-measure: the causal check of an attribution.

A *condition* names a set of train records to remove: the full data (nothing removed),
the top-k records of an attribution method, or k records drawn at random (a fresh draw for
each seed). Every condition is trained with the same seeds; the tokenizer is kept fixed so
that only the model's training data changes. Each finished run is saved as its own JSON
file, so an interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from harmtrace._logging import get_logger
from harmtrace.behaviours.measure import measure_behaviour
from harmtrace.behaviours.spec import BehaviourSpec
from harmtrace.models.lm import LMSettings, mean_token_nll, train_lm
from harmtrace.verify.design import random_control
from harmtrace.workspace import atomic_write_json

__all__ = ["Condition", "RunResult", "run_condition"]

log = get_logger(__name__)


@dataclass(frozen=True)
class Condition:
    """``removed`` holds train indices, or ``None`` for a fresh random draw of ``k``
    (outside ``exclude`` when given, see :func:`harmtrace.verify.design.random_control`)."""

    name: str
    removed: tuple[int, ...] | None
    k: int
    exclude: tuple[int, ...] = ()


@dataclass(frozen=True)
class RunResult:
    condition: str
    seed: int
    harm_rate: float
    perplexity: float
    n_removed: int
    n_train: int


def random_removal(n_train: int, k: int, seed: int) -> tuple[int, ...]:
    """``k`` indices drawn without replacement; the draw depends on ``seed`` only."""
    rng = np.random.default_rng(10_000 + seed)
    return tuple(sorted(rng.choice(n_train, size=k, replace=False).tolist()))


def run_condition(
    condition: Condition,
    seed: int,
    *,
    sequences: Sequence[Sequence[int]],
    heldout: Sequence[Sequence[int]],
    tokenizer,
    lm: LMSettings,
    behaviour: BehaviourSpec,
    runs_dir: Path,
) -> RunResult:
    """Train, generate and measure one (condition, seed); reuse a finished run."""
    path = runs_dir / f"{condition.name.replace('/', '--')}-seed{seed}.json"
    if path.exists():
        log.info("reusing finished run %s", path.name)
        return RunResult(**json.loads(path.read_text(encoding="utf-8")))
    removed = condition.removed
    if removed is None and condition.exclude:
        removed = random_control(len(sequences), condition.k, seed, condition.exclude)
    elif removed is None:
        removed = random_removal(len(sequences), condition.k, seed)
    drop = set(removed)
    kept = [s for i, s in enumerate(sequences) if i not in drop]
    model = train_lm(kept, tokenizer, lm, seed=seed).model
    _, harm = measure_behaviour(model, tokenizer, behaviour)
    nll = mean_token_nll(model, heldout, tokenizer.pad_token_id)
    result = RunResult(condition=condition.name, seed=seed, harm_rate=harm["harm_rate"],
                       perplexity=float(np.exp(nll)), n_removed=len(drop),
                       n_train=len(kept))
    atomic_write_json(path, asdict(result))
    return result
