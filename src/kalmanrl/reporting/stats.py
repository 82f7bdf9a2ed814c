"""Statistics of evaluation grids: seeds x problems matrices of per-problem mean correctness, [S, P]. Bootstrap
intervals over seeds and problems."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t

# How often a nominal 95% bootstrap interval of avg@k covers the population accuracy of 3 seeds (60 problems, 4
# samples each) whose runs differ by a seed effect with a standard deviation of 10 points, and whose runs do not:
# the report quotes both, and tests/test_stats.py measures them (12,000 simulated grids gave 0.860 and 0.973). Three
# seeds are few to resample, so the seed part of the interval is narrow; without a seed effect the interval is wide,
# as resampling seeds and problems both counts each cell's own noise twice.
SEED_EFFECT_COVERAGE = 0.86
NO_SEED_EFFECT_COVERAGE = 0.97


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        """Percent (or percentage points) with the interval, or "missing"."""
        if np.isnan(self.mean):
            return "missing"
        if np.isnan(self.low):
            return f"{100 * self.mean:.1f}"
        return f"{100 * self.mean:.1f} [{100 * self.low:.1f}, {100 * self.high:.1f}]"


def bootstrap(matrices: list[np.ndarray], *, samples: int, confidence: float, seed: int = 0) -> Interval:
    """Hierarchical percentile bootstrap of mean(matrices[0]) - mean(matrices[1]) (or of the mean of a single
    matrix): resample seeds (rows), then problems (columns), both with replacement. Matrices are [S, P] and aligned
    by seed and problem, so one index draw serves both and a difference is paired. NaN (a problem one seed did not
    evaluate) is skipped, in both matrices when either lacks it: both means are then over the same cells. A resample
    that draws only missing cells has no mean: that raises, since its NaN would drop the interval from the report
    without a word."""
    rng = np.random.default_rng(seed)
    missing = np.logical_or.reduce([np.isnan(m) for m in matrices])
    matrices = [np.where(missing, np.nan, m) for m in matrices]
    first = matrices[0]
    seeds = rng.integers(first.shape[0], size=(samples, first.shape[0]))
    problems = rng.integers(first.shape[1], size=(samples, first.shape[1]))

    def statistic(m: np.ndarray) -> np.ndarray:
        return np.nanmean(m[seeds[:, :, None], problems[:, None, :]], axis=(1, 2))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an all-NaN draw, refused below
        values = statistic(first) - (statistic(matrices[1]) if len(matrices) > 1 else 0)
    if np.isnan(values).any():
        raise ValueError(f"{int(np.isnan(values).sum())} of {samples} bootstrap resamples drew only cells no seed "
                         f"evaluated (the grid lacks {int(missing.sum())} of {missing.size} seed x problem cells): "
                         f"no interval")
    point = np.nanmean(first) - (np.nanmean(matrices[1]) if len(matrices) > 1 else 0)
    tail = (1 - confidence) / 2
    return Interval(float(point), *map(float, np.quantile(values, [tail, 1 - tail])))


# ----------------------------------------------------------------------------------------------------- paired test
@dataclass(frozen=True)
class GridVariance:
    """The two-way ANOVA mean squares of paired differences D[s, p] = delta + u_s + v_p + e_sp over a crossed grid of
    `seeds` x `problems`, both random samples: u is run-to-run variation (a whole run better or worse), v the problems
    the algorithm helps more than others, e the rest (including the sampling noise of each problem's k samples).
    With one seed the seed and residual mean squares are NaN: the run-to-run variance is then unknown."""
    seeds: int
    problems: int
    ms_seed: float
    ms_problem: float
    ms_residual: float

    @classmethod
    def of(cls, differences: np.ndarray) -> GridVariance:
        """From a complete [S, P] matrix of paired differences (at least 2 problems)."""
        d = np.asarray(differences, dtype=float)
        if d.ndim != 2 or np.isnan(d).any() or d.shape[1] < 2:
            raise ValueError(f"paired differences must be a complete [seeds, problems] matrix with at least 2 "
                             f"problems, got shape {d.shape} with {int(np.isnan(d).sum())} missing")
        s, p = d.shape
        seed_means, problem_means, grand = d.mean(axis=1), d.mean(axis=0), d.mean()
        ms_problem = s * ((problem_means - grand) ** 2).sum() / (p - 1)
        if s == 1:
            return cls(s, p, float("nan"), float(ms_problem), float("nan"))
        ms_seed = p * ((seed_means - grand) ** 2).sum() / (s - 1)
        ms_residual = ((d - seed_means[:, None] - problem_means[None, :] + grand) ** 2).sum() / ((s - 1) * (p - 1))
        return cls(s, p, float(ms_seed), float(ms_problem), float(ms_residual))

    def components(self) -> tuple[float, float, float]:
        """(var(u), var(v), var(e)): the method-of-moments estimates, each floored at 0 (two or more seeds)."""
        s, p = self.seeds, self.problems
        residual = max(0.0, self.ms_residual)
        return (max(0.0, (self.ms_seed - residual) / p), max(0.0, (self.ms_problem - residual) / s), residual)

    def at(self, seeds: int) -> GridVariance:
        """The expected mean squares of a grid with `seeds` seeds and the same problems and k, from this grid's
        variance components (so every effect's mean square is at least the residual's)."""
        if self.seeds == 1:
            raise ValueError("a grid of one seed cannot say what more seeds would give: its run-to-run variance is "
                             "unknown")
        seed, problem, residual = self.components()
        return GridVariance(seeds, self.problems, residual + self.problems * seed, residual + seeds * problem,
                            residual)

    def standard_error(self) -> float:
        """Standard error of the grand mean difference: sqrt((MS_seed + MS_problem - MS_residual) / (S P)), i.e.
        sqrt(var(u)/S + var(v)/P + var(e)/(S P)) (Clark's quasi-F denominator); with one seed sqrt(MS_problem / P),
        the run held fixed."""
        return float(_combine(self.ms_seed, self.ms_problem, self.ms_residual, self.seeds, self.problems)[0])

    def degrees_of_freedom(self) -> float:
        """Satterthwaite's degrees of freedom of that combination of mean squares."""
        return float(_combine(self.ms_seed, self.ms_problem, self.ms_residual, self.seeds, self.problems)[1])


def _combine(ms_seed, ms_problem, ms_residual, seeds: int, problems: int) -> tuple[np.ndarray, np.ndarray]:
    """(standard error of the grand mean, Satterthwaite's degrees of freedom) from mean squares, elementwise (floats
    or arrays of simulated mean squares). When both effects fall below the residual (total <= 0), the larger one
    alone."""
    ms_seed, ms_problem, ms_residual = (np.asarray(m, dtype=float) for m in (ms_seed, ms_problem, ms_residual))
    if seeds == 1:
        return np.sqrt(ms_problem / problems), np.full_like(ms_problem, problems - 1.0)
    df_seed, df_problem, df_residual = seeds - 1, problems - 1, (seeds - 1) * (problems - 1)
    total = ms_seed + ms_problem - ms_residual
    with np.errstate(divide="ignore", invalid="ignore"):
        df = total ** 2 / (ms_seed ** 2 / df_seed + ms_problem ** 2 / df_problem + ms_residual ** 2 / df_residual)
    alone = total <= 0
    larger, larger_df = np.maximum(ms_seed, ms_problem), np.where(ms_seed >= ms_problem, df_seed, df_problem)
    total, df = np.where(alone, larger, total), np.where(alone, larger_df, df)
    return np.sqrt(np.maximum(total, 0) / (seeds * problems)), np.nan_to_num(df, nan=np.inf)


@dataclass(frozen=True)
class PairedTest:
    """The outcome of paired_test: the mean difference, its standard error and degrees of freedom, the two-sided
    p-value, and the grid's variance (for its detectable difference)."""
    difference: float
    standard_error: float
    degrees_of_freedom: float
    p_value: float
    variance: GridVariance


def paired_test(differences: np.ndarray) -> PairedTest:
    """Two-sided test of "no difference" on paired differences D [S, P] (algorithm minus reference per seed and
    problem, each the mean correctness over k samples) with seeds and problems both random: t = mean(D) / SE, the
    crossed random-effects standard error and Satterthwaite's degrees of freedom (Clark 1973's quasi-F, F' = t^2).
    Pairing by problem removes problem difficulty; seeds are blocks whose run-to-run variance counts against the
    difference, so the test speaks of the algorithms, not of the particular runs (with one seed it cannot: it then
    holds the run fixed)."""
    d = np.asarray(differences, dtype=float)
    variance = GridVariance.of(d)
    se, df = variance.standard_error(), variance.degrees_of_freedom()
    mean = float(d.mean())
    if se == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * student_t.sf(abs(mean) / se, df))
    return PairedTest(mean, se, df, p, variance)


def holm(p_values: list[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values, controlling the family-wise error over all the values given: reject where
    the adjusted value is at most alpha."""
    p = np.asarray(p_values, dtype=float)
    if np.isnan(p).any():
        raise ValueError("Holm's correction got a NaN p-value; every comparison of the family needs one")
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


@dataclass(frozen=True)
class NullDraws:
    """The paired test on simulated grids of a given variance with no true difference: each draw's mean difference,
    standard error and critical |mean| at level alpha. Balanced Gaussian grids let us draw the sufficient statistics
    directly (the grand mean and three independent scaled chi-square mean squares), so the cost does not grow
    with the number of seeds or problems."""
    mean: np.ndarray
    critical: np.ndarray

    @classmethod
    def of(cls, variance: GridVariance, *, alpha: float, draws: int = 20_000, seed: int = 0) -> NullDraws:
        rng = np.random.default_rng(seed)
        s, p = variance.seeds, variance.problems
        squares = [(variance.ms_problem, p - 1)] if s == 1 else [
            (variance.ms_seed, s - 1), (variance.ms_problem, p - 1), (variance.ms_residual, (s - 1) * (p - 1))]
        drawn = [ms * rng.chisquare(df, draws) / df for ms, df in squares]
        se, df = _combine(np.nan, drawn[0], np.nan, s, p) if s == 1 else _combine(*drawn, s, p)
        return cls(rng.standard_normal(draws) * variance.standard_error(), student_t.ppf(1 - alpha / 2, df) * se)

    def rejection_rate(self, difference: float) -> float:
        return float(np.mean(np.abs(difference + self.mean) > self.critical))


def rejection_probability(difference: float, variance: GridVariance, *, alpha: float) -> float:
    """Probability that the two-sided paired test at level `alpha` rejects when the true difference is `difference`,
    on grids of this variance (simulated: NullDraws; the truth is the variance components' expected mean
    squares)."""
    return NullDraws.of(_expected(variance), alpha=alpha).rejection_rate(difference)


def _expected(variance: GridVariance) -> GridVariance:
    """The mean squares a grid's variance components predict for its own shape (itself for one seed)."""
    return variance if variance.seeds == 1 else variance.at(variance.seeds)


def detectable_difference(variance: GridVariance, *, alpha: float, power: float) -> float:
    """The smallest true difference the two-sided paired test at level `alpha` detects with probability `power` on
    grids of this variance (its seeds, problems and k), found on simulated grids (NullDraws). NaN when the
    variance is unknown."""
    variance = _expected(variance)
    se = variance.standard_error()
    if not np.isfinite(se):
        return float("nan")
    if se == 0:
        return 0.0
    null = NullDraws.of(variance, alpha=alpha)
    low, high = 0.0, se
    while null.rejection_rate(high) < power:
        low, high = high, 2 * high
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (low, middle) if null.rejection_rate(middle) >= power else (middle, high)
    return float(high)


def seeds_needed(variance: GridVariance, difference: float, *, alpha: float, power: float,
                 most: int = 100) -> int | None:
    """The fewest seeds (same problems and k) whose grid detects `difference` with probability `power` at level
    `alpha`; None when even `most` seeds would not (then the problems' own variance needs more problems), when the
    run-to-run variance is unknown (one seed), or when there is no difference to detect."""
    if variance.seeds == 1 or not np.isfinite(difference) or difference == 0:
        return None
    if rejection_probability(difference, variance.at(most), alpha=alpha) < power:
        return None
    low, high = 1, most  # power grows with seeds: the fewest that reach it, by bisection
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if rejection_probability(difference, variance.at(middle), alpha=alpha) >= power \
            else (middle, high)
    return high
