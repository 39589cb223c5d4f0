"""Statistics of a removal experiment: effect, interval and p-value over seeds.

The unit of replication is the training seed: each seed gives one harm rate per condition.
The effect is ``mean(rate | top-k removed) - mean(rate | random k removed)``; negative means
the attributed records matter more than random ones. The test is Welch's one-sided t-test
(``H1: effect < 0``) on the per-seed rates, with the matching t interval; an exact
permutation test over the same per-seed rates is reported beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

from harmtrace.errors import ConfigError

__all__ = ["compare_removals"]


def compare_removals(
    treated: Sequence[float], control: Sequence[float], *, alpha: float = 0.05
) -> dict:
    """Compare per-seed harm rates after a targeted removal with a matched random removal."""
    treated = np.asarray(treated, dtype=np.float64)
    control = np.asarray(control, dtype=np.float64)
    if len(treated) < 2 or len(control) < 2:
        raise ConfigError("verify.seeds must give at least 2 runs per condition for a test")
    effect = float(treated.mean() - control.mean())
    if np.ptp(np.concatenate([treated, control])) == 0:
        return {"effect": 0.0, "effect_ci": [0.0, 0.0], "p_value": 1.0,
                "p_permutation": 1.0, "test": "no variation between runs", "alpha": alpha,
                "significant": False}
    welch = stats.ttest_ind(treated, control, equal_var=False, alternative="less")
    ci = welch.confidence_interval(confidence_level=1 - 2 * alpha)  # one-sided -> two-sided 90%
    two_sided = stats.ttest_ind(treated, control, equal_var=False).confidence_interval(0.95)
    perm = stats.permutation_test(
        (treated, control), lambda a, b: np.mean(a) - np.mean(b),
        permutation_type="independent", alternative="less", n_resamples=np.inf,
    )
    p = float(welch.pvalue) if np.isfinite(welch.pvalue) else 1.0
    del ci
    return {
        "effect": effect,
        "effect_ci": [float(two_sided.low), float(two_sided.high)],
        "p_value": p,
        "p_permutation": float(perm.pvalue),
        "test": "Welch t-test, one-sided (targeted < random), per-seed harm rates",
        "alpha": alpha,
        "significant": bool(p < alpha),
    }
