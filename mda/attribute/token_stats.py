"""Token-level attribution, the tables' side (pandas only): one target's per-token contributions
(a head's, or the union's combination), the share of positive influence on induction-predictable
positions, and how exactly the split sums to the scores. The split itself and what a position's
contribution means: `mda.attribute.tokens`."""

from __future__ import annotations

import pandas as pd


def target_contributions(tokens: pd.DataFrame, scores: pd.DataFrame, target: str) -> pd.DataFrame:
    """The rows' contributions to `target`'s score: a head's own, or for `union` (score = mean over
    heads of score / that head's std, `mda.intervene.edits.union_scores`) the same combination of the
    heads' contributions — still summing exactly to the sample's union score. One row per (set,
    sample, position)."""
    if target != "union":
        return tokens[tokens["head"] == target].drop(columns="head").reset_index(drop=True)
    std = scores.groupby("head").score.std()
    scaled = tokens.assign(contribution=tokens.contribution / tokens["head"].map(std))
    keys = ["set", "sample_id", "position", "token", "next_token", "predictable"]
    return scaled.groupby(keys, as_index=False, sort=True).contribution.mean()


def predictable_share(tokens: pd.DataFrame) -> dict:
    """Over `tokens` (one target's contributions): how much of the positive influence sits on
    induction-predictable positions, against their share of the positions.
    `positive_on_predictable` = Σ max(c, 0) over predictable positions / Σ max(c, 0) over all;
    `per_token_ratio` = mean max(c, 0) on a predictable position / mean on any other."""
    pos = tokens.contribution.clip(lower=0)
    pred = tokens.predictable.to_numpy(bool)
    total = pos.sum()
    mean_other = pos[~pred].mean() if (~pred).any() else float("nan")
    return {"samples": int(tokens.sample_id.nunique()), "positions": int(len(tokens)),
            "predictable_positions": float(pred.mean()) if len(pred) else float("nan"),
            "positive_on_predictable": float(pos[pred].sum() / total) if total > 0 else float("nan"),
            "positive_on_other": float(pos[~pred].sum() / total) if total > 0 else float("nan"),
            "per_token_ratio": float(pos[pred].mean() / mean_other) if pred.any() and mean_other > 0
            else float("nan")}


def sum_check(tokens: pd.DataFrame, scores: pd.DataFrame) -> float:
    """max |Σ_t c_t − score| / max |score| over the split samples and heads: the token split against
    the scores table (stored gradients are rounded to the cache's dtype, so ≈ 1e-7 in float32)."""
    sums = tokens.drop_duplicates(["head", "sample_id", "position"]).groupby(["head", "sample_id"]).contribution.sum()
    ref = scores.set_index(["head", "sample_id"]).score
    joined = pd.concat([sums, ref], axis=1, join="inner")
    return float((joined.contribution - joined.score).abs().max() / ref.abs().max())


def token_metrics(tokens, scores, n: int) -> dict:
    """Per target (each head; `union` with several), the predictable-token shares of its top-n and
    of the random samples, and the split's largest deviation from the scores."""
    targets = sorted(t.removeprefix("top:") for t in tokens.set.unique() if t.startswith("top:"))
    out = {"samples_per_set": n, "sum_check_max_rel": sum_check(tokens, scores), "targets": {}}
    for target in targets:
        rows = target_contributions(tokens, scores, target)
        out["targets"][target] = {"top": predictable_share(rows[rows.set == f"top:{target}"]),
                                  "random": predictable_share(rows[rows.set == "random"])}
    return out
