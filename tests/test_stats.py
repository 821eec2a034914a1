"""The targeted-vs-random tests against scipy and hand-counted permutations."""

import math

import numpy as np
import pytest
from scipy import stats

import mda.evaluate.stats
from mda.evaluate.stats import chosen_test, rank_p, t_test_p

NULL = np.array([10.0, 25.0, 40.0, 31.0, 18.0])


@pytest.mark.parametrize("targeted, direction", [(70.0, +1), (28.0, +1), (-5.0, -1), (30.0, -1)])
def test_prediction_interval_t_test_matches_scipy(targeted, direction):
    t, df, p = t_test_p([targeted], NULL, direction)
    k = len(NULL)
    expected_t = (targeted - NULL.mean()) / (NULL.std(ddof=1) * math.sqrt(1 + 1 / k))
    assert df == k - 1 and t == pytest.approx(expected_t, rel=1e-12)
    reference = stats.t.sf(expected_t, k - 1) if direction > 0 else stats.t.cdf(expected_t, k - 1)
    assert p == pytest.approx(reference, rel=1e-10)
    # the same thing read as a prediction interval: targeted sits exactly on the one-sided (1 − p) bound
    bound = NULL.mean() + direction * stats.t.ppf(1 - p, k - 1) * NULL.std(ddof=1) * math.sqrt(1 + 1 / k)
    assert bound == pytest.approx(targeted, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("alternative, direction", [("greater", +1), ("less", -1)])
def test_group_t_test_is_scipys_pooled_two_sample_t(alternative, direction):
    targeted = np.array([55.0, 61.0, 47.0])
    ref = stats.ttest_ind(targeted, NULL, equal_var=True, alternative=alternative)
    t, df, p = t_test_p(targeted, NULL, direction)
    assert (t, df, p) == pytest.approx((ref.statistic, len(targeted) + len(NULL) - 2, ref.pvalue), rel=1e-12)


def test_t_test_without_spread_or_sets_has_no_p():
    assert math.isnan(t_test_p([5.0], [1.0, 1.0, 1.0], +1)[2])
    assert math.isnan(t_test_p([5.0], [1.0], +1)[2])


@pytest.mark.parametrize("targeted, null, direction, p", [
    (300.0, [0, 50, 100], +1, 1 / 4),      # beyond every set
    (75.0, [0, 50, 100], +1, 2 / 4),       # one set (100) at least as extreme
    (50.0, [0, 50, 100], +1, 3 / 4),       # a tie counts as at least as extreme
    (-300.0, [0, 50, 100], -1, 1 / 4),     # the hypothesised direction is down
    (300.0, [0, 50, 100], -1, 4 / 4),
    (19.0, list(range(19)), +1, 1 / 20),   # K = 19: the smallest p is 0.05
    (17.5, list(range(19)), +1, 2 / 20),
])
def test_rank_p_counts_the_sets_at_least_as_extreme(targeted, null, direction, p):
    got, smallest = rank_p([targeted], np.array(null, float), direction)
    assert got == pytest.approx(p) and smallest == pytest.approx(1 / (len(null) + 1))


def test_group_rank_p_by_hand():
    # targeted {5, 6}, random {1, 2}: the 6 groupings have means 5.5, 3, 3.5, 3.5, 4, 1.5 → only ours ≥ 5.5
    assert rank_p([5.0, 6.0], [1.0, 2.0], +1) == pytest.approx((1 / 6, 1 / 6))
    # targeted {2, 6} (mean 4), random {1, 5}: groupings ≥ 4 are {2, 6} and {6, 5}
    assert rank_p([2.0, 6.0], [1.0, 5.0], +1)[0] == pytest.approx(2 / 6)


def test_group_rank_p_is_scipys_exact_permutation_test():
    rng = np.random.default_rng(3)
    targeted, null = rng.normal(1.0, 1.0, 3), rng.normal(0.0, 1.0, 6)
    ref = stats.permutation_test((targeted, null), lambda x, y, axis: x.mean(axis) - y.mean(axis),
                                 permutation_type="independent", alternative="less", n_resamples=np.inf,
                                 vectorized=True)
    assert rank_p(targeted, null, -1)[0] == pytest.approx(ref.pvalue, rel=1e-12)


def test_group_rank_p_draws_when_there_are_too_many_groupings(monkeypatch):
    rng = np.random.default_rng(4)
    targeted, null = rng.normal(0.8, 1.0, 4), rng.normal(0.0, 1.0, 8)
    exact, _ = rank_p(targeted, null, +1)
    monkeypatch.setattr(mda.evaluate.stats, "EXACT_SPLITS", 10)
    drawn, smallest = rank_p(targeted, null, +1, seed=1)
    assert smallest == pytest.approx(1 / (1 + mda.evaluate.stats.PERMUTATION_DRAWS))
    assert abs(drawn - exact) < 4 * math.sqrt(exact * (1 - exact) / mda.evaluate.stats.PERMUTATION_DRAWS) + 1e-5
    assert rank_p(targeted, null, +1, seed=1) == (drawn, smallest)  # seeded


def test_the_test_depends_on_k_alone():
    assert [chosen_test(k) for k in (2, 3, 18, 19, 40)] == ["t", "t", "t", "rank", "rank"]
