"""Statistics of causal verification: effects, intervals, p-values and power over seeds.

The unit of replication is the training seed: each (condition, seed) run gives one value of
a metric (a harm rate, a held-out perplexity). Every function here takes the per-seed values
of two groups as 1-D arrays, ``treated`` of shape ``(n_treated,)`` and ``control`` of shape
``(n_control,)``, and every effect is signed the same way::

    effect = mean(treated) - mean(control)     # negative: the intervention lowered the metric

The default ``alternative="less"`` tests ``H1: effect < 0`` (removing the attributed records
lowers harm more than removing random ones). A result is *significant* when its p-value, or
its adjusted p-value after :func:`adjust`, is strictly below ``alpha``.

Power is computed for Student's two-sample t-test with the noncentral t distribution. With
the per-seed sd estimated from pilot or observed runs, the reported power is *the power the
design had*: for the observed effect (a restatement of the p-value, not new evidence) and,
more usefully, for a stated target effect. Before any run, :func:`binomial_sd` gives the
smallest per-seed sd a harm rate from ``n`` generations can have, for planning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import optimize, stats

from harmtrace.errors import ConfigError, InputDataError

__all__ = [
    "BootstrapCI",
    "Comparison",
    "PermutationResult",
    "adjust",
    "binomial_sd",
    "bootstrap_ci",
    "compare",
    "compare_removals",
    "correct",
    "decisions",
    "min_attainable_p",
    "minimum_detectable_effect",
    "permutation_test",
    "power_two_sample",
]

ALTERNATIVES = ("less", "greater", "two-sided")
ADJUSTMENTS = ("holm", "bh")
CI_METHODS = ("BCa", "percentile")
MAX_EXACT_RELABELINGS = 100_000
_FEW_SEEDS = 5  # below this many per group, bootstrap intervals are visibly too narrow


def _mean_diff(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def _median_diff(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.median(a, axis=axis) - np.median(b, axis=axis)


_STATISTICS = {"mean_diff": _mean_diff, "median_diff": _median_diff}


# --- validation, in one place ---------------------------------------------------------------

def _values(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per-seed values of one group as a float64 array of shape ``(n,)``, n >= 2, finite."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise InputDataError(f"{name} must be a 1-D sequence of per-seed values; got an array "
                             f"of shape {arr.shape}. Pass one value per seed.")
    if len(arr) < 2:
        raise ConfigError(f"{name} has {len(arr)} value(s); a comparison needs at least 2 "
                          "seeds per condition. Add seeds (verify.seeds) and rerun.")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise InputDataError(f"{name} holds non-finite values at positions {bad.tolist()} "
                             f"(e.g. {arr[bad[0]]}); drop or rerun the failed seeds first.")
    return arr


def _choice(name: str, value: str, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not supported; use one of {list(allowed)}.")
    return value


def _fraction(name: str, value: float) -> float:
    if not (isinstance(value, int | float) and 0.0 < value < 1.0):
        raise ConfigError(f"{name}={value!r} must be a number strictly between 0 and 1 "
                          f"(e.g. {name}=0.05).")
    return float(value)


def _group_sizes(n_per_group: int | tuple[int, int]) -> tuple[int, int]:
    sizes = n_per_group if isinstance(n_per_group, tuple) else (n_per_group, n_per_group)
    if len(sizes) != 2 or any(not isinstance(n, int | np.integer) or n < 2 for n in sizes):
        raise ConfigError(f"n_per_group={n_per_group!r} must be an int >= 2 or a pair "
                          "(n_treated, n_control) of ints >= 2.")
    return int(sizes[0]), int(sizes[1])


# --- interval and tests ---------------------------------------------------------------------

@dataclass(frozen=True)
class BootstrapCI:
    """Interval ``[low, high]`` for ``statistic(treated, control)``; ``method`` is the one used."""

    low: float
    high: float
    confidence: float
    method: str
    n_resamples: int
    note: str = ""


def bootstrap_ci(
    treated: Sequence[float],
    control: Sequence[float],
    *,
    statistic: str = "mean_diff",
    confidence: float = 0.95,
    method: str = "BCa",
    n_resamples: int = 9999,
    seed: int = 0,
) -> BootstrapCI:
    """Bootstrap interval of ``mean(treated) - mean(control)``, resampling each group alone.

    ``statistic`` is ``"mean_diff"`` (default) or ``"median_diff"``; ``method`` is ``"BCa"``
    (default) or ``"percentile"``. BCa is undefined for degenerate data (e.g. every resample
    gives the same value); then the percentile interval is returned and ``note`` says so.
    With fewer than 5 seeds per group every bootstrap interval is too narrow, as resampling
    2-4 values can only show a handful of distinct means; ``note`` says that too.
    """
    t, c = _values("treated", treated), _values("control", control)
    func = _STATISTICS[_choice("statistic", statistic, _STATISTICS)]
    confidence = _fraction("confidence", confidence)
    method = _choice("method", method, CI_METHODS)
    notes = []
    if min(len(t), len(c)) < _FEW_SEEDS:
        notes.append(f"only {min(len(t), len(c))} seeds in a group: the interval is too "
                     "narrow; prefer the Welch t interval or add seeds")

    low, high = _bootstrap(t, c, func, confidence, method, n_resamples, seed)
    if method == "BCa" and not (np.isfinite(low) and np.isfinite(high)):
        notes.append("BCa undefined for these data (degenerate resamples); used percentile")
        method = "percentile"
        low, high = _bootstrap(t, c, func, confidence, method, n_resamples, seed)
    return BootstrapCI(low, high, confidence, method, n_resamples, "; ".join(notes))


def _bootstrap(t, c, func, confidence, method, n_resamples, seed) -> tuple[float, float]:
    with warnings.catch_warnings():
        # scipy warns, then returns NaN, when BCa is undefined; the caller falls back.
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.bootstrap((t, c), func, n_resamples=n_resamples, vectorized=True,
                              paired=False, confidence_level=confidence, method=method,
                              rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


@dataclass(frozen=True)
class PermutationResult:
    """p-value of the difference in means; ``exact`` when every relabeling was enumerated."""

    p_value: float
    exact: bool
    n_relabelings: int
    n_resamples: int


def permutation_test(
    treated: Sequence[float],
    control: Sequence[float],
    *,
    alternative: str = "less",
    n_resamples: int = 9999,
    seed: int = 0,
) -> PermutationResult:
    """Permutation test of ``mean(treated) - mean(control)`` over relabelings of the seeds.

    Exact (all ``C(n_treated + n_control, n_treated)`` relabelings) when there are at most
    100,000 of them, else ``n_resamples`` random relabelings drawn with ``seed``.
    ``alternative="less"`` tests ``H1: effect < 0``.
    """
    t, c = _values("treated", treated), _values("control", control)
    alternative = _choice("alternative", alternative, ALTERNATIVES)
    n_relabelings = math.comb(len(t) + len(c), len(t))
    exact = n_relabelings <= MAX_EXACT_RELABELINGS

    res = stats.permutation_test(
        (t, c), _mean_diff, permutation_type="independent", vectorized=True,
        n_resamples=np.inf if exact else n_resamples, alternative=alternative,
        rng=np.random.default_rng(seed),
    )
    used = n_relabelings if exact else n_resamples
    return PermutationResult(float(res.pvalue), exact, n_relabelings, used)


def min_attainable_p(n_treated: int, n_control: int, alternative: str = "less") -> float:
    """Smallest exact permutation p-value a design with these group sizes can give.

    One-sided it is ``1 / C(n_treated + n_control, n_treated)``: 1/20 = 0.05 for 3 vs 3
    seeds, so such a design can never be significant at ``alpha=0.05``. Ties only raise it.
    """
    _group_sizes((n_treated, n_control))
    alternative = _choice("alternative", alternative, ALTERNATIVES)
    p = 1.0 / math.comb(n_treated + n_control, n_treated)
    return min(1.0, 2 * p) if alternative == "two-sided" else p


def _welch_p(t: np.ndarray, c: np.ndarray, alternative: str) -> float | None:
    """Welch's t-test p-value; ``None`` when both groups have zero variance."""
    if np.var(t) == 0 and np.var(c) == 0:
        return None
    return float(stats.ttest_ind(t, c, equal_var=False, alternative=alternative).pvalue)


