"""Which samples the arms edit (stage `select`): k by score (top, bottom), and the random
controls — uniform over the window (`random-<seed>`) and with the top set's domain mix
(`matched-<seed>`), both drawn independently of the scores."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mda.core.errors import MdaError


def set_size(window_samples: int, fraction: float, count: int | None) -> int:
    k = count if count is not None else int(round(fraction * window_samples))
    if not 1 <= k <= window_samples:
        raise MdaError(f"select: k = {k} samples, but the window holds {window_samples}"
                       + (" (select.count)" if count is not None else " (select.fraction)"))
    return k


def union_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """One score per sample over several target heads: the mean of each head's scores divided
    by that head's standard deviation (heads with larger raw scales do not dominate)."""
    z = scores.assign(score=scores.score / scores.groupby("head").score.transform("std"))
    return z.groupby(["sample_id", "step", "domain"], as_index=False).score.mean().assign(head="union")


def select_sets(scores: pd.DataFrame, k: int, seeds: list[int], union: bool) -> pd.DataFrame:
    """Rows (set, target, sample_id, rank, score): per target, `<target>:top` and
    `<target>:bottom` (k by score), and per seed `<target>:random-<seed>` (k drawn uniformly from
    the window) and `<target>:matched-<seed>` (`domain_matched`: the top set's domain mix), both
    drawn over the window in sample-id order (independent of the scores) and ranked by score for
    display."""
    groups = {h: g for h, g in scores.groupby("head")}
    if union and len(groups) > 1:
        groups["union"] = union_scores(scores)
    parts = []
    for target, g in groups.items():
        g = g.sort_values(["score", "sample_id"], ascending=[False, True], ignore_index=True)
        picks = {"top": g.head(k), "bottom": g.tail(k).iloc[::-1]}
        # Random draws are made over the window in sample-id order, so that they do not depend on
        # the scores: every estimator (and every probe draw) is compared with the same random sets.
        by_id = g.sort_values("sample_id", ignore_index=True)
        by_score = lambda rows: rows.sort_values(["score", "sample_id"], ascending=[False, True])
        for seed in seeds:
            rng = np.random.default_rng([seed, 7])
            picks[f"random-{seed}"] = by_score(by_id.iloc[rng.choice(len(by_id), size=k, replace=False)])
            picks[f"matched-{seed}"] = by_score(by_id.iloc[domain_matched(by_id.domain.to_numpy(),
                                                                          picks["top"].domain, seed)])
        for name, rows in picks.items():
            parts.append(pd.DataFrame({"set": f"{target}:{name}", "target": target,
                                       "sample_id": rows.sample_id.to_numpy(),
                                       "rank": np.arange(1, len(rows) + 1, dtype=np.int32),
                                       "score": rows.score.to_numpy()}))
    return pd.concat(parts, ignore_index=True)


def domain_matched(domains: np.ndarray, top_domains: pd.Series, seed: int) -> np.ndarray:
    """Sorted positions into `domains` (the window's samples) of a random set with the top set's
    domain mix: per domain, as many samples as the top set holds, drawn uniformly within the
    domain (numpy default_rng([seed, 19]), domains in sorted order). The control for "junk rows
    matter" against "these rows matter": 98.6 % of the default's top set is one domain."""
    rng = np.random.default_rng([seed, 19])
    counts = top_domains.value_counts()
    picked = [rng.choice(np.flatnonzero(domains == d), size=int(counts[d]), replace=False)
              for d in sorted(counts.index)]
    return np.sort(np.concatenate(picked)) if picked else np.array([], dtype=np.int64)


def plot_cut(scores, meta, path):
    import numpy as np

    from mda.core import plots

    fig, ax = plots.plt.subplots(figsize=(8, 4.5))
    for head, g in scores.groupby("head"):
        v = np.sort(g.score.to_numpy())[::-1]
        ax.plot(np.arange(1, len(v) + 1), v, lw=1.5, label=head)
    ax.axvline(meta["k"], color="tab:orange", ls="--", label=f"top-k cut (k = {meta['k']})")
    ax.axvline(meta["window_samples"] - meta["k"], color="tab:purple", ls=":", label="bottom-k cut")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("rank (log)")
    ax.set_ylabel("influence score (positive: raises the probe)")
    ax.set_title("Sorted influence of the window's samples")
    ax.legend(fontsize=8)
    plots.save(fig, path)
