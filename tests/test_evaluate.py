"""Evaluation statistics against hand-built trajectories whose answers are known."""

import math

import numpy as np
import pandas as pd
import pytest

from mda.config import Evaluate, parse_params
from mda.errors import MdaError
from mda.evaluate import (arm_summary, domain_enrichment, icl_coupling, read_runs, run_effects,
                          t_interval, targeted_vs_random, transfer, transfer_summary)
from mda.units import first_crossing

EV = Evaluate()
WINDOW = (1000, 2000)
TARGETS = {"heads": [{"name": "L1H0", "layer": 1, "head": 0}], "metric": "prefix_matching"}


def ramp(steps, onset, top=0.8):
    """A head that rises linearly from 0 at `onset` to `top` 500 steps later."""
    return np.clip((np.asarray(steps, float) - onset) / 500, 0, 1) * top


def curve(arm, seed, onset, top=0.8, icl_end=-2.0):
    steps = np.arange(1000, 2001, 100)
    score = ramp(steps, onset, top)
    return pd.DataFrame({"arm": arm, "seed": seed, "step": steps, "target_score": score,
                         "icl_score": icl_end * score / max(top, 1e-9), "heldout_loss": 3.0 - score})


def test_first_crossing_interpolates_and_reports_never():
    assert first_crossing([0, 100, 200], [0.0, 0.2, 0.6], 0.4) == pytest.approx(150.0)
    assert first_crossing([0, 100], [0.5, 0.6], 0.4) == 0.0  # already there at the start
    assert math.isnan(first_crossing([0, 100], [0.1, 0.2], 0.4))
    assert first_crossing([0, 100, 200], [0.0, 0.4, 0.1], 0.4) == 100.0  # the first crossing, exactly hit


def test_emergence_delay_auc_and_icl_gain_from_shifted_ramps():
    curves = pd.concat([curve("baseline", 0, 1200), curve("remove-top", 0, 1400, icl_end=-1.5),
                        curve("augment-top", 0, 1100, top=0.9)])
    e = run_effects(curves, WINDOW, EV, {"baseline", "remove-top", "augment-top"}).set_index("arm")
    # baseline ends at 0.8: threshold 0.4, reached halfway up the ramp = onset + 250
    assert e.loc["baseline", "threshold_level"] == pytest.approx(0.4)
    assert e.loc["baseline", "emergence_step"] == pytest.approx(1450)
    assert e.loc["remove-top", "delay"] == pytest.approx(200)
    # augment-top: ramp to 0.9 from 1100 reaches 0.4 at 1100 + 500·0.4/0.9
    assert e.loc["augment-top", "delay"] == pytest.approx(1100 + 500 * 0.4 / 0.9 - 1450)
    assert e.loc["remove-top", "delta_score"] == pytest.approx(0.0)
    # mean score over the window: the removed head spends 200 more steps at 0
    assert e.loc["remove-top", "delta_auc"] == pytest.approx(-0.8 * 200 / 1000, abs=1e-9)
    assert e.loc["remove-top", "icl_gain"] == pytest.approx(-0.5)  # less ICL: ICL score −1.5 vs −2.0
    assert e.loc["baseline", "delay"] == 0


def test_run_that_never_emerges_has_no_delay():
    curves = pd.concat([curve("baseline", 0, 1200), curve("remove-top", 0, 5000)])
    e = run_effects(curves, WINDOW, EV, set()).set_index("arm")
    assert math.isnan(e.loc["remove-top", "emergence_step"]) and math.isnan(e.loc["remove-top", "delay"])
    s = arm_summary(run_effects(curves, WINDOW, EV, set()), 0.95)
    assert s[s.effect == "delay"].not_emerged.iloc[0] == 1


def test_t_interval_matches_the_textbook_value():
    mean, low, high = t_interval([1.0, 2.0, 3.0], 0.95)
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, df=2) · s / √n
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert math.isnan(t_interval([5.0], 0.95)[1])


def test_targeted_vs_random_ranks_the_targeted_effect_among_random_sets():
    rows = [curve("baseline", s, 1200) for s in range(3)]
    rows += [curve("remove-top", s, 1500) for s in range(3)]          # delay 300
    rows += [curve("remove-random", s, 1200 + 50 * s) for s in range(3)]  # delays 0, 50, 100
    rows += [curve("augment-top", s, 1250) for s in range(3)]         # delay +50: wrong direction
    rows += [curve("augment-random", s, 1200 - 50 * s) for s in range(3)]
    e = run_effects(pd.concat(rows), WINDOW, EV, set())
    t = targeted_vs_random(e).set_index(["arm", "effect"])
    assert t.loc[("remove-top", "delay"), "p_value"] == pytest.approx(0.25)  # beyond all 3 sets: 1/(1+3)
    assert t.loc[("remove-top", "delay"), "min_p"] == pytest.approx(0.25)
    assert t.loc[("remove-top", "delay"), "random_mean"] == pytest.approx(50)
    assert t.loc[("augment-top", "delay"), "p_value"] == pytest.approx(1.0)  # every random set advanced more
    assert t.loc[("remove-top", "delta_auc"), "p_value"] == pytest.approx(0.25)


