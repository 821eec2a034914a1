"""Stage `evaluate`: did the selected data cause the unit?

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
from pathlib import Path

import numpy as np
import pandas as pd

from mda.core.config import Evaluate, Params
from mda.core.errors import MdaError
from mda.model.heads import Head
from mda.intervene.arms import ARMS
from mda.evaluate.stats import RANK_TEST_MIN_SETS, chosen_test, rank_p, t_interval, t_test_p
from mda.evaluate.unit_level import LEVELS, role_moves, unit_trajectories
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
TABLES = ("effects", "curves", "per_arm", "tests", "transfer", "enrichment", "top_samples", "edit_timing",
          "unit_curves", "unit_effects", "unit_per_arm", "role_moves")
EFFECT_LABELS = {
    "delay": "emergence delay (steps)",
    "delta_score": "Δ target score at window end",
    "delta_auc": "Δ mean target score over the window",
    "icl_gain": "ICL gain (nats; + = more in-context learning)",
    "delta_heldout_loss": "Δ held-out loss (nats)",
}


# ----------------------------------------------------------------------------- reading the runs
def expected_runs(params: Params) -> list[tuple[str, int, str]]:
    """(arm, seed, directory name) of every run the retrain matrix defines."""
    r = params.retrain
    return [(arm, s, arm) for arm in r.fixed_arms for s in r.seeds] + \
           [(arm, s, f"{arm}-{s}") for arm in r.random_arms for s in r.seeds]


def read_runs(params: Params, retrain_dir: str | os.PathLike) -> tuple[pd.DataFrame, list[str]]:
    """All present trajectories with `arm` and `seed` columns, and the runs that are missing
    (named `<arm> seed <s>`). A missing run is reported, never filled in; an unreadable one is
    an error naming its file."""
    parts, missing, cache = [], [], {}
    for arm, seed, name in expected_runs(params):
        path = Path(retrain_dir) / name / "trajectory.parquet"
        if path not in cache:
            if not path.is_file():
                cache[path] = None
            else:
                try:
                    cache[path] = pd.read_parquet(path)
                except Exception as err:  # pyarrow raises several types for a damaged file
                    raise MdaError(f"{path}: unreadable trajectory ({type(err).__name__})") from None
        table = cache[path]
        rows = None if table is None else table[table.seed == seed]
        if rows is None or rows.empty:
            missing.append(f"{arm} seed {seed}")
            continue
        parts.append(rows.assign(arm=arm))
    if not parts:
        raise MdaError(f"{retrain_dir}: no retrain runs found; run the retrain stages")
    runs = pd.concat(parts, ignore_index=True)
    order = runs.arm.map({arm: i for i, arm in enumerate(ARMS)})  # tables and figures in ARMS order
    runs = runs.assign(_order=order).sort_values(["_order", "seed", "step"], kind="stable") \
        .drop(columns="_order").reset_index(drop=True)
    if "baseline" not in set(runs.arm):
        raise MdaError(f"{Path(retrain_dir) / 'baseline'}: missing; every effect is measured "
                       "against the baseline run")
    return runs, missing


def target_trajectories(runs: pd.DataFrame, targets: dict) -> pd.DataFrame:
    """arm, seed, step, target score (mean over target heads), ICL score, held-out loss."""
    names = {(h["layer"], h["head"]) for h in targets["heads"]}
    mask = [(l, h) in names for l, h in zip(runs.layer, runs["head"])]
    return runs[mask].groupby(["arm", "seed", "step"], as_index=False, sort=False) \
        .agg(target_score=(targets["metric"], "mean"), icl_score=("icl_score", "first"),
             heldout_loss=("heldout_loss", "first"))


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
def unit_level(runs: pd.DataFrame, targets: dict, window: tuple[int, int], ev: Evaluate,
               trained_once: set[str]) -> dict:
    """The `mda.evaluate.unit_level` levels as tables: `unit_curves` (per step), `unit_effects` (per arm ×
    seed × level: emergence, delay, … and the level's best head at the window end),
    `unit_per_arm` (delay and Δ score per arm × level, mean and interval over seeds) and
    `role_moves` (per arm × seed × target head)."""
    curves = unit_trajectories(runs, targets)
    end = window[1]
    parts, summaries = [], []
    for level in LEVELS:
        g = curves[curves.level == level].drop(columns="level").rename(columns={"score": "target_score"})
        effects = run_effects(g, window, ev, trained_once)
        last = g[g.step <= end].sort_values("step").groupby(["arm", "seed"], sort=False).best_head.last()
        effects["best_head_end"] = [last.get((a, s)) for a, s in zip(effects.arm, effects.seed)]
        parts.append(effects.assign(level=level))
        summary = arm_summary(effects, ev.confidence)
        summaries.append(summary[summary.effect.isin(["delay", "delta_score"])].assign(level=level))
    ends = window_end_scores(runs, targets["metric"], end)
    return {"unit_curves": curves, "unit_effects": pd.concat(parts, ignore_index=True),
            "unit_per_arm": pd.concat(summaries, ignore_index=True),
            "role_moves": role_moves(ends, targets, ev.threshold, ev.role_margin)}


def role_summary(moves: pd.DataFrame) -> dict:
    """Per arm: runs (arm × seed × target head) checked, runs where the role moved, and to which heads."""
    out = {}
    for arm, g in moves.groupby("arm", sort=False):
        moved = g[g.moved_to != ""]
        out[arm] = {"runs": int(len(g)), "moved": int(len(moved)),
                    "to": sorted({h for v in moved.moved_to for h in v.split(", ")})}
    return out


# ----------------------------------------------------------------------------- catalysts
def domain_enrichment(window_domains: pd.Series, top_domains: pd.Series, ev: Evaluate) -> pd.DataFrame:
    """Per domain: share of the top-k set, share of the window, their ratio, and a percentile
    bootstrap interval of the ratio (both samples resampled: multinomial draws of their counts)."""
    domains = sorted(set(window_domains))
    n, k = len(window_domains), len(top_domains)
    win = window_domains.value_counts().reindex(domains, fill_value=0).to_numpy()
    top = top_domains.value_counts().reindex(domains, fill_value=0).to_numpy()
    rng = np.random.default_rng([ev.seed, 11])
    win_b = rng.multinomial(n, win / n, size=ev.bootstrap) / n
    top_b = rng.multinomial(k, top / k, size=ev.bootstrap) / k
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio_b = top_b / win_b
    tail = (1 - ev.confidence) / 2 * 100
    low, high = np.nanpercentile(ratio_b, [tail, 100 - tail], axis=0)
    return pd.DataFrame({"domain": domains, "window_count": win, "top_count": top,
                         "window_share": win / n, "top_share": top / k,
                         "enrichment": (top / k) / (win / n), "ci_low": low, "ci_high": high})


def decode_samples(stream, tokenizer_dir: str | os.PathLike, samples: pd.DataFrame) -> pd.DataFrame:
    """`samples` (sample_id, step, …) with the row's text decoded by the corpus tokenizer and
    `pieces`, the text of each of the row's tokens (`token_pieces`; both None where the corpus has
    no tokenizer)."""
    if samples.empty:
        return samples.assign(text=pd.Series(dtype=object), pieces=pd.Series(dtype=object))
    table = pd.concat([stream.read(int(s), int(s), columns=["sample_id", "input_ids"]).to_pandas()
                       for s in sorted(set(samples.step))], ignore_index=True)
    ids = dict(zip(table.sample_id, table.input_ids))
    tokenizer = None
    if (Path(tokenizer_dir) / "tokenizer.json").is_file() or (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    text = [tokenizer.decode(list(ids[s])) if tokenizer is not None else None for s in samples.sample_id]
    pieces = [token_pieces(tokenizer, list(ids[s])) if tokenizer is not None else None for s in samples.sample_id]
    return samples.assign(text=text, pieces=pieces)


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text, such that joined they read as the decoded row: a word-level vocabulary
    decodes tokens on their own and joins them with spaces, so there each piece but the last
    carries its space."""
    pieces = [tokenizer.decode([i]) for i in ids]
    if "".join(pieces) != tokenizer.decode(ids):
        pieces = [p + " " for p in pieces[:-1]] + pieces[-1:]
    return pieces


# ----------------------------------------------------------------------------- when the edits happen
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


# ----------------------------------------------------------------------------- the whole evaluation
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
