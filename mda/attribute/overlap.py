"""How much the selection depends on the probe draw: the same window scored with several draws of
the probe's random sequences (`influence.probe_seed` and `influence.overlap_seeds`), and the
pairwise agreement of their top-k sets.

Top-k is `select`'s rule (highest score first, ties by the lower sample_id), with k as `select`
chooses it (`mda.intervene.edits.set_size`). Overlap of two draws = |top-k(a) ∩ top-k(b)| / k.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr


def seed_column(seed: int) -> str:
    """The score column of the probe draw with seed `seed` (the main draw's column is `score`)."""
    return f"score_seed{seed}"


def top_k(scores: np.ndarray, sample_ids: np.ndarray, k: int) -> np.ndarray:
    """The k sample ids with the highest scores (ties: lower sample_id first), as `select` picks them."""
    return sample_ids[np.lexsort((sample_ids, -scores))[:k]]


def draw_agreement(frame: pd.DataFrame, columns: dict[str, str], k: int) -> dict:
    """Pairwise top-k overlap and Spearman correlation between probe draws.

    `frame`: one row per sample with a `sample_id` column and one score column per draw;
    `columns`: draw label (e.g. "seed 2") → its score column. Returns the pairs and their
    mean/min overlap and mean Spearman (NaN with fewer than two draws)."""
    ids = frame.sample_id.to_numpy()
    tops = {label: set(top_k(frame[col].to_numpy(), ids, k).tolist()) for label, col in columns.items()}
    pairs = [{"a": a, "b": b, "overlap": len(tops[a] & tops[b]) / k,
              "spearman": float(spearmanr(frame[columns[a]], frame[columns[b]]).statistic)}
             for a, b in combinations(columns, 2)]
    overlaps = [p["overlap"] for p in pairs]
    return {"k": int(k), "draws": list(columns), "pairs": pairs,
            "overlap_mean": float(np.mean(overlaps)) if pairs else float("nan"),
            "overlap_min": float(np.min(overlaps)) if pairs else float("nan"),
            "spearman_mean": float(np.mean([p["spearman"] for p in pairs])) if pairs else float("nan")}
