"""Top-k agreement between probe draws (mda.attribute.overlap): `select`'s top set, overlaps by hand."""

import numpy as np
import pandas as pd
import pytest

from mda.attribute.overlap import draw_agreement, top_k
from mda.intervene.selection import select_sets


def test_top_k_is_selects_top_set_ties_included():
    rng = np.random.default_rng(0)
    scores = pd.DataFrame({"sample_id": rng.permutation(200), "head": "L2H2", "domain": "prose",
                           "score": np.round(rng.normal(size=200), 1)})  # rounded: many ties
    top = select_sets(scores, 30, [0], union=False)
    expected = top[top.set == "L2H2:top"].sample_id.to_numpy()
    np.testing.assert_array_equal(top_k(scores.score.to_numpy(), scores.sample_id.to_numpy(), 30), expected)


def test_pairwise_overlap_and_spearman_by_hand():
    frame = pd.DataFrame({"sample_id": [10, 11, 12, 13, 14, 15],
                          "a": [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],
                          "b": [6.0, 5.0, 1.0, 3.0, 2.0, 4.0],    # top 3: 10, 11, 15
                          "c": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]})   # top 3: 15, 14, 13
    out = draw_agreement(frame, {"seed 2": "a", "seed 3": "b", "seed 4": "c"}, k=3)
    pairs = {(p["a"], p["b"]): p for p in out["pairs"]}
    assert pairs[("seed 2", "seed 3")]["overlap"] == pytest.approx(2 / 3)
    assert pairs[("seed 2", "seed 4")]["overlap"] == 0.0
    assert pairs[("seed 3", "seed 4")]["overlap"] == pytest.approx(1 / 3)
    assert pairs[("seed 2", "seed 4")]["spearman"] == pytest.approx(-1.0)
    # ranks a: 6 5 4 3 2 1, b: 6 5 1 3 2 4 → d² = 0 0 9 0 0 9 → 1 − 6·18 / (6·35) = 0.4857
    assert pairs[("seed 2", "seed 3")]["spearman"] == pytest.approx(1 - 6 * 18 / (6 * 35))
    assert out["overlap_mean"] == pytest.approx(1 / 3) and out["overlap_min"] == 0.0 and out["k"] == 3
    assert np.isnan(draw_agreement(frame, {"seed 2": "a"}, k=3)["overlap_mean"])
