"""The effects of the counterfactual runs against the baseline: per arm × seed (emergence, window-end
values, the mean score over the window, their differences), per arm (mean and t-interval), targeted
vs random (rank and t-tests, `mda.evaluate.stats`), ICL coupling and transfer to the other heads."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mda.core.config import Evaluate
from mda.evaluate.stats import chosen_test, rank_p, t_interval, t_test_p
from mda.model.heads import Head
from mda.units.metrics import first_crossing

# targeted arm → the sign of the hypothesised effect on emergence delay (+1: later)
DIRECTION = {"remove-top": +1, "augment-top": -1, "augment-synthetic": -1}
# targeted arm → its random controls: drawn uniformly from the window, and with the top set's domain mix
CONTROLS = {"remove-top": ("remove-random", "remove-matched"), "augment-top": ("augment-random", "augment-matched"),
            "augment-synthetic": ("augment-random", "augment-matched")}
COMPARISONS = tuple((arm, control, DIRECTION[arm]) for arm, controls in CONTROLS.items() for control in controls)
"""(targeted arm, control, direction): every test `evaluate` runs and every verdict the report gives."""
EFFECTS = ("delay", "delta_score", "delta_auc", "icl_gain", "delta_heldout_loss")
# The tables `evaluate` writes to data/evaluate/<name>.parquet (next to summary.json).
EFFECT_LABELS = {
    "delay": "emergence delay (steps)",
    "delta_score": "Δ target score at window end",
    "delta_auc": "Δ mean target score over the window",
    "icl_gain": "ICL gain (nats; + = more in-context learning)",
    "delta_heldout_loss": "Δ held-out loss (nats)",
}


# ----------------------------------------------------------------------------- reading the runs


# ----------------------------------------------------------------------------- per arm × seed
def run_effects(curves: pd.DataFrame, window: tuple[int, int], ev: Evaluate,
                trained_once: set[str]) -> pd.DataFrame:
    """One row per arm × seed: emergence, window-end values, mean score over the window, and
    differences from the baseline with the same probe seed (NaN where that baseline is absent)."""
    start, end = window
    at_end = lambda g, col: float(np.interp(end, g.step, g[col]))
    base_end = {s: at_end(g, "target_score") for s, g in curves[curves.arm == "baseline"].groupby("seed")}
    rows = []
    for (arm, seed), g in curves.groupby(["arm", "seed"], sort=False):
        steps = g.step.to_numpy(dtype=float)
        inside = (steps >= start) & (steps <= end)
        level = ev.threshold * base_end.get(seed, float("nan"))
        rows.append({"arm": arm, "seed": int(seed), "trained_once": arm in trained_once,
                     "threshold_level": level,
                     "emergence_step": first_crossing(steps, g.target_score, level),
                     "score_end": at_end(g, "target_score"),
                     "auc": float(np.trapezoid(g.target_score[inside], steps[inside]) / (end - start)),
                     "icl_end": at_end(g, "icl_score"), "heldout_loss_end": at_end(g, "heldout_loss"),
                     "last_step": int(steps.max())})
    table = pd.DataFrame(rows)
    base = table[table.arm == "baseline"].set_index("seed")
    b = lambda col: table.seed.map(base[col])
    table["delay"] = table.emergence_step - b("emergence_step")
    table["delta_score"] = table.score_end - b("score_end")
    table["delta_auc"] = table.auc - b("auc")
    table["icl_gain"] = b("icl_end") - table.icl_end  # the ICL score falls as ICL improves
    table["delta_heldout_loss"] = table.heldout_loss_end - b("heldout_loss_end")
    return table


# ----------------------------------------------------------------------------- per arm
def arm_summary(effects: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """Per non-baseline arm and effect: mean, t-interval over seeds, number of seeds (and of runs
    that never reached the emergence threshold), and what the interval measures (`interval`):
    `probe` for an arm trained once (one model scored with each seed's probe: probe noise only),
    `models` for an arm trained per seed (one model each: between-model spread)."""
    rows = []
    for arm, g in effects[effects.arm != "baseline"].groupby("arm", sort=False):
        interval = "probe" if g.trained_once.all() else "models"
        for effect in EFFECTS:
            mean, low, high = t_interval(g[effect], confidence)
            rows.append({"arm": arm, "effect": effect, "mean": mean, "ci_low": low, "ci_high": high,
                         "seeds": int(g[effect].notna().sum()), "interval": interval,
                         "not_emerged": int(g.emergence_step.isna().sum())})
    return pd.DataFrame(rows, columns=["arm", "effect", "mean", "ci_low", "ci_high", "seeds", "interval",
                                       "not_emerged"])


def model_values(effects: pd.DataFrame, arm: str, effect: str) -> np.ndarray:
    """One value per trained model of `arm`: an arm trained once → the mean over its probe seeds
    (one model); a seeded arm → one value per seed (one model each). NaN models dropped."""
    g = effects[effects.arm == arm]
    model = np.where(g.trained_once, -1, g.seed)
    return g.groupby(model)[effect].mean().dropna().to_numpy(dtype=float)


def targeted_vs_random(effects: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """For each targeted arm, each of its random controls present (`COMPARISONS`) and each effect:
    the targeted arm's models (m: 1 when trained once, else one per seed) against the K random
    sets, one-sided in the hypothesised direction, by the rank test and the t-test (`mda.evaluate.stats`);
    `p_value` is the one `chosen_test(K)` picks."""
    rows = []
    for arm, control, sign in COMPARISONS:
        if not (effects.arm == arm).any() or not (effects.arm == control).any():
            continue
        for effect in ("delay", "delta_auc", "delta_score"):
            # delay: remove-top should delay (+), augment arms advance (−); scores the opposite way
            direction = sign if effect == "delay" else -sign
            targeted, null = model_values(effects, arm, effect), model_values(effects, control, effect)
            p_rank, min_p = rank_p(targeted, null, direction, seed)
            t, df, p_t = t_test_p(targeted, null, direction)
            test = chosen_test(len(null))
            nan = float("nan")
            rows.append({"arm": arm, "control": control, "effect": effect, "direction": direction,
                         "targeted": float(targeted.mean()) if len(targeted) else nan,
                         "targeted_models": int(len(targeted)),
                         "random_mean": float(null.mean()) if len(null) else nan,
                         "random_sd": float(null.std(ddof=1)) if len(null) > 1 else nan,
                         "random_sets": int(len(null)), "rank_p": p_rank, "rank_min_p": min_p,
                         "t": t, "df": int(df), "t_p": p_t, "test": test,
                         "p_value": p_rank if test == "rank" else p_t})
    return pd.DataFrame(rows)


def icl_coupling(effects: pd.DataFrame) -> dict:
    """Does in-context learning move with the head? Pearson r between Δ target score and ICL
    gain at the window end over trained models (an arm trained once counts once, its probe
    seeds averaged), with a one-sided p for r > 0; and per arm the share of its trained models
    in which both move the same way (an arm trained once: one model, so 0 or 1)."""
    from scipy import stats

    e = effects[(effects.arm != "baseline")].dropna(subset=["delta_score", "icl_gain"])
    model = np.where(e.trained_once, -1, e.seed)
    points = e.assign(model=model).groupby(["arm", "model"], sort=False)[["delta_score", "icl_gain"]].mean()
    r = p = float("nan")
    if len(points) >= 3 and points.delta_score.std() > 0 and points.icl_gain.std() > 0:
        r, p = (float(v) for v in stats.pearsonr(points.delta_score, points.icl_gain, alternative="greater"))
    same_way = np.sign(points.delta_score) == np.sign(points.icl_gain)
    agree = {arm: float(g.mean()) for arm, g in same_way.groupby(level="arm", sort=False)}
    models = {arm: int(n) for arm, n in same_way.groupby(level="arm", sort=False).size().items()}
    return {"pearson_r": r, "p_value": p, "models": int(len(points)), "sign_agreement": agree,
            "models_per_arm": models}


# ----------------------------------------------------------------------------- every head at the window end
def window_end_scores(runs: pd.DataFrame, metric: str, end: int) -> pd.DataFrame:
    """arm, seed, layer, head, score_end: every head's `metric` at the window end (interpolated)."""
    return runs.groupby(["arm", "seed", "layer", "head"], sort=False) \
        .apply(lambda g: float(np.interp(end, g.step, g[metric])), include_groups=False) \
        .rename("score_end").reset_index()


def transfer(runs: pd.DataFrame, targets: dict, window: tuple[int, int], ev: Evaluate) -> pd.DataFrame:
    """Per arm and head: the head's score at the window end minus the baseline's (same probe
    seed), mean and interval over seeds, and its kind: `target`, `same_kind` (another head of
    the unit's kind: baseline window-end score ≥ `same_kind_score`) or `other`."""
    ends = window_end_scores(runs, targets["metric"], window[1])
    base = ends[ends.arm == "baseline"].set_index(["seed", "layer", "head"]).score_end
    ends["delta"] = ends.score_end - base.reindex(pd.MultiIndex.from_frame(ends[["seed", "layer", "head"]])).to_numpy()
    base_mean = base.groupby(["layer", "head"]).mean()
    target_names = {h["name"] for h in targets["heads"]}
    rows = []
    for (arm, layer, head), g in ends[ends.arm != "baseline"].groupby(["arm", "layer", "head"], sort=False):
        name = Head(int(layer), int(head)).name
        mean, low, high = t_interval(g.delta, ev.confidence)
        b = float(base_mean.loc[(layer, head)])
        kind = "target" if name in target_names else ("same_kind" if b >= ev.same_kind_score else "other")
        rows.append({"arm": arm, "head": name, "layer": int(layer), "head_index": int(head), "kind": kind,
                     "baseline_end": b, "delta_mean": mean, "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows)


def transfer_summary(table: pd.DataFrame) -> dict:
    """Per arm: mean |Δ| over target, same-kind and other heads, and same-kind / other."""
    out = {}
    for arm, g in table.groupby("arm", sort=False):
        size = {kind: float(g[g.kind == kind].delta_mean.abs().mean()) if (g.kind == kind).any() else float("nan")
                for kind in ("target", "same_kind", "other")}
        ratio = size["same_kind"] / size["other"] if size["other"] > 0 else float("nan")
        out[arm] = {**{f"abs_delta_{k}": v for k, v in size.items()}, "same_kind_over_other": ratio,
                    "same_kind_heads": int((g.kind == "same_kind").sum()), "other_heads": int((g.kind == "other").sum())}
    return out


# ----------------------------------------------------------------------------- the unit, not only the head


# ----------------------------------------------------------------------------- catalysts


# ----------------------------------------------------------------------------- when the edits happen


# ----------------------------------------------------------------------------- the whole evaluation