def _pooled_sd(t: np.ndarray, c: np.ndarray) -> float:
    dof = len(t) + len(c) - 2
    return math.sqrt(((len(t) - 1) * t.var(ddof=1) + (len(c) - 1) * c.var(ddof=1)) / dof)


# --- one comparison -------------------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    """Treated against control on one metric; ``effect = mean(treated) - mean(control)``.

    ``p_value`` is the permutation test's (``exact`` says whether enumerated), ``p_welch``
    Welch's t-test's (``None`` when no seed-to-seed variation). ``sd`` is the pooled per-seed
    sd; ``power`` is the power the design had for the observed effect and ``power_target``
    for ``target_effect``; ``minimum_detectable_effect`` is the effect found with 80% power
    (signed like the alternative). These are ``None`` when ``sd`` is 0. ``p_adjusted`` and
    ``significant`` stay ``None`` until :func:`correct` sets them over a family of tests.
    """

    metric: str
    effect: float
    ci: tuple[float, float]
    ci_method: str
    confidence: float
    p_value: float
    p_welch: float | None
    exact: bool
    n_treated: int
    n_control: int
    alternative: str
    alpha: float
    min_attainable_p: float
    sd: float
    power: float | None
    target_effect: float | None
    power_target: float | None
    minimum_detectable_effect: float | None
    p_adjusted: float | None = None
    significant: bool | None = None

    def as_dict(self) -> dict:
        """Plain, JSON-ready dict of every field; ``ci`` becomes a list."""
        out = asdict(self)
        out["ci"] = list(self.ci)
        return out


def compare(
    treated: Sequence[float],
    control: Sequence[float],
    *,
    alpha: float = 0.05,
    alternative: str = "less",
    metric: str = "harm_rate",
    confidence: float = 0.95,
    target_effect: float | None = None,
    seed: int = 0,
) -> Comparison:
    """Effect, bootstrap interval, permutation and Welch p-values, and power, for one metric.

    ``treated`` and ``control`` hold one value per seed. Significance is left unset: call
    :func:`correct` on every comparison of the family so that it is decided after correction.
    """
    t, c = _values("treated", treated), _values("control", control)
    alpha = _fraction("alpha", alpha)
    alternative = _choice("alternative", alternative, ALTERNATIVES)
    ci = bootstrap_ci(t, c, confidence=confidence, seed=seed)
    perm = permutation_test(t, c, alternative=alternative, seed=seed)
    effect, sd, sizes = float(_mean_diff(t, c)), _pooled_sd(t, c), (len(t), len(c))

    def power_at(delta: float | None) -> float | None:
        if sd == 0 or delta is None:
            return None
        return power_two_sample(delta, sd, sizes, alpha=alpha, alternative=alternative)

    mde = minimum_detectable_effect(sd, sizes, alpha=alpha, alternative=alternative) \
        if sd > 0 else None
    return Comparison(
        metric=metric, effect=effect, ci=(ci.low, ci.high), ci_method=ci.method,
        confidence=ci.confidence, p_value=perm.p_value, p_welch=_welch_p(t, c, alternative),
        exact=perm.exact, n_treated=len(t), n_control=len(c), alternative=alternative,
        alpha=alpha, min_attainable_p=min_attainable_p(*sizes, alternative), sd=sd,
        power=power_at(effect), target_effect=target_effect,
        power_target=power_at(target_effect), minimum_detectable_effect=mde,
    )


# --- multiple testing -----------------------------------------------------------------------

def _p_values(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise InputDataError(f"p_values must be a non-empty 1-D sequence; got shape {p.shape}.")
    if not np.all(np.isfinite(p) & (p >= 0) & (p <= 1)):
        raise InputDataError(f"p_values must all lie in [0, 1]; got {p.tolist()}. Check for "
                             "NaN from tests that could not run and leave them out.")
    return p


def adjust(p_values: Sequence[float] | np.ndarray, method: str = "holm") -> np.ndarray:
    """Adjusted p-values, shape ``(m,)`` in input order, in [0, 1] and never below the raw.

    ``"holm"`` controls the family-wise error rate (Holm 1979, step-down Bonferroni);
    ``"bh"`` controls the false discovery rate (Benjamini & Hochberg 1995).
    """
    p = _p_values(p_values)
    method = _choice("method", method, ADJUSTMENTS)
    if method == "bh":
        return np.clip(stats.false_discovery_control(p, method="bh"), 0.0, 1.0)

    order = np.argsort(p, kind="stable")
    m = len(p)
    # The i-th smallest p (0-based) is multiplied by m - i; a running max keeps the
    # adjusted values in the same order as the raw ones, as the step-down procedure stops.
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def decisions(
    p_values: Sequence[float] | np.ndarray, alpha: float = 0.05, method: str = "holm"
) -> np.ndarray:
    """Boolean array, shape ``(m,)`` in input order: True where the adjusted p < ``alpha``."""
    alpha = _fraction("alpha", alpha)
    return adjust(p_values, method) < alpha


def correct(comparisons: Sequence[Comparison], *, method: str = "holm") -> list[Comparison]:
    """Copies of ``comparisons`` with ``p_adjusted`` and ``significant`` set over the family.

    All comparisons must share one ``alpha``; their permutation ``p_value`` is adjusted.
    """
    alphas = {cmp.alpha for cmp in comparisons}
    if len(alphas) > 1:
        raise ConfigError(f"comparisons use different alpha values {sorted(alphas)}; "
                          "correct each family with one alpha.")
    adjusted = adjust([cmp.p_value for cmp in comparisons], method)
    return [replace(cmp, p_adjusted=float(p), significant=bool(p < cmp.alpha))
            for cmp, p in zip(comparisons, adjusted, strict=True)]


# --- power and planning ---------------------------------------------------------------------

def power_two_sample(
    effect: float,
    sd: float,
    n_per_group: int | tuple[int, int],
    alpha: float = 0.05,
    alternative: str = "less",
) -> float:
    """Power of the two-sample t-test at a true ``effect = mean(treated) - mean(control)``.

    ``sd`` is the per-seed standard deviation within a group (assumed equal in both);
    ``n_per_group`` an int or a pair ``(n_treated, n_control)``. Uses the noncentral t with
    ``n_treated + n_control - 2`` degrees of freedom; Welch's test has slightly less power.
    The sign matters: with ``alternative="less"`` a positive effect has power below alpha.
    """
    n1, n2 = _group_sizes(n_per_group)
    alpha = _fraction("alpha", alpha)
    alternative = _choice("alternative", alternative, ALTERNATIVES)
    if not (np.isfinite(sd) and sd > 0) or not np.isfinite(effect):
        raise ConfigError(f"power needs a finite effect and sd > 0; got effect={effect!r}, "
                          f"sd={sd!r}. Estimate sd from pilot seeds or binomial_sd().")

    df = n1 + n2 - 2
    nc = effect / (sd * math.sqrt(1 / n1 + 1 / n2))
    if alternative == "less":
        return float(stats.nct.cdf(stats.t.ppf(alpha, df), df, nc))
    if alternative == "greater":
        return float(stats.nct.sf(stats.t.ppf(1 - alpha, df), df, nc))
    crit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.cdf(-crit, df, nc) + stats.nct.sf(crit, df, nc))


def minimum_detectable_effect(
    sd: float,
    n_per_group: int | tuple[int, int],
    alpha: float = 0.05,
    power: float = 0.8,
    alternative: str = "less",
) -> float:
    """Smallest true effect found with probability ``power``, signed like ``alternative``.

    Negative for ``"less"`` and positive otherwise, so that
    ``power_two_sample(minimum_detectable_effect(...), ...) == power``.
    """
    alpha, power = _fraction("alpha", alpha), _fraction("power", power)
    if power <= alpha:
        raise ConfigError(f"power={power} must exceed alpha={alpha}: a test has power alpha "
                          "at zero effect.")
    sign = -1.0 if alternative == "less" else 1.0

    def gap(size: float) -> float:
        return power_two_sample(sign * size, sd, n_per_group, alpha, alternative) - power

    high = sd  # power rises with the effect's size; widen until the target is passed
    while gap(high) < 0:
        high *= 2
    return sign * optimize.brentq(gap, 0.0, high, xtol=1e-10 * sd)


def binomial_sd(rate: float, n_generations: int) -> float:
    """Sampling sd of a harm rate measured on ``n_generations`` generations.

    ``sqrt(rate * (1 - rate) / n)``. This is a lower bound on the per-seed sd: training
    seeds add their own variation, so use it to plan before any run, and pilot seeds after.
    """
    if not (isinstance(rate, int | float) and 0.0 <= rate <= 1.0):
        raise ConfigError(f"rate={rate!r} must be a harm rate in [0, 1].")
    if not isinstance(n_generations, int) or n_generations < 1:
        raise ConfigError(f"n_generations={n_generations!r} must be a positive int.")
    return math.sqrt(rate * (1.0 - rate) / n_generations)


# --- the pipeline's summary -----------------------------------------------------------------

def compare_removals(
    treated: Sequence[float], control: Sequence[float], *, alpha: float = 0.05
) -> dict:
    """Per-seed harm rates after a targeted removal against a matched random removal.

    The test is Welch's one-sided t-test (``H1: effect < 0``) with its two-sided 95% t
    interval; the permutation p-value over the same rates is reported beside it.
    """
    t, c = _values("treated", treated), _values("control", control)
    alpha = _fraction("alpha", alpha)
    effect = float(_mean_diff(t, c))
    if np.ptp(np.concatenate([t, c])) == 0:
        return {"effect": 0.0, "effect_ci": [0.0, 0.0], "p_value": 1.0,
                "p_permutation": 1.0, "test": "no variation between runs", "alpha": alpha,
                "significant": False}

    p = _welch_p(t, c, "less")
    p = p if p is not None and np.isfinite(p) else 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero variance in both groups
        interval = stats.ttest_ind(t, c, equal_var=False).confidence_interval(0.95)
    return {
        "effect": effect,
        "effect_ci": [float(interval.low), float(interval.high)],
        "p_value": p,
        "p_permutation": permutation_test(t, c, alternative="less").p_value,
        "test": "Welch t-test, one-sided (targeted < random), per-seed harm rates",
        "alpha": alpha,
        "significant": bool(p < alpha),
    }
