"""Stage `evaluate`: did the selected data cause the unit? (The whole evaluation and its headline numbers.)

Reads the counterfactual runs (`data/retrain/<arm>[-<seed>]/trajectory.parquet`) and turns
them into effects against the baseline run:

- per arm × seed: emergence step, mean score over the window, score / ICL score / held-out
  loss at the window end, and their differences from the baseline with the same probe seed;
- per arm: mean and t-interval over seeds; targeted vs random: the targeted arm's effect
  against the random sets' by the rank (permutation) test and the prediction-interval t-test
  (`mda.evaluate.stats`; the random sets are draws from the null over which samples are edited);
- the unit-level view (`mda.evaluate.unit_level`): the best head of the unit's kind in the target's
  layer and in the model, their emergence and delay, and runs where the role moved;
- ICL coupling, transfer to the other heads, and the domains the top-k set is made of;
- when each arm's edits happen relative to the baseline's emergence.

Every score comes from the trajectories `retrain` wrote with `mda.units.metrics`; nothing here
re-scores a model.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from mda.core.config import Params
from mda.evaluate.catalysts import decode_samples, domain_enrichment
from mda.evaluate.effects import (arm_summary, icl_coupling, run_effects, targeted_vs_random, transfer,
                                  transfer_summary)
from mda.evaluate.runs import read_runs, target_trajectories
from mda.evaluate.stats import RANK_TEST_MIN_SETS
from mda.evaluate.unit_level import role_summary, unit_level


TABLES = ("effects", "curves", "per_arm", "tests", "transfer", "enrichment", "top_samples", "edit_timing",
          "unit_curves", "unit_effects", "unit_per_arm", "role_moves")


def edit_timing(params: Params, sets: pd.DataFrame, targets: dict, stream, before_step: float) -> pd.DataFrame:
    """Per edited run: its placement (augment arms), rows removed or copies placed (an upweighted
    row counts once per extra copy), copies dropped, and how many edits come before `before_step`
    (the baseline's emergence). An edit made after the head has formed cannot move its
    emergence, so this says how much of each arm could act on it at all."""
    from mda.intervene.arms import build_edit, chosen_sets

    r = params.retrain
    window = (int(targets["window"]["start"]), int(targets["window"]["end"]))
    target = chosen_sets(sets, params, targets)
    # Fixed arms are edited once, with the first seed (as `stages.retrain` does).
    runs = [(arm, r.seeds[0]) for arm in r.fixed_arms if arm != "baseline"] + \
           [(arm, s) for arm in r.random_arms for s in r.seeds]
    rows = []
    for arm, seed in runs:
        edit = build_edit(arm, seed, params, sets, target, stream, window)
        steps = edit.edited_steps()
        rows.append({"arm": arm, "seed": seed, "placement": edit.summary.get("placement", "—"),
                     "edited_rows": len(steps), "dropped": int(edit.summary.get("copies_dropped", 0)),
                     "before_emergence": int((steps < before_step).sum()),
                     "median_step": float(np.median(steps)) if len(steps) else np.nan})
    return pd.DataFrame(rows, columns=["arm", "seed", "placement", "edited_rows", "dropped", "before_emergence",
                                       "median_step"])


def evaluate(params: Params, retrain_dir: str | os.PathLike, targets: dict, sets: pd.DataFrame,
             scores: pd.DataFrame, stream, tokenizer_dir: str | os.PathLike) -> dict:
    """Every table of the evaluation, and `summary` (JSON-ready facts and headline numbers)."""
    from mda.intervene.selection import union_scores
    from mda.intervene.arms import chosen_sets

    ev = params.evaluate
    runs, missing = read_runs(params, retrain_dir)
    window = (int(targets["window"]["start"]), int(targets["window"]["end"]))
    curves = target_trajectories(runs, targets)
    effects = run_effects(curves, window, ev, set(params.retrain.fixed_arms))
    per_arm = arm_summary(effects, ev.confidence)
    tests = targeted_vs_random(effects, ev.seed)
    coupling = icl_coupling(effects)
    heads = transfer(runs, targets, window, ev)
    unit = unit_level(runs, targets, window, ev, set(params.retrain.fixed_arms))

    target = chosen_sets(sets, params, targets)
    window_scores = union_scores(scores) if target == "union" else scores[scores["head"] == target]
    top = sets[sets.set == f"{target}:top"].merge(window_scores[["sample_id", "step", "domain"]],
                                                  on="sample_id", validate="one_to_one")
    enrichment = domain_enrichment(window_scores.domain, top.domain, ev)
    top_rows = top.nsmallest(ev.top_samples, "rank")[["rank", "sample_id", "step", "domain", "score"]]
    emerged = effects[effects.arm == "baseline"].emergence_step.mean()
    edits_before = float(emerged) if np.isfinite(emerged) else float(window[1])  # not formed: all count
    summary = {
        "target": target, "unit": targets["unit"], "metric": targets["metric"],
        "heads": [h["name"] for h in targets["heads"]], "window": list(window),
        "k": int(len(top)), "window_samples": int(len(window_scores)),
        "threshold": ev.threshold, "confidence": ev.confidence,
        "eval_every": params.retrain.eval_every, "seeds": list(params.retrain.seeds),
        "fixed_arms": list(params.retrain.fixed_arms), "random_arms": list(params.retrain.random_arms),
        "missing_runs": missing, "icl_coupling": coupling, "transfer": transfer_summary(heads),
        "edits_before_step": edits_before, "copies": params.retrain.copies,
        "augment_placement": params.retrain.augment_placement, "rank_test_min_sets": RANK_TEST_MIN_SETS,
        "role_margin": ev.role_margin, "role_moved": role_summary(unit["role_moves"]),
    }
    return {"curves": curves, "effects": effects, "per_arm": per_arm, "tests": tests, "transfer": heads,
            "enrichment": enrichment, "top_samples": decode_samples(stream, tokenizer_dir, top_rows),
            "edit_timing": edit_timing(params, sets, targets, stream, edits_before),
            **unit, "summary": summary}


def headline_metrics(result: dict) -> dict:
    """The numbers `dvc metrics show` / `dvc exp show` and MLflow compare across runs."""
    s, effects, per_arm, tests = result["summary"], result["effects"], result["per_arm"], result["tests"]
    base = effects[effects.arm == "baseline"]
    out = {"k": s["k"], "window_start": s["window"][0], "window_end": s["window"][1],
           "missing_runs": len(s["missing_runs"]),
           "baseline": {"emergence_step": base.emergence_step.mean(), "score_end": base.score_end.mean(),
                        "icl_end": base.icl_end.mean()},
           "arms": {}, "targeted_vs_random": {},
           "icl_coupling": {"pearson_r": s["icl_coupling"]["pearson_r"], "p_value": s["icl_coupling"]["p_value"]},
           "transfer_same_kind_over_other": {a: t["same_kind_over_other"] for a, t in s["transfer"].items()},
           "top_domain_enrichment": {}}
    for arm, g in per_arm.groupby("arm", sort=False):
        out["arms"][arm] = {row.effect: {"mean": row.mean, "ci_low": row.ci_low, "ci_high": row.ci_high}
                            for row in g.itertuples() if row.effect in ("delay", "delta_score", "icl_gain")}
    for row in tests.itertuples():  # per targeted arm, per control
        arm = out["targeted_vs_random"].setdefault(row.arm, {}).setdefault(row.control, {})
        arm[f"p_{row.effect}"] = row.p_value  # the test chosen by K
        arm[f"p_rank_{row.effect}"], arm[f"p_t_{row.effect}"] = row.rank_p, row.t_p
        arm["test"], arm["random_sets"] = row.test, row.random_sets
    unit = result["unit_per_arm"]
    out["unit_delay"] = {arm: {row.level: row.mean for row in g[g.effect == "delay"].itertuples()}
                         for arm, g in unit.groupby("arm", sort=False)}
    out["role_moved"] = {arm: v["moved"] for arm, v in s["role_moved"].items()}
    timing = result["edit_timing"].groupby("arm", sort=False)[["before_emergence", "edited_rows"]].sum()
    out["edits_before_emergence_share"] = (timing.before_emergence / timing.edited_rows.clip(lower=1)).to_dict()
    e = result["enrichment"].sort_values("enrichment", ascending=False)
    if len(e):
        out["top_domain_enrichment"] = {"domain": e.domain.iloc[0], "ratio": e.enrichment.iloc[0],
                                        "ci_low": e.ci_low.iloc[0], "ci_high": e.ci_high.iloc[0]}
    return json_ready(out)


def json_ready(obj):
    """NaN/inf → None and numpy scalars → Python (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj
