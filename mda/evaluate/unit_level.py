"""The unit-level view: was the *function* delayed, or did it form in another head?

A per-head emergence metric cannot tell "the function formed later" from "the function formed in
another head". Next to the target head, every arm × seed × step gets three levels of the unit's
metric, all read from the trajectories `retrain` wrote (every head is scored there; nothing is
re-scored):

- `head`: the target head's score (the mean over the target heads, as everywhere else);
- `layer`: the best score among the heads of the target heads' layer(s);
- `model`: the best score among all heads of the model.

`evaluate` gives each level its own emergence step and delay with the same rule as the target
head's (threshold × the baseline's window-end value *of that level*, same probe seed).

**Role moved** (a fixed rule): in one arm × seed, the role moved from target head T to head H when
1. T's window-end score is below its emergence level (threshold × the baseline's window-end
   score of T, same probe seed) — T did not form by the window end;
2. H is another head of T's layer (not a target) whose window-end score is at or above that level;
3. H's window-end score exceeds H's own baseline window-end score (same probe seed) by more than
   `evaluate.role_margin` — H rose, it was not simply there all along.
"""

from __future__ import annotations

import pandas as pd

from mda.core.config import Evaluate
from mda.evaluate.effects import arm_summary, run_effects, window_end_scores
from mda.model.heads import Head

LEVELS = ("head", "layer", "model")
LEVEL_LABELS = {"head": "target head", "layer": "best head of the target's layer", "model": "best head of the model"}


def unit_trajectories(runs: pd.DataFrame, targets: dict) -> pd.DataFrame:
    """arm, seed, step, level, score, best_head (the head holding the level's score; the target
    heads for `head`), icl_score, heldout_loss — one row per arm × seed × step × level."""
    metric = targets["metric"]
    names = {(h["layer"], h["head"]) for h in targets["heads"]}
    keys = ["arm", "seed", "step"]
    is_target = pd.Series([(l, h) in names for l, h in zip(runs.layer, runs["head"])], index=runs.index)
    head = runs[is_target].groupby(keys, as_index=False, sort=False) \
        .agg(score=(metric, "mean"), icl_score=("icl_score", "first"), heldout_loss=("heldout_loss", "first")) \
        .assign(level="head", best_head="+".join(Head(l, h).name for l, h in sorted(names)))
    parts = [head]
    for level, rows in (("layer", runs[runs.layer.isin({l for l, _ in names})]), ("model", runs)):
        best = rows.loc[rows.groupby(keys, sort=False)[metric].idxmax()]
        parts.append(pd.DataFrame({"arm": best.arm.to_numpy(), "seed": best.seed.to_numpy(),
                                   "step": best.step.to_numpy(), "score": best[metric].to_numpy(),
                                   "icl_score": best.icl_score.to_numpy(), "heldout_loss": best.heldout_loss.to_numpy(),
                                   "level": level,
                                   "best_head": [Head(int(l), int(h)).name for l, h in zip(best.layer, best["head"])]}))
    cols = ["arm", "seed", "step", "level", "score", "best_head", "icl_score", "heldout_loss"]
    return pd.concat(parts, ignore_index=True)[cols]


def role_moves(ends: pd.DataFrame, targets: dict, threshold: float, margin: float) -> pd.DataFrame:
    """Per non-baseline arm × seed × target head: the target's window-end score and emergence
    level, the other head of its layer that rose most over its baseline (the rival), and
    `moved_to`: the heads that meet the role-moved rule (empty when none).
    `ends`: arm, seed, layer, head, score_end (every head at the window end)."""
    base = ends[ends.arm == "baseline"].set_index(["seed", "layer", "head"]).score_end
    target_keys = {(h["layer"], h["head"]) for h in targets["heads"]}
    rows = []
    for (arm, seed), g in ends[ends.arm != "baseline"].groupby(["arm", "seed"], sort=False):
        at_end = g.set_index(["layer", "head"]).score_end
        for t in targets["heads"]:
            key = (seed, t["layer"], t["head"])
            if key not in base.index or (t["layer"], t["head"]) not in at_end.index:
                continue
            level = threshold * float(base[key])
            target_end = float(at_end[(t["layer"], t["head"])])
            others = [(l, h) for l, h in at_end.index if l == t["layer"] and (l, h) not in target_keys
                      and (seed, l, h) in base.index]
            rise = {o: float(at_end[o]) - float(base[(seed, *o)]) for o in others}
            moved = [o for o in others if target_end < level and at_end[o] >= level and rise[o] > margin]
            rival = max(others, key=lambda o: rise[o]) if others else None
            rows.append({"arm": arm, "seed": int(seed), "target": t["name"], "target_end": target_end,
                         "level": level, "rival": Head(*map(int, rival)).name if rival else None,
                         "rival_end": float(at_end[rival]) if rival else float("nan"),
                         "rival_baseline_end": float(base[(seed, *rival)]) if rival else float("nan"),
                         "moved_to": ", ".join(Head(int(l), int(h)).name for l, h in moved)})
    return pd.DataFrame(rows, columns=["arm", "seed", "target", "target_end", "level", "rival", "rival_end",
                                       "rival_baseline_end", "moved_to"])


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
