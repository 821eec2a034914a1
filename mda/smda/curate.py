"""Curation by influence score, random controls, and the check against the ground truth.

Rules (params `smda.curate.rule`):
- `median` (SMDA's quantitative rule): drop harmful pairs whose score is below the median
  score of the harmless pairs, and harmless pairs whose score is above the median of the
  harmful pairs. It assumes harmful pairs score higher than harmless ones.
- `oriented`: the same two medians, with the direction read from the declared classes
  (never from the ground truth): if the harmful pairs' median is below the harmless pairs',
  drop harmful pairs *above* the harmless median and harmless pairs *below* the harmful one —
  in both cases, the pairs that score like the other class. Identical to `median` when the
  classes are ordered as it assumes.
A random control removes the same number of pairs *per class*, drawn uniformly, so it differs
from the rule only in which pairs it picks. Precision and recall of a removal are measured
against the known mislabelled pairs; the rule is compared with `random_draws` random removals.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


RULES = ("median", "oriented")


def removal_rule(scores: pd.DataFrame, rule: str) -> np.ndarray:
    """Boolean per row of `scores` (`harmful`, `score`): removed by `rule` (see the module doc)."""
    harmful = scores.harmful.to_numpy(bool)
    s = scores.score.to_numpy(float)
    med_pos, med_neg = np.median(s[harmful]), np.median(s[~harmful])
    sign = -1.0 if rule == "oriented" and med_pos < med_neg else 1.0
    return (harmful & (sign * s < sign * med_neg)) | (~harmful & (sign * s > sign * med_pos))


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
