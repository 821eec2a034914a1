"""Evaluation statistics against hand-built trajectories whose answers are known."""

import math

import numpy as np
import pandas as pd
import pytest

from mda.core.config import Evaluate, parse_params
from mda.core.errors import MdaError
from mda.evaluate.catalysts import domain_enrichment
from mda.evaluate.effects import arm_summary, icl_coupling, run_effects, targeted_vs_random, transfer, transfer_summary
from mda.evaluate.runs import read_runs
from mda.evaluate.stats import t_interval
from mda.units.metrics import first_crossing

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
    e = run_effects(pd.concat(rows), WINDOW, EV, {"baseline", "remove-top", "augment-top"})
    t = targeted_vs_random(e).set_index(["arm", "effect"])
    assert t.loc[("remove-top", "delay"), "targeted_models"] == 1  # trained once: its probe seeds averaged
    assert t.loc[("remove-top", "delay"), "rank_p"] == pytest.approx(0.25)  # beyond all 3 sets: 1/(1+3)
    assert t.loc[("remove-top", "delay"), "rank_min_p"] == pytest.approx(0.25)
    assert t.loc[("remove-top", "delay"), "test"] == "t"  # K = 3 < 19: the t-test decides
    assert t.loc[("remove-top", "delay"), "p_value"] == t.loc[("remove-top", "delay"), "t_p"]
    # delay 300 against 0, 50, 100: t = (300 − 50) / (50 · √(1 + 1/3)), df = 2
    assert t.loc[("remove-top", "delay"), "t"] == pytest.approx(250 / (50 * math.sqrt(4 / 3)))
    assert t.loc[("remove-top", "delay"), "random_mean"] == pytest.approx(50)
    assert t.loc[("augment-top", "delay"), "rank_p"] == pytest.approx(1.0)  # every random set advanced more
    assert t.loc[("remove-top", "delta_auc"), "rank_p"] == pytest.approx(0.25)


def test_icl_coupling_correlation_and_sign_agreement():
    rows = [curve("baseline", 0, 1200), curve("baseline", 1, 1200)]
    rows += [curve("remove-top", 0, 1200, top=0.6, icl_end=-1.6), curve("augment-top", 0, 1200, top=0.9, icl_end=-2.3),
             curve("remove-random", 0, 1200, top=0.75, icl_end=-1.9)]
    rows += [curve("remove-random", 1, 1200, top=0.7, icl_end=-1.75)]
    c = icl_coupling(run_effects(pd.concat(rows), WINDOW, EV, set()))
    assert c["models"] == 4 and c["pearson_r"] > 0.95 and c["p_value"] < 0.05
    assert c["sign_agreement"] == {"remove-top": 1.0, "augment-top": 1.0, "remove-random": 1.0}
    # An arm trained once counts once however many probe seeds evaluated it — in r and in sign agreement.
    once = run_effects(pd.concat(rows + [curve("remove-top", 1, 1200, top=0.6, icl_end=-1.6)]), WINDOW, EV,
                       {"baseline", "remove-top", "augment-top"})
    assert icl_coupling(once)["models"] == 4
    assert icl_coupling(once)["models_per_arm"] == {"remove-top": 1, "augment-top": 1, "remove-random": 2}


def test_sign_agreement_counts_trained_models_not_probe_seeds():
    """One model scored with three probes whose ICL gains disagree in sign: per probe seed that
    would be 1/3 agreement; per trained model (its probe seeds averaged) it is one model that
    agrees (mean ICL gain > 0 with Δ score > 0)."""
    rows = [curve("baseline", s, 1200) for s in range(3)]
    rows += [curve("augment-top", s, 1200, top=0.9, icl_end=e) for s, e in enumerate([-2.5, -1.9, -1.95])]
    c = icl_coupling(run_effects(pd.concat(rows), WINDOW, EV, {"baseline", "augment-top"}))
    # icl gains: −2.0·... baseline ends at −2.0; arm at −2.5, −1.9, −1.95 → gains +0.5, −0.1, −0.05 (mean +0.117)
    assert c["sign_agreement"] == {"augment-top": 1.0} and c["models_per_arm"] == {"augment-top": 1}


def test_arm_summary_says_what_each_interval_measures():
    rows = [curve("baseline", s, 1200) for s in range(3)] + [curve("remove-top", s, 1300 + s) for s in range(3)]
    rows += [curve("remove-random", s, 1200 + 20 * s) for s in range(3)]
    summary = arm_summary(run_effects(pd.concat(rows), WINDOW, EV, {"baseline", "remove-top"}), 0.95)
    kinds = summary.groupby("arm").interval.unique().to_dict()
    assert {a: list(v) for a, v in kinds.items()} == {"remove-top": ["probe"], "remove-random": ["models"]}


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


def effects_table(arm_delays: dict, trained_once=("baseline", "remove-top", "augment-top")) -> pd.DataFrame:
    """An effects table straight from delays per arm (one value per seed); other effects follow the delay."""
    rows = []
    for arm, delays in arm_delays.items():
        for seed, d in enumerate(delays):
            rows.append({"arm": arm, "seed": seed, "trained_once": arm in trained_once, "delay": d,
                         "emergence_step": 1500 + d, "delta_auc": -d / 1000, "delta_score": -d / 1000,
                         "icl_gain": -d / 1000, "delta_heldout_loss": d / 1000})
    return pd.DataFrame(rows)


def test_a_seeded_targeted_arm_is_compared_as_a_group_of_models():
    from scipy import stats

    e = effects_table({"baseline": [0, 0, 0], "augment-synthetic": [-100, -120, -110], "augment-random": [0, -10, 10]})
    t = targeted_vs_random(e).set_index(["arm", "effect"]).loc[("augment-synthetic", "delay")]
    assert t.control == "augment-random" and t.direction == -1 and t.targeted_models == 3
    assert t.targeted == pytest.approx(-110) and t.random_sets == 3
    assert t.rank_p == pytest.approx(1 / 20)  # C(6, 3) = 20 groupings, ours the most extreme
    ref = stats.ttest_ind([-100, -120, -110], [0, -10, 10], equal_var=True, alternative="less")
    assert (t.t, t.df, t.t_p) == pytest.approx((ref.statistic, 4, ref.pvalue))
    assert t.test == "t" and t.p_value == t.t_p


# ----------------------------------------------------------------------------- the unit, not only the head
def head_trajectories(arm, seed, scores: dict, steps=np.arange(1000, 2001, 100)):
    """Per-head trajectories: scores[(layer, head)] = a function of the steps."""
    return pd.concat([pd.DataFrame({"arm": arm, "seed": seed, "step": steps, "layer": layer, "head": head,
                                    "prefix_matching": f(steps), "icl_score": -1.0, "heldout_loss": 3.0})
                      for (layer, head), f in scores.items()], ignore_index=True)


FLAT = lambda level: (lambda steps: np.full(len(steps), level))


def role_runs():
    """Target L1H0. Baseline: L1H0 forms at 1200 (→ 0.8), L1H1 flat 0.1, L0H0 flat 0.05.
    remove-top: L1H0 never forms, L1H1 forms at 1200 instead — the role moved.
    remove-random: L1H0 forms 200 steps later, L1H1 unchanged — delayed, not moved.
    augment-top: L1H0 never forms, L1H1 rises by only 0.05 — below the margin and the level: not moved.
    augment-random: L1H0 ends at 0.3 (< level 0.4), L1H1 at 0.45 (≥ level, +0.35 over its baseline
    0.1, > margin) — moved; L0H0 is the model's best head all along (0.9)."""
    runs = []
    for seed in (0, 1):
        runs.append(head_trajectories("baseline", seed, {(1, 0): lambda s: ramp(s, 1200), (1, 1): FLAT(0.1),
                                                          (0, 0): FLAT(0.05)}))
        runs.append(head_trajectories("remove-top", seed, {(1, 0): FLAT(0.1), (1, 1): lambda s: ramp(s, 1200),
                                                            (0, 0): FLAT(0.05)}))
        runs.append(head_trajectories("remove-random", seed, {(1, 0): lambda s: ramp(s, 1400), (1, 1): FLAT(0.1),
                                                               (0, 0): FLAT(0.05)}))
        runs.append(head_trajectories("augment-top", seed, {(1, 0): FLAT(0.1), (1, 1): FLAT(0.15),
                                                             (0, 0): FLAT(0.05)}))
    runs.append(head_trajectories("augment-random", 0, {(1, 0): FLAT(0.3), (1, 1): FLAT(0.45), (0, 0): FLAT(0.9)}))
    return pd.concat(runs, ignore_index=True)


