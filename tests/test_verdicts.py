"""Every branch of every verdict, and the condition each sentence names."""

import numpy as np
import pytest

from mda.evaluate.effects import arm_summary, targeted_vs_random
from mda.evaluate.verdicts import (NOT_SHOWN, NOT_SIGNIFICANT, NOT_TESTED, SUPPORTED, icl_verdict, targeted_verdict,
                          verdicts)
from tests.test_evaluate import effects_table

ARMS = ["baseline", "remove-top", "augment-top", "remove-random", "remove-matched", "augment-random",
        "augment-matched", "augment-synthetic"]
UNIFORM = {"remove-top": "remove-random", "augment-top": "augment-random", "augment-synthetic": "augment-random"}


def verdict(arm, delays: dict, configured=ARMS, missing=(), control=None):
    e = effects_table({"baseline": [0.0] * len(next(iter(delays.values()))), **delays})
    return targeted_verdict(arm, control or UNIFORM[arm], targeted_vs_random(e), arm_summary(e, 0.95),
                            list(configured), list(missing))


def test_supported_by_the_t_test_when_k_is_below_19():
    v = verdict("remove-top", {"remove-top": [300.0] * 3, "remove-random": [0.0, 50.0, 100.0]})
    assert v.state == SUPPORTED
    # t = 250 / (50 · √(4/3)) = 4.33, df = 2 → p = 0.0247
    assert "later than the baseline (+300 steps) and beyond the random sets' mean (+50)" in v.reason
    assert "the prediction-interval t-test (chosen because K = 3 < 19) gives p = 0.0247 ≤ 0.05" in v.reason
    assert "Rank test p = 0.25 (smallest possible: 0.25)" in v.detail
    assert "t = +4.33, df = 2, p = 0.0247" in v.detail
    assert v.exploratory  # the t-test decided: not the test declared before the runs
    assert v.sentence().startswith("Removing the top-k set delays emergence more than removing a random set: "
                                   "**supported** (exploratory: K < 19, t-test) — ")


def test_the_domain_matched_control_is_its_own_comparison():
    delays = {"remove-top": [300.0] * 3, "remove-random": [0.0, 50.0, 100.0], "remove-matched": [250.0, 300.0, 350.0]}
    uniform, matched = verdict("remove-top", delays), verdict("remove-top", delays, control="remove-matched")
    assert uniform.state == SUPPORTED
    assert matched.state == NOT_SHOWN and "the random sets +300 on average (not beyond)" in matched.reason
    assert matched.claim == ("Removing the top-k set delays emergence more than removing a random set with the top "
                             "set's domain mix")
    assert not matched.exploratory  # "not shown" is decided by the direction, not by a test


def test_in_the_direction_but_not_significant():
    v = verdict("remove-top", {"remove-top": [300.0] * 3, "remove-random": [0.0, 150.0, 300.0]})
    assert v.state == NOT_SIGNIFICANT  # t = 150 / (150 · √(4/3)) = 0.866, df = 2: t.sf = 0.239
    assert "but the prediction-interval t-test (chosen because K = 3 < 19) gives p = 0.239 > 0.05" in v.reason


def test_the_rank_test_decides_from_19_sets_whatever_the_t_test_says():
    heavy = [0.0] * 18 + [100.0]  # one far random set: t-test p = 0.016, rank p = 2/20
    v = verdict("remove-top", {"remove-top": [60.0] * 19, "remove-random": heavy})
    assert v.state == NOT_SIGNIFICANT
    assert "the rank test (chosen because K = 19 ≥ 19) gives p = 0.1 > 0.05" in v.reason
    assert "p = 0.016" in v.detail  # the t-test, reported but not deciding
    v18 = verdict("remove-top", {"remove-top": [60.0] * 18, "remove-random": heavy[1:]})
    assert v18.state == SUPPORTED and "t-test (chosen because K = 18 < 19)" in v18.reason and v18.exploratory
    assert not v.exploratory and "exploratory" not in v.sentence()
    beyond = verdict("remove-top", {"remove-top": [300.0] * 19, "remove-random": list(np.arange(19.0) * 10)})
    assert beyond.state == SUPPORTED and "the rank test (chosen because K = 19 ≥ 19) gives p = 0.05 ≤ 0.05" in beyond.reason


def test_not_shown_names_the_direction_that_failed():
    wrong_way = verdict("augment-top", {"augment-top": [50.0] * 3, "augment-random": [-10.0, -20.0, -30.0]})
    assert wrong_way.state == NOT_SHOWN
    assert ("the rule needs emergence earlier than the baseline and beyond the random sets' mean; `augment-top` "
            "moved it +50 steps (not earlier) and the random sets -20 on average (not beyond)") in wrong_way.reason
    short = verdict("augment-top", {"augment-top": [-6.0] * 3, "augment-random": [-10.0, -12.0, -11.0]})
    assert short.state == NOT_SHOWN
    assert "`augment-top` moved it -6 steps (earlier) and the random sets -11 on average (not beyond)" in short.reason


