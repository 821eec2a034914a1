"""Curation by influence score, random controls, and the check against the ground truth.

Rules (params `smda.curate.rules`; `smda.curate.rule` picks the one the plain `curated` set uses).
On the pair's score (ΔX + ΔY pathways summed):
- `median` (SMDA's published rule): drop harmful pairs whose score is below the median score of
  the harmless pairs, and harmless pairs whose score is above the median of the harmful pairs.
  It assumes harmful pairs score higher than harmless ones.
- `oriented`: the same two medians, with the direction read from the declared classes (never
  from the ground truth): if the harmful pairs' median is below the harmless pairs', drop harmful
  pairs *above* the harmless median and harmless pairs *below* the harmful one. Added after
  seeing the quick preset's scores: an ablation, not a confirmatory rule.
- `median_harmful`: `median`'s flags on the harmful side only (the authors acted only on those,
  through a human review).
- `sign` (declared before any of its results): drop every pair whose score is negative — its
  one-step update moves the policy *against* the coefficients that encode the behaviour.
- `within_class` (declared before any of its results): per class, drop the pairs scoring below
  that class's own median minus one median absolute deviation — a robust within-class outlier rule
  that never compares one class with the other.
Baselines, to show what the SAE and the ridge policy add — `sign` and `within_class` on another
per-pair statistic (`statistic`): `*_loss` on −loss, the pair's own SFT loss under the instruct
model (high loss: the model disagrees with the pair); a loss has no natural zero, so `sign_loss`
centres −loss at its median over all SFT pairs; `*_dy` on the ΔY pathway's score alone.

A random control removes the same number of pairs *per class*, drawn uniformly, so it differs
from the rule only in which pairs it picks. Precision and recall of a removal are measured
against the known mislabelled pairs; the rule is compared with `random_draws` random removals.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

RULES = ("median", "oriented", "sign", "within_class", "median_harmful", "sign_loss", "within_class_loss",
         "sign_dy", "within_class_dy")
DECLARED_IN_ADVANCE = ("sign", "within_class", "median_harmful", "sign_loss", "within_class_loss", "sign_dy",
                       "within_class_dy")
"""Rules fixed (issue 22) before any of their results existed; `median` is the published rule and
`oriented` an ablation chosen after seeing scores."""


def statistic(scores: pd.DataFrame, rule: str) -> np.ndarray:
    """The per-pair number `rule` reads: `score`; −`loss` (`*_loss`; centred at its median for
    `sign_loss`); or `score_y` (`*_dy`)."""
    if rule.endswith("_loss"):
        s = -scores.loss.to_numpy(float)
        return s - np.median(s) if rule == "sign_loss" else s
    if rule.endswith("_dy"):
        return scores.score_y.to_numpy(float)
    return scores.score.to_numpy(float)


def removal_rule(scores: pd.DataFrame, rule: str) -> np.ndarray:
    """Boolean per row of `scores` (`harmful`, `score`, `score_y`, `loss`): removed by `rule`
    (see the module doc)."""
    harmful = scores.harmful.to_numpy(bool)
    s = statistic(scores, rule)
    if rule in ("median", "oriented", "median_harmful"):
        med_pos, med_neg = np.median(s[harmful]), np.median(s[~harmful])
        sign = -1.0 if rule == "oriented" and med_pos < med_neg else 1.0
        flagged_harmful = harmful & (sign * s < sign * med_neg)
        if rule == "median_harmful":
            return flagged_harmful
        return flagged_harmful | (~harmful & (sign * s > sign * med_pos))
    if rule.startswith("sign"):
        return s < 0
    if rule.startswith("within_class"):
        removed = np.zeros(len(s), dtype=bool)
        for cls in (True, False):
            rows = harmful == cls
            if rows.any():
                med = np.median(s[rows])
                mad = np.median(np.abs(s[rows] - med))
                removed |= rows & (s < med - mad)
        return removed
    raise ValueError(f"unknown curation rule {rule!r}")


def pathway_shares(scores: pd.DataFrame, removed: np.ndarray) -> dict:
    """How the removed pairs' scores split over the pathways: Σ|ΔX score| / (Σ|ΔX| + Σ|ΔY|) over
    the removed and over the kept pairs, and the mean ΔX and ΔY scores of each."""
    x, y = scores.score_x.to_numpy(float), scores.score_y.to_numpy(float)
    out = {}
    for name, rows in (("removed", removed), ("kept", ~removed)):
        total = np.abs(x[rows]).sum() + np.abs(y[rows]).sum()
        out[name] = {"pairs": int(rows.sum()), "x_share": float(np.abs(x[rows]).sum() / total) if total > 0 else float("nan"),
                     "mean_score_x": float(x[rows].mean()) if rows.any() else float("nan"),
                     "mean_score_y": float(y[rows].mean()) if rows.any() else float("nan")}
    return out


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + ½P(tie): 1 or 0 is a perfect ranking in
    one direction or the other, ½ is none (the Mann–Whitney statistic, by explicit comparison)."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def random_removal(harmful: np.ndarray, counts: dict[bool, int], draw: int) -> np.ndarray:
    """Boolean removal of `counts[cls]` pairs of each class, uniformly at random (draw `draw`)."""
    rng = np.random.default_rng([draw, 13])
    removed = np.zeros(len(harmful), dtype=bool)
    for cls in (True, False):
        rows = np.flatnonzero(harmful == cls)
        removed[rng.choice(rows, size=counts[cls], replace=False)] = True
    return removed


def class_counts(harmful: np.ndarray, removed: np.ndarray) -> dict[bool, int]:
    return {cls: int((removed & (harmful == cls)).sum()) for cls in (True, False)}


def precision_recall(removed: np.ndarray, mislabelled: np.ndarray) -> tuple[float, float]:
    """(precision, recall) of the removed pairs against the mislabelled ones (NaN when undefined)."""
    hits = int((removed & mislabelled).sum())
    precision = hits / removed.sum() if removed.sum() else float("nan")
    recall = hits / mislabelled.sum() if mislabelled.sum() else float("nan")
    return float(precision), float(recall)


def against_truth(harmful: np.ndarray, removed: np.ndarray, mislabelled: np.ndarray, draws: int) -> dict:
    """The rule's precision/recall, the random removals' distribution of both, and one-sided
    p-values p = (1 + #draws at least as good) / (1 + draws)."""
    precision, recall = precision_recall(removed, mislabelled)
    counts = class_counts(harmful, removed)
    null = np.array([precision_recall(random_removal(harmful, counts, d), mislabelled) for d in range(draws)])
    out = {"precision": precision, "recall": recall, "random_draws": draws,
           "base_rate": float(mislabelled.mean())}
    for i, name in enumerate(("precision", "recall")):
        values = null[:, i]
        out[f"random_{name}_mean"] = float(np.nanmean(values))
        out[f"random_{name}_low"], out[f"random_{name}_high"] = (float(q) for q in np.nanquantile(values, [0.025, 0.975]))
        value = out[name]
        out[f"p_{name}"] = float((1 + np.sum(values >= value - 1e-12)) / (1 + draws)) if np.isfinite(value) else float("nan")
    return out