def test_unit_levels_take_the_best_head_of_the_layer_and_of_the_model():
    from mda.evaluate.unit_level import unit_trajectories

    u = unit_trajectories(role_runs(), TARGETS).set_index(["arm", "seed", "step", "level"])
    assert u.loc[("remove-top", 0, 2000, "head"), "score"] == pytest.approx(0.1)
    assert u.loc[("remove-top", 0, 2000, "layer"), ["score", "best_head"]].tolist() == [pytest.approx(0.8), "L1H1"]
    assert u.loc[("remove-top", 0, 1000, "layer"), "best_head"] == "L1H0"  # 0.1 vs 0.0 at the start
    assert u.loc[("augment-random", 0, 1500, "model"), ["score", "best_head"]].tolist() == [pytest.approx(0.9), "L0H0"]
    assert u.loc[("augment-random", 0, 1500, "layer"), "best_head"] == "L1H1"


def test_unit_level_delays_and_role_moves():
    from mda.evaluate.unit_level import unit_level

    unit = unit_level(role_runs(), TARGETS, WINDOW, EV, {"baseline", "remove-top", "augment-top"})
    e = unit["unit_effects"].set_index(["arm", "seed", "level"])
    # baseline head and layer: 0.8 at the end, threshold 0.4, reached at 1200 + 250
    assert e.loc[("baseline", 0, "layer"), "emergence_step"] == pytest.approx(1450)
    # remove-top: the target never forms; its layer forms on time (L1H1 took over)
    assert math.isnan(e.loc[("remove-top", 0, "head"), "delay"])
    assert e.loc[("remove-top", 0, "layer"), "delay"] == pytest.approx(0)
    assert e.loc[("remove-top", 0, "layer"), "best_head_end"] == "L1H1"
    # remove-random: delayed at every level alike
    assert e.loc[("remove-random", 1, "head"), "delay"] == pytest.approx(200)
    assert e.loc[("remove-random", 1, "layer"), "delay"] == pytest.approx(200)
    per_arm = unit["unit_per_arm"].set_index(["arm", "level", "effect"])
    assert per_arm.loc[("remove-random", "layer", "delay"), "mean"] == pytest.approx(200)
    assert per_arm.loc[("remove-top", "head", "delay"), "not_emerged"] == 2

    moves = unit["role_moves"].set_index(["arm", "seed"])
    assert moves.loc[("remove-top", 0), "moved_to"] == "L1H1" and moves.loc[("remove-top", 1), "moved_to"] == "L1H1"
    assert moves.loc[("remove-top", 0), ["target_end", "level", "rival_end", "rival_baseline_end"]].tolist() == \
        pytest.approx([0.1, 0.4, 0.8, 0.1])
    assert moves.loc[("remove-random", 0), "moved_to"] == ""   # the target formed (late): nothing moved
    assert moves.loc[("augment-top", 0), "moved_to"] == ""     # rival 0.15: below the level, rise 0.05 < margin
    assert moves.loc[("augment-random", 0), "moved_to"] == "L1H1"  # 0.45 ≥ 0.4 and +0.35 over its baseline
    from mda.evaluate.unit_level import role_summary

    assert role_summary(unit["role_moves"]) == {
        "remove-top": {"runs": 2, "moved": 2, "to": ["L1H1"]}, "remove-random": {"runs": 2, "moved": 0, "to": []},
        "augment-top": {"runs": 2, "moved": 0, "to": []}, "augment-random": {"runs": 1, "moved": 1, "to": ["L1H1"]}}


def test_role_moved_needs_the_rise_to_exceed_the_margin():
    from mda.evaluate.unit_level import role_moves

    ends = pd.DataFrame({"arm": ["baseline", "baseline", "remove-top", "remove-top"], "seed": 0, "layer": 1,
                         "head": [0, 1, 0, 1], "score_end": [0.8, 0.35, 0.2, 0.44]})
    assert role_moves(ends, TARGETS, 0.5, margin=0.1).moved_to.tolist() == [""]     # rose 0.09
    assert role_moves(ends, TARGETS, 0.5, margin=0.05).moved_to.tolist() == ["L1H1"]  # rose 0.09 > 0.05
    ends.loc[3, "score_end"] = 0.39  # rose 0.04 and below the level 0.4
    assert role_moves(ends, TARGETS, 0.5, margin=0.01).moved_to.tolist() == [""]