@pytest.mark.parametrize("delays, configured, missing, reason", [
    ({"remove-top": [300.0] * 3, "remove-random": [0.0, 1.0, 2.0]}, ["baseline", "remove-top"], [],
     "`remove-random` is not among `retrain.fixed_arms` / `retrain.random_arms`"),
    ({"remove-random": [0.0, 1.0, 2.0]}, ARMS, ["remove-top seed 0", "augment-top seed 1"],
     "the runs it needs are missing (remove-top seed 0)"),
    ({"remove-top": [np.nan] * 3, "remove-random": [0.0, 1.0, 2.0]}, ARMS, [],
     "`remove-top` never reached the emergence threshold, so it has no delay to compare"),
    ({"remove-top": [300.0] * 3, "remove-random": [np.nan] * 3}, ARMS, [],
     "no `remove-random` run has a delay"),
    ({"remove-top": [300.0] * 3, "remove-random": [50.0] * 3}, ARMS, [],
     "the prediction-interval t-test (chosen because K = 3 < 19) has no p (fewer than 2 random sets or no spread"),
])
def test_not_tested_says_why(delays, configured, missing, reason):
    v = verdict("remove-top", delays, configured, missing)
    assert v.state == NOT_TESTED and reason in v.reason


def test_a_moved_role_is_noted_but_does_not_decide():
    delays = {"remove-top": [300.0] * 3, "remove-random": [0.0, 50.0, 100.0]}
    plain = verdict("remove-top", delays)
    e = effects_table({"baseline": [0.0] * 3, **delays})
    moved = targeted_verdict("remove-top", "remove-random", targeted_vs_random(e), arm_summary(e, 0.95), ARMS, [],
                             {"runs": 3, "moved": 2, "to": ["L1H3"]})
    assert (moved.state, moved.reason) == (plain.state, plain.reason)
    assert moved.detail.endswith("In 2 of 3 `remove-top` runs the role moved to another head (L1H3; see *The unit, "
                                 "not only the head*).")


def test_a_seeded_targeted_arm_gets_its_own_verdict():
    v = verdict("augment-synthetic", {"augment-synthetic": [-100.0, -120.0, -110.0], "augment-random": [0.0, -10.0, 10.0]})
    assert v.state == SUPPORTED and v.claim.startswith("Synthetic motif rows")
    assert "the pooled two-sample t-test (chosen because K = 3 < 19) gives p = 8.78e-05" in v.reason
    assert "95 % CI over 3 trained models, one per seed" in v.detail and "Permutation test p = 0.05 (smallest possible: 0.05)" in v.detail


def coupling(r, p, agreement, models=8):
    return {"pearson_r": r, "p_value": p, "models": models, "sign_agreement": agreement}


@pytest.mark.parametrize("c, state, reason", [
    (coupling(float("nan"), float("nan"), {}, models=2), NOT_TESTED,
     "the correlation needs at least 3 trained models with variation in both effects (have 2)"),
    (coupling(0.89, 0.002, {"remove-top": 1.0, "augment-top": 1 / 3, "remove-random": 0.0}), NOT_SHOWN,
     "the rule needs r > 0 and ≥ 50 % sign agreement in every targeted arm; `augment-top` had 33%"),
    (coupling(-0.2, 0.7, {"remove-top": 1.0}), NOT_SHOWN, "r = -0.20 ≤ 0"),
    (coupling(0.83, 0.005, {"remove-top": 1.0, "augment-top": 1.0, "augment-random": 0.0}), SUPPORTED,
     "r = +0.83 > 0, every targeted arm moves both the same way in ≥ 50 % of its trained models, and one-sided "
     "p = 0.005 ≤ 0.05"),
    (coupling(0.4, 0.2, {"remove-top": 0.5, "augment-synthetic": 2 / 3}), NOT_SIGNIFICANT,
     "but one-sided p = 0.2 > 0.05"),
])
def test_icl_verdict_branches(c, state, reason):
    v = icl_verdict(c)
    assert v.state == state and reason in v.reason


def test_every_hypothesis_gets_a_verdict():
    e = effects_table({"baseline": [0.0] * 3, "remove-top": [300.0] * 3, "remove-random": [0.0, 50.0, 100.0]})
    ev = {"tests": targeted_vs_random(e), "per_arm": arm_summary(e, 0.95),
          "summary": {"fixed_arms": ["baseline", "remove-top"], "random_arms": ["remove-random"], "missing_runs": [],
                      "icl_coupling": coupling(float("nan"), float("nan"), {}, 2)}}
    states = [(v.claim.split()[0], v.claim.endswith("domain mix"), v.state) for v in verdicts(ev)]
    assert states == [("Removing", False, SUPPORTED), ("Removing", True, NOT_TESTED),
                      ("Duplicating", False, NOT_TESTED), ("Duplicating", True, NOT_TESTED),
                      ("Synthetic", False, NOT_TESTED), ("Synthetic", True, NOT_TESTED), ("In-context", False, NOT_TESTED)]