def test_icl_coupling_correlation_and_sign_agreement():
    rows = [curve("baseline", 0, 1200), curve("baseline", 1, 1200)]
    rows += [curve("remove-top", 0, 1200, top=0.6, icl_end=-1.6), curve("augment-top", 0, 1200, top=0.9, icl_end=-2.3),
             curve("remove-random", 0, 1200, top=0.75, icl_end=-1.9)]
    rows += [curve("remove-random", 1, 1200, top=0.7, icl_end=-1.75)]
    c = icl_coupling(run_effects(pd.concat(rows), WINDOW, EV, set()))
    assert c["models"] == 4 and c["pearson_r"] > 0.95 and c["p_value"] < 0.05
    assert c["sign_agreement"] == {"remove-top": 1.0, "augment-top": 1.0, "remove-random": 1.0}
    # An arm trained once counts once however many probe seeds evaluated it.
    once = run_effects(pd.concat(rows + [curve("remove-top", 1, 1200, top=0.6, icl_end=-1.6)]), WINDOW, EV,
                       {"baseline", "remove-top", "augment-top"})
    assert icl_coupling(once)["models"] == 4


def head_runs(deltas: dict, baseline: dict):
    """Trajectories of four heads; each head ends at baseline[h] (+ deltas[h] in remove-top)."""
    parts = []
    for arm in ("baseline", "remove-top"):
        for (layer, head), b in baseline.items():
            end = b + (deltas[(layer, head)] if arm == "remove-top" else 0)
            parts.append(pd.DataFrame({"arm": arm, "seed": 0, "step": [1000, 2000], "layer": layer, "head": head,
                                       "prefix_matching": [0.0, end], "icl_score": 0.0, "heldout_loss": 3.0}))
    return pd.concat(parts, ignore_index=True)


def test_transfer_splits_same_kind_from_other_heads():
    baseline = {(1, 0): 0.8, (1, 1): 0.5, (0, 0): 0.05, (0, 1): 0.1}
    deltas = {(1, 0): -0.3, (1, 1): -0.2, (0, 0): 0.01, (0, 1): -0.03}
    t = transfer(head_runs(deltas, baseline), TARGETS, WINDOW, EV).set_index("head")
    assert t.loc["L1H0", "kind"] == "target" and t.loc["L1H1", "kind"] == "same_kind"
    assert t.loc["L0H0", "kind"] == "other" and t.loc["L0H1", "delta_mean"] == pytest.approx(-0.03)
    s = transfer_summary(t.reset_index())["remove-top"]
    assert s["abs_delta_same_kind"] == pytest.approx(0.2)
    assert s["abs_delta_other"] == pytest.approx(0.02)
    assert s["same_kind_over_other"] == pytest.approx(10.0)


def test_domain_enrichment_ratio_and_bootstrap_interval():
    window = pd.Series(["code"] * 100 + ["prose"] * 900)
    top = pd.Series(["code"] * 50 + ["prose"] * 50)
    e = domain_enrichment(window, top, Evaluate(bootstrap=4000)).set_index("domain")
    assert e.loc["code", "enrichment"] == pytest.approx(5.0)
    assert e.loc["prose", "enrichment"] == pytest.approx(0.5 / 0.9)
    assert e.loc["code", "ci_low"] < 5.0 < e.loc["code", "ci_high"]
    # binomial share sd √(.25/100) = 0.05 → the ratio's interval is roughly 5 ± 2·(0.05/0.1)·… : wide but bounded
    assert 3.0 < e.loc["code", "ci_low"] and e.loc["code", "ci_high"] < 7.5
    again = domain_enrichment(window, top, Evaluate(bootstrap=4000))
    assert again.equals(e.reset_index())  # seeded


def write_trajectory(path, arm_rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.concat(arm_rows).to_parquet(path, index=False)


def test_read_runs_lists_missing_runs_and_names_bad_files(tmp_path):
    params = parse_params({"retrain": {"fixed_arms": ["baseline", "remove-top"], "random_arms": ["remove-random"],
                                       "seeds": [0, 1]}})
    frame = lambda seed: pd.DataFrame({"step": [1000, 2000], "seed": seed, "layer": 0, "head": 0,
                                       "prefix_matching": [0.0, 0.5], "icl_score": 0.0, "heldout_loss": 3.0})
    write_trajectory(tmp_path / "baseline/trajectory.parquet", [frame(0), frame(1)])
    write_trajectory(tmp_path / "remove-top/trajectory.parquet", [frame(0)])  # seed 1 absent
    write_trajectory(tmp_path / "remove-random-1/trajectory.parquet", [frame(1)])
    runs, missing = read_runs(params, tmp_path)
    assert missing == ["remove-top seed 1", "remove-random seed 0"]
    assert sorted(set(zip(runs.arm, runs.seed))) == [("baseline", 0), ("baseline", 1), ("remove-random", 1),
                                                      ("remove-top", 0)]
    (tmp_path / "remove-top/trajectory.parquet").write_bytes(b"not parquet")
    with pytest.raises(MdaError, match="remove-top/trajectory.parquet: unreadable"):
        read_runs(params, tmp_path)
    for p in tmp_path.glob("*/trajectory.parquet"):
        if p.parent.name != "remove-random-1":
            p.unlink()
    with pytest.raises(MdaError, match="baseline: missing"):
        read_runs(params, tmp_path)
