"""Tests for fasteto.stats: the bootstrap against a plain-Python loop, hand-computed paired differences,
and the degenerate cases (one task, identical values, no tasks, no shared tasks)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fasteto.stats import (
    PairedDifference,
    bootstrap_ci,
    paired_difference,
    percentile_interval,
    resample_indices,
)


def _reference_ci(values: list[float], indices: np.ndarray, level: float) -> tuple[float, float]:
    """The percentile bootstrap written out: each resample's mean by a loop, sorted, and the quantiles
    interpolated linearly between the two nearest order statistics (numpy's default rule)."""
    means = sorted(sum(values[i] for i in row) / len(row) for row in indices.tolist())
    out = []
    for q in ((1 - level) / 2, (1 + level) / 2):
        pos = q * (len(means) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(means) - 1)
        out.append(means[lo] + (pos - lo) * (means[hi] - means[lo]))
    return out[0], out[1]


@pytest.mark.parametrize(("n", "resamples", "seed", "level"), [(7, 2_001, 3, 0.95), (123, 500, 0, 0.9)])
def test_bootstrap_matches_a_plain_loop(n, resamples, seed, level):
    values = np.random.default_rng(n).random(n).tolist()  # fresh, uneven values; odd sizes
    indices = resample_indices(n, resamples, seed)
    assert indices.shape == (resamples, n) and indices.dtype == np.int64
    assert indices.min() >= 0 and indices.max() == n - 1
    expected = _reference_ci(values, indices, level)
    assert bootstrap_ci(values, resamples, level, seed) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_bootstrap_interval_holds_the_mean_and_is_reproducible():
    values = np.random.default_rng(11).random(400)
    low, high = bootstrap_ci(values)
    assert low < values.mean() < high
    # Normal theory for comparison: the interval is about 2 * 1.96 standard errors wide.
    width = 2 * 1.96 * values.std(ddof=1) / math.sqrt(values.size)
    assert high - low == pytest.approx(width, rel=0.05)
    assert bootstrap_ci(values) == (low, high)  # same seed, same interval
    assert bootstrap_ci(values, seed=1) != (low, high)


def test_bootstrap_degenerate_cases():
    assert bootstrap_ci([0.3]) == (0.3, 0.3)
    assert bootstrap_ci([0.1] * 400) == (0.1, 0.1)  # exact: no rounding noise from 400 additions
    # Two values: a resample mean is 0, 0.5 or 1 (chances 1/4, 1/2, 1/4), so the extremes.
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    with pytest.raises(ValueError, match="no tasks"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="no tasks"):
        resample_indices(0)
    with pytest.raises(ValueError, match="one number per task"):
        bootstrap_ci([[1.0, 2.0]])


def test_percentile_interval_is_linear_between_order_statistics():
    # Quantile 0.025 of 0..40: position 1.0 -> 1; quantile 0.975: position 39.0 -> 39. (1 - 0.95) / 2
    # is 0.025 only to within rounding, hence approx.
    assert percentile_interval(np.arange(41, dtype=np.float64)) == pytest.approx((1.0, 39.0))
    # Of 0..10 at level 0.9: positions 0.5 and 9.5 -> halfway between neighbours.
    assert percentile_interval(np.arange(11, dtype=np.float64), 0.9) == pytest.approx((0.5, 9.5))


def test_paired_difference_hand_computed():
    a = {"x": 1.0, "y": 0.5, "z": 0.0}
    b = {"y": 0.25, "z": 0.5, "w": 1.0}
    # Shared y, z: differences 0.25 and -0.5, mean -0.125; two tasks, so the interval is their range.
    assert paired_difference(a, b) == PairedDifference(mean=-0.125, ci=(-0.5, 0.25), n_paired=2,
                                                       only_a=1, only_b=1)
    same = paired_difference({"p": 0.5, "q": 0.75}, {"q": 0.5, "p": 0.25})  # paired by id, not order
    assert same == PairedDifference(mean=0.25, ci=(0.25, 0.25), n_paired=2, only_a=0, only_b=0)


def test_paired_difference_with_no_shared_task():
    assert paired_difference({"x": 1.0}, {"y": 0.0, "z": 1.0}) == PairedDifference(None, None, 0, 1, 2)
    assert paired_difference({}, {}) == PairedDifference(None, None, 0, 0, 0)


def test_pairing_removes_the_spread_both_methods_share():
    rng = np.random.default_rng(5)
    hardness = rng.random(200)  # per task; both methods see it
    a = {str(i): h for i, h in enumerate(hardness)}
    b = {str(i): h - 0.05 + 0.02 * rng.standard_normal() for i, h in enumerate(hardness)}
    d = paired_difference(a, b)
    assert d.ci[0] < 0.05 < d.ci[1] and d.mean == pytest.approx(0.05, abs=0.005)
    low, high = bootstrap_ci(list(a.values()))
    assert d.ci[1] - d.ci[0] < (high - low) / 5  # far narrower than either method's own interval
