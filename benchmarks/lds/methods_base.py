"""The small value types shared by the harmtrace and the peer adapters."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from benchmarks.lds.tasks import BenchTask

__all__ = ["Clock", "Method"]


@dataclass
class Clock:
    """Wall-clock seconds spent in ``fit()`` and in ``score()`` blocks, and free notes."""

    fit_s: float = 0.0
    score_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @contextmanager
    def fit(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.fit_s += time.perf_counter() - start

    @contextmanager
    def score(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.score_s += time.perf_counter() - start


@dataclass(frozen=True)
class Method:
    """``run(task, model, clock) -> (n_query, n_train)``; ``tasks`` it applies to;
    ``approximate`` is False for the exact mode only."""

    library: str
    run: Callable[[BenchTask, torch.nn.Module, Clock], np.ndarray]
    tasks: tuple[str, ...]
    description: str
    approximate: bool = True
    slow: bool = False  # skipped by --quick unless named in --methods/--peers
