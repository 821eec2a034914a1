"""The statistics of the evaluation: small pure functions of numbers (no tables, no files).

Targeted vs random. A targeted arm has m trained models (m = 1 for an arm trained once, whose
value is the mean over its probe seeds; m = #seeds for a seeded targeted arm such as
`augment-synthetic`); its random control has K random sets, one model each. Two one-sided tests
in the hypothesised direction, both fixed in advance:

- **rank test** (`rank_p`): the exact permutation test of the targeted group's mean over every
  way of choosing m of the m + K values. For m = 1 it is the rank of the targeted effect among
  the random sets', p = (1 + #sets at least as extreme) / (K + 1): the random sets are draws from
  the null (which samples are edited), so it assumes nothing about their distribution, but it
  cannot go below 1 / C(m + K, m) (1 / (K + 1) for m = 1).
- **t-test** (`t_test_p`): Student's two-sample t with a pooled variance, df = m + K − 2. For
  m = 1 it is exactly the prediction-interval t-test t = (x − mean) / (sd · √(1 + 1/K)), df = K − 1:
  is x a plausible new draw from the random sets' distribution? It assumes that distribution is
  normal (and, for m > 1, that the targeted models share its variance).

The verdict uses the rank test when K ≥ `RANK_TEST_MIN_SETS` (where it can reach p = 0.05) and
the t-test otherwise: a rule that depends on K alone (`chosen_test`).
"""

from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np

ALPHA = 0.05
RANK_TEST_MIN_SETS = 19  # 1 / (19 + 1) = 0.05: the rank test's smallest p reaches ALPHA
EXACT_SPLITS = 200_000   # enumerate every split up to this many; beyond, Monte-Carlo draws
PERMUTATION_DRAWS = 100_000


def finite(values) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    return v[np.isfinite(v)]


def t_interval(values, confidence: float) -> tuple[float, float, float]:
    """Mean and two-sided t-interval of the mean (NaN bounds for fewer than two values)."""
    from scipy import stats

    v = finite(values)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if len(v) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return mean, mean - half, mean + half


def chosen_test(random_sets: int) -> str:
    """`rank` when K ≥ RANK_TEST_MIN_SETS random sets, else `t`: depends on K alone."""
    return "rank" if random_sets >= RANK_TEST_MIN_SETS else "t"


def rank_p(targeted, null, direction: int, seed: int = 0) -> tuple[float, float]:
    """One-sided permutation p of the targeted group's mean among all C(m + K, m) groupings of
    the m targeted and K random values (Monte-Carlo draws, seeded, beyond `EXACT_SPLITS`), and
    the smallest p the test can give. `direction` +1: the hypothesis is targeted > random."""
    targeted, null = finite(targeted), finite(null)
    m, k = len(targeted), len(null)
    if not m or not k:
        return float("nan"), float("nan")
    values = direction * np.concatenate([targeted, null])
    observed = values[:m].mean()
    tol = 1e-12 * max(1.0, abs(observed))  # ties up to float summation order count as "as extreme"
    splits = comb(m + k, m)
    if splits <= EXACT_SPLITS:
        groups = np.fromiter((i for split in combinations(range(m + k), m) for i in split),
                             dtype=np.int64, count=splits * m).reshape(splits, m)
        extreme = int((values[groups].mean(axis=1) >= observed - tol).sum())
        return extreme / splits, 1 / splits
    rng = np.random.default_rng([seed, 17])
    draws = np.argsort(rng.random((PERMUTATION_DRAWS, m + k)), axis=1)[:, :m]
    extreme = int((values[draws].mean(axis=1) >= observed - tol).sum())
    return (1 + extreme) / (1 + PERMUTATION_DRAWS), 1 / (1 + PERMUTATION_DRAWS)


def t_test_p(targeted, null, direction: int) -> tuple[float, int, float]:
    """Pooled two-sample t = (mean targeted − mean random) / (s · √(1/m + 1/K)), df = m + K − 2,
    and its one-sided p in `direction` (NaN without two random sets or without spread)."""
    from scipy import stats

    targeted, null = finite(targeted), finite(null)
    m, k = len(targeted), len(null)
    df = m + k - 2
    if not m or k < 2:
        return float("nan"), max(df, 0), float("nan")
    pooled = (((targeted - targeted.mean()) ** 2).sum() + ((null - null.mean()) ** 2).sum()) / df
    se = float(np.sqrt(pooled * (1 / m + 1 / k)))
    if not se > 0:
        return float("nan"), df, float("nan")
    t = float((targeted.mean() - null.mean()) / se)
    return t, df, float(stats.t.sf(direction * t, df))
