"""Statistics of evaluation grids: seeds x problems matrices of per-problem mean correctness, [S, P]. Bootstrap
intervals over seeds and problems."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# How often a nominal 95% bootstrap interval of avg@k covers the population accuracy when 3 seeds differ by a seed
# effect with a standard deviation of 10 points (60 problems, 4 samples each): the report quotes it, and
# tests/test_stats.py measures it. Three seeds are few to resample, so the seed part of the interval is narrow.
SEED_EFFECT_COVERAGE = 0.83


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
    evaluate) is skipped."""
    rng = np.random.default_rng(seed)
    first = matrices[0]
    seeds = rng.integers(first.shape[0], size=(samples, first.shape[0]))
    problems = rng.integers(first.shape[1], size=(samples, first.shape[1]))

    def statistic(m: np.ndarray) -> np.ndarray:
        return np.nanmean(m[seeds[:, :, None], problems[:, None, :]], axis=(1, 2))

    values = statistic(first) - (statistic(matrices[1]) if len(matrices) > 1 else 0)
    point = np.nanmean(first) - (np.nanmean(matrices[1]) if len(matrices) > 1 else 0)
    tail = (1 - confidence) / 2
    return Interval(float(point), *map(float, np.quantile(values, [tail, 1 - tail])))
