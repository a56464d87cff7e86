"""The Monte Carlo threshold: percentiles and their intervals on known distributions."""

import numpy as np
import pytest

from conftest import gma


@pytest.mark.parametrize("percentile", [50.0, 90.0, 95.0, 99.0])
def test_percentile_of_uniform_sample_is_close_to_the_known_quantile(percentile):
    scores = np.random.default_rng(1).uniform(size=200_000)
    estimate, low, high = gma.percentile_interval(scores, percentile, 0.95)
    true_quantile = percentile / 100
    assert estimate == pytest.approx(true_quantile, abs=0.005)
    assert low <= estimate <= high
    assert low <= true_quantile <= high


def test_percentile_of_normal_sample_matches_the_normal_quantile():
    scores = np.random.default_rng(2).normal(loc=3.0, scale=2.0, size=100_000)
    estimate, low, high = gma.percentile_interval(scores, 95.0, 0.95)
    true_quantile = 3.0 + 2.0 * 1.6448536269514722  # 95th percentile of N(3, 2^2)
    assert estimate == pytest.approx(true_quantile, abs=0.05)
    assert low < true_quantile < high


def test_percentile_of_exact_grid_is_exact():
    # 0, 1, ..., 100: the linear-interpolation 95th percentile is exactly 95.
    estimate, low, high = gma.percentile_interval(np.arange(101.0), 95.0, 0.95)
    assert estimate == 95.0
    assert low < 95.0 < high


def test_interval_covers_the_true_quantile_at_the_stated_rate():
    rng = np.random.default_rng(3)
    true_quantile = -np.log(0.05)  # 95th percentile of Exponential(1)
    trials = 400
    covered = sum(
        low <= true_quantile <= high
        for low, high in (gma.percentile_interval(rng.exponential(size=2000), 95.0, 0.95)[1:]
                          for _ in range(trials)))
    # Binomial(400, >= 0.95) falls below 0.92 with probability well under 0.1%.
    assert 0.92 <= covered / trials <= 1.0


def test_interval_narrows_as_the_sample_grows():
    rng = np.random.default_rng(4)
    widths = []
    for n in (1_000, 10_000, 100_000):
        _, low, high = gma.percentile_interval(rng.uniform(size=n), 95.0, 0.95)
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    # For the uniform, the width shrinks like 1 / sqrt(n): about 3.2 times per tenfold.
    assert 2.5 < widths[0] / widths[1] < 4.0


def test_higher_confidence_gives_a_wider_interval():
    scores = np.random.default_rng(5).uniform(size=5000)
    _, low_90, high_90 = gma.percentile_interval(scores, 95.0, 0.90)
    _, low_99, high_99 = gma.percentile_interval(scores, 95.0, 0.99)
    assert low_99 <= low_90 and high_99 >= high_90
    assert (high_99 - low_99) > (high_90 - low_90)


def test_convergence_rows_use_growing_prefixes_and_end_at_the_full_estimate():
    scores = np.random.default_rng(6).uniform(size=50_000)
    rows = gma.threshold_convergence(scores, 95.0, 0.95)
    sizes = [row[0] for row in rows]
    assert sizes[0] == 1000 and sizes[-1] == 50_000
    assert sizes == sorted(set(sizes))
    assert rows[-1][1:] == gma.percentile_interval(scores, 95.0, 0.95)
    for n, estimate, low, high in rows:
        assert low <= estimate <= high
        assert estimate == pytest.approx(np.percentile(scores[:n], 95.0))


@pytest.mark.parametrize("n", [40, 200])
def test_interval_keeps_its_coverage_for_small_samples(n):
    # With few samples the upper bound at the 95th percentile may lie beyond the largest
    # sample: it is then None (unbounded), never silently clamped to the maximum.
    rng = np.random.default_rng(7)
    trials, covered = 2000, 0
    for _ in range(trials):
        _, low, high = gma.percentile_interval(rng.uniform(size=n), 95.0, 0.95)
        covered += (low is None or low <= 0.95) and (high is None or 0.95 <= high)
    assert covered / trials >= 0.94


def test_bounds_the_sample_cannot_give_are_none():
    scores = np.arange(20.0)
    _, low, high = gma.percentile_interval(scores, 99.9, 0.95)
    assert high is None  # nothing in 20 samples bounds the 99.9th percentile from above
    assert low == 19.0
    _, low, high = gma.percentile_interval(scores, 0.1, 0.95)
    assert low is None and high == 0.0


def test_convergence_starts_at_a_tenth_of_a_small_sample():
    rows = gma.threshold_convergence(np.random.default_rng(8).uniform(size=1000), 95.0, 0.95)
    assert rows[0][0] == 100 and rows[-1][0] == 1000 and len(rows) > 5
