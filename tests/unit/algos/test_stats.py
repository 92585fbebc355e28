"""algos/stats.py: bootstrap intervals, win values, implicit rewards, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.core.algos import stats
from components.core.algos.stats import bootstrap_ci, win_values


def test_constant_values_give_a_zero_width_interval():
    assert bootstrap_ci([0.7] * 25, 500, 0.95, seed=0) == pytest.approx((0.7, 0.7, 0.7))


def test_single_value_and_empty():
    assert bootstrap_ci([3.0], 100, 0.9, seed=1) == (3.0, 3.0, 3.0)
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_ci([], 100, 0.9, seed=1)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 2.0], 100, 1.0, seed=1)


def test_mean_is_the_sample_mean_and_seeded():
    values = [0.0, 1.0, 1.0, 0.5, 0.0, 1.0]
    mean, low, high = bootstrap_ci(values, 1000, 0.9, seed=3)
    assert mean == pytest.approx(3.5 / 6)
    assert 0.0 <= low < mean < high <= 1.0
    assert bootstrap_ci(values, 1000, 0.9, seed=3) == (mean, low, high)
    continuous = np.random.default_rng(0).random(30)
    assert bootstrap_ci(continuous, 300, 0.9, seed=4) != bootstrap_ci(continuous, 300, 0.9, seed=5)


def test_interval_matches_the_normal_approximation_for_a_large_sample():
    # mean of 2000 N(0, 1) draws: standard error 1/sqrt(2000); a 95% interval is about +-1.96 SE
    x = np.random.default_rng(0).normal(size=2000)
    mean, low, high = bootstrap_ci(x, 2000, 0.95, seed=0)
    se = x.std() / np.sqrt(len(x))
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert (low + high) / 2 == pytest.approx(mean, abs=0.2 * se)


def test_coverage_of_a_known_mean():
    # 200 samples of 40 Bernoulli(0.3) outcomes: a 90% interval should cover 0.3 in about 90% of them
    rng = np.random.default_rng(42)
    covered = 0
    for i in range(200):
        _, low, high = bootstrap_ci(rng.random(40) < 0.3, 400, 0.9, seed=i)
        covered += low <= 0.3 <= high
    assert 0.80 <= covered / 200 <= 0.97


def test_many_resamples_are_chunked_without_changing_the_answer_shape():
    mean, low, high = bootstrap_ci(np.arange(5000) % 2, 1000, 0.95, seed=0)  # > one chunk of indices
    assert mean == 0.5 and low < 0.5 < high


def test_win_values_with_ties():
    dpo = [0.9, 0.5, 0.2, 0.7, 1.0]
    sft = [0.5, 0.5, 0.3, 0.7 + 1e-12, 0.0]
    assert win_values(dpo, sft) == [1.0, 0.5, 0.0, 0.5, 1.0]
    assert np.mean(win_values(dpo, sft)) == pytest.approx(3.0 / 5)
    with pytest.raises(ValueError):
        win_values([1.0], [1.0, 0.0])


def test_win_rate_interval_of_all_ties_is_one_half():
    assert bootstrap_ci(win_values([0.4] * 10, [0.4] * 10), 200, 0.95, seed=0) == (0.5, 0.5, 0.5)


def test_implicit_rewards_hand_computed():
    policy = torch.tensor([-10.0, -4.0])
    reference = torch.tensor([-12.0, -3.0])
    assert stats.implicit_rewards(policy, reference, beta=0.1).tolist() == pytest.approx([0.2, -0.1])
