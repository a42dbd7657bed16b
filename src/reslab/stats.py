"""Statistics over seeds: the interval of a grid point's mean and the paired comparison of two schemes.

    interval([3.21, 3.25, 3.19])                      # Interval: mean, std, n, 95% Student-t bounds
    compare({0: 3.20, 1: 3.24}, {0: 3.25, 1: 3.26})   # Comparison: scheme - baseline on the seeds both have
    holm([c.p for c in comparisons])                  # step-down adjusted p-values, one family of tests

Every distribution function is scipy's own (`scipy.special`: the Student t, noncentral t and normal CDFs and their
inverses, which `scipy.stats` wraps; imported on first use, and without the seconds `scipy.stats` costs to import,
so the report is not slower for it). A lower loss is better, so a comparison whose adjusted p is below `ALPHA` and
whose difference is negative reads "better".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

LEVEL = 0.95  # of every interval
ALPHA = 0.05  # of every test, after Holm's correction over the grid
POWER = 0.8  # of the "seeds needed" estimate
FEW_SEEDS = 3  # fewer than this: the report warns that intervals are wide and tests weak
MAX_SEEDS = 10_000  # "seeds needed" beyond this reads as "not resolvable"


@dataclass(frozen=True)
class Interval:
    """The mean of `n` values with its `LEVEL` Student-t interval (bounds None when n < 2)."""

    mean: float | None
    std: float | None
    n: int
    low: float | None
    high: float | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Comparison:
    """scheme - baseline on the `n` seeds both finished: the mean difference, its interval, the paired t-test's
    p-value, the Holm-adjusted p (set by `adjust`), and the seeds a test would need to resolve the difference."""

    n: int
    diff: float | None
    low: float | None
    high: float | None
    p: float | None
    p_holm: float | None = None
    diffs: tuple[float, ...] = ()  # per seed, scheme - baseline
    paired: int = 0  # the seeds both finished (set by the caller): more than n when some have no value here

    @property
    def seeds_needed(self) -> int | None:
        return seeds_needed(self.diffs) if len(self.diffs) >= 2 else None

    @property
    def verdict(self) -> str:
        if self.paired > self.n:  # a seed without a value (not measured, not reached): no verdict from the others
            return f"only {self.n} of {self.paired} seeds measured"
        if self.n == 0 or self.diff is None:
            return "no data"
        if self.n < 2 or self.p_holm is None:
            return "too few seeds"
        if self.p_holm >= ALPHA:
            return "no difference at this n"
        return "better" if self.diff < 0 else "worse"

    def to_dict(self) -> dict:
        fields = {k: v for k, v in asdict(self).items() if k != "diffs"}
        return {**fields, "seeds_needed": self.seeds_needed, "verdict": self.verdict}


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values)


def _t_quantile(df: int, level: float) -> float:
    """The two-sided `level` quantile of Student's t with `df` degrees of freedom (scipy.special.stdtrit)."""
    from scipy.special import stdtrit

    return float(stdtrit(df, 1 - (1 - level) / 2))


def interval(values: Sequence[float | None], level: float = LEVEL) -> Interval:
    """The mean of the finite values and its Student-t interval; bounds None below two values."""
    kept = _finite(values)
    if not kept:
        return Interval(None, None, 0, None, None)
    if len(kept) < 2:
        return Interval(kept[0], 0.0, 1, None, None)
    mean, std = _mean_std(kept)
    half = _t_quantile(len(kept) - 1, level) * std / math.sqrt(len(kept))
    return Interval(mean, std, len(kept), mean - half, mean + half)


def compare(scheme: Mapping[int, float | None], baseline: Mapping[int, float | None],
            level: float = LEVEL) -> Comparison:
    """scheme - baseline, paired by seed (the same init and data order), over the seeds where both are finite: the
    paired t-test (the one-sample t-test of the differences, as scipy.stats.ttest_rel) and the interval of the mean
    difference."""
    from scipy.special import stdtr

    pairs = [(scheme[s], baseline[s]) for s in sorted(scheme.keys() & baseline.keys())]
    diffs = [float(x) - float(y) for x, y in pairs if len(_finite([x, y])) == 2]
    if len(diffs) < 2:
        return Comparison(len(diffs), diffs[0] if diffs else None, None, None, None, diffs=tuple(diffs))
    mean, std = _mean_std(diffs)
    if std == 0:  # every seed differs by exactly the same: no spread to test against
        return Comparison(len(diffs), mean, mean, mean, 1.0 if mean == 0 else 0.0, diffs=tuple(diffs))
    error = std / math.sqrt(len(diffs))
    p = float(2 * stdtr(len(diffs) - 1, -abs(mean / error)))
    half = _t_quantile(len(diffs) - 1, level) * error
    return Comparison(len(diffs), mean, mean - half, mean + half, p, diffs=tuple(diffs))


def seeds_needed(diffs: Sequence[float], alpha: float = ALPHA, power: float = POWER) -> int | None:
    """The fewest seeds at which a two-sided paired t-test at `alpha` has `power` to detect the observed mean
    difference at the observed spread (the noncentral t); None when not within MAX_SEEDS."""
    from scipy.special import ndtri

    mean, std = _mean_std(diffs)
    if std == 0:  # no spread: any n resolves it
        return len(diffs) if mean != 0 else None
    if mean == 0:
        return None
    effect = abs(mean) / std
    guess = ((ndtri(1 - alpha / 2) + ndtri(power)) / effect) ** 2  # the normal approximation
    if guess > MAX_SEEDS:
        return None
    n = max(2, math.ceil(guess))  # then step to the exact answer: one to three steps from the guess
    while _power(n, effect, alpha) < power:
        n += 1
    while n > 2 and _power(n - 1, effect, alpha) >= power:
        n -= 1
    return n


def _power(n: int, effect: float, alpha: float) -> float:
    """The power of a two-sided one-sample t-test at `alpha` with n values and this effect size (scipy.special's
    noncentral t CDF, nctdtr)."""
    from scipy.special import nctdtr

    df, shift = n - 1, effect * math.sqrt(n)
    critical = _t_quantile(df, 1 - alpha)
    return float(1 - nctdtr(df, shift, critical) + nctdtr(df, shift, -critical))


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of one family of p-values (None, an untested comparison, stays None): the k-th
    smallest of m is multiplied by m - k + 1, then made non-decreasing, capped at 1."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def adjust(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """The comparisons with their Holm-adjusted p-values, the family being all of them."""
    return [replace(c, p_holm=p) for c, p in zip(comparisons, holm([c.p for c in comparisons]))]
