"""Subset selection and the stream edits of the retraining arms.

Rules (logged with every run):
- **remove**: a selected sample's loss weight is 0 wherever it occurs in the window; the
  batch keeps its shape and the loss is still divided by the batch's full token count, so
  every other sample's gradient is exactly what it was.
- **augment** (`retrain.augment_placement`; tokens per step stay constant in every placement):
  - `in_place` (default): each of the `copies` copies of a selected sample replaces a randomly
    chosen non-selected row of the *same* step (seeded) — removal's mirror image, with the same
    timing. A step with more copies than non-selected rows drops the rest (counted).
  - `upweight`: the selected row's loss weight becomes 1 + `copies`; nothing else changes. With
    the loss normaliser fixed (all target tokens of the batch), that is exactly the gradient of
    1 + `copies` copies of the row in its step with every other row kept — the discrete
    counterpart of the upweighting influence functions predict. `in_place` equals it minus the
    replaced rows' contributions.
  - `later`: each copy replaces a non-selected, not-yet-replaced row of a uniformly drawn later
    step of the window (seeded); a sample in the window's last step has no later step and its
    copies are dropped (counted). Most copies land after the unit has formed.
- **augment-synthetic**: the copies are new rows from `motif_rows`, which carry the repeated-
  span structure measured on the top set (span lengths, distances, coverage, token marginal)
  without copying any of its rows; each is placed like a copy of the top-set row it stands for
  (under `upweight`, where a new row has no weight of its own to raise, `in_place`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mda.core.errors import MdaError

ARMS = ("baseline", "remove-top", "remove-random", "remove-matched", "remove-bottom",
        "augment-top", "augment-random", "augment-matched", "augment-synthetic")
SEEDED_ARMS = {"remove-random", "remove-matched", "augment-random", "augment-matched",
               "augment-synthetic"}  # the seed changes the data
PLACEMENTS = ("in_place", "upweight", "later")  # retrain.augment_placement


# ----------------------------------------------------------------------------- selection
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


def arm_set(arm: str, seed: int) -> str | None:
    """Which selected set an arm uses (`None` for baseline)."""
    if arm == "baseline":
        return None
    kind = arm.split("-", 1)[1]
    return f"{kind}-{seed}" if kind in ("random", "matched") else ("top" if kind == "synthetic" else kind)


# ----------------------------------------------------------------------------- stream edits
@dataclass
class StreamEdit:
    """Per step: row weights (None = untouched) and replacement rows {batch_pos: tokens}."""

    weights: dict[int, np.ndarray] = field(default_factory=dict)
    replace: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    def apply(self, step: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if step in self.replace:
            ids = ids.copy()
            for pos, row in self.replace[step].items():
                ids[pos] = row
        return ids, self.weights.get(step)

    def edited_steps(self) -> np.ndarray:
        """The step of every edit, sorted: each removed row (weight 0) once, each upweighted row
        once per extra copy it stands for (weight 1 + c: c times), each placed copy once."""
        steps = []
        for step, w in self.weights.items():
            steps += [step] * (int((w == 0).sum()) + int(np.round(w[w > 1] - 1).sum()))
        steps += [s for s, rows in self.replace.items() for _ in rows]
        return np.sort(np.array(steps, dtype=np.int64))


def removal(stream_rows: pd.DataFrame, selected: set[int], batch_size: int) -> StreamEdit:
    """Zero loss weight for selected samples. `stream_rows`: sample_id, step, batch_pos."""
    edit = StreamEdit()
    hit = stream_rows[stream_rows.sample_id.isin(selected)]
    for step, rows in hit.groupby("step"):
        w = np.ones(batch_size, dtype=np.float32)
        w[rows.batch_pos.to_numpy()] = 0.0
        edit.weights[int(step)] = w
    edit.summary = {"rule": "loss weight 0 for selected samples; batch shape and normaliser unchanged",
                    "masked_rows": int(len(hit)), "steps_touched": len(edit.weights)}
    return edit


def upweighting(stream_rows: pd.DataFrame, selected: set[int], batch_size: int, copies: int) -> StreamEdit:
    """Loss weight 1 + `copies` for selected samples, every other row untouched."""
    edit = StreamEdit()
    hit = stream_rows[stream_rows.sample_id.isin(selected)]
    for step, rows in hit.groupby("step"):
        w = np.ones(batch_size, dtype=np.float32)
        w[rows.batch_pos.to_numpy()] = 1.0 + copies
        edit.weights[int(step)] = w
    edit.summary = {"rule": f"loss weight 1 + {copies} for selected samples in their own step; nothing else "
                            "changes (normaliser: all target tokens of the batch)",
                    "placement": "upweight", "upweighted_rows": int(len(hit)), "copies_placed": int(len(hit)) * copies,
                    "copies_dropped": 0, "steps_touched": len(edit.weights)}
    return edit


def augmentation(stream_rows: pd.DataFrame, sources: list[tuple[int, np.ndarray]], protected: set[int],
                 last_step: int, copies: int, seed: int, placement: str = "in_place") -> StreamEdit:
    """Copies of `sources` (origin step, tokens), each replacing a distinct non-protected row:
    in the origin step (`in_place`) or a uniformly drawn later step ≤ `last_step` (`later`).
    `stream_rows`: sample_id, step, batch_pos."""
    if placement not in ("in_place", "later"):
        raise ValueError(f"augmentation places rows in_place or later, not {placement!r}")
    rng = np.random.default_rng([seed, 11])
    free = stream_rows[~stream_rows.sample_id.isin(protected)]
    slots = {int(s): list(g.batch_pos.to_numpy()) for s, g in free.groupby("step")}
    for s in slots.values():
        rng.shuffle(s)
    edit, dropped = StreamEdit(), 0
    for origin, tokens in sources:
        for _ in range(copies):
            if placement == "in_place":
                steps = [origin] if slots.get(origin) else []
            else:
                steps = [s for s in range(origin + 1, last_step + 1) if slots.get(s)] if origin < last_step else []
            if not steps:
                dropped += 1
                continue
            step = steps[0] if placement == "in_place" else steps[rng.integers(len(steps))]
            edit.replace.setdefault(step, {})[slots[step].pop()] = tokens
    placed = sum(len(v) for v in edit.replace.values())
    where = ("a randomly chosen non-selected row of its own step" if placement == "in_place" else
             "a distinct non-selected row of a uniformly drawn later step of the window")
    edit.summary = {"rule": f"{copies} copy per source, each replacing {where} (tokens per step constant)",
                    "placement": placement, "copies_placed": placed, "copies_dropped": dropped,
                    "steps_touched": len(edit.replace)}
    return edit


# ----------------------------------------------------------------------------- synthetic motifs
def repeated_spans(row: np.ndarray, min_len: int = 2) -> list[tuple[int, int]]:
    """Maximal spans (length, distance) that repeat an earlier stretch of the same row,
    scanned left to right (at each position the longest match, nearest on ties)."""
    n = len(row)
    match = np.zeros((n + 1, n + 1), dtype=np.int32)  # match[i, j]: equal run from i and j
    for i in range(n - 1, -1, -1):
        match[i, :n] = (row[i] == row) * (match[i + 1, 1:] + 1)
    spans, t = [], 1
    while t < n:
        lengths = match[t, :t]  # from each earlier start j
        j = int(np.flatnonzero(lengths == lengths.max())[-1]) if t else 0
        length = int(min(lengths[j], n - t))
        if length >= min_len:
            spans.append((length, t - j))
            t += length
        else:
            t += 1
    return spans


def motif_profile(rows: np.ndarray) -> dict:
    """What `motif_rows` reproduces: repeated-span (length, distance) pairs, the share of tokens
    inside repeats, and the token marginal."""
    spans, covered = [], 0
    for row in rows:
        s = repeated_spans(row)
        spans += s
        covered += sum(length for length, _ in s)
    values, counts = np.unique(rows, return_counts=True)
    return {"spans": np.asarray(spans, dtype=np.int64).reshape(-1, 2),
            "coverage": covered / rows.size, "tokens": values, "token_p": counts / counts.sum()}


def motif_rows(profile: dict, n: int, row_len: int, seed: int) -> np.ndarray:
    """New rows: tokens drawn from the marginal, then repeated spans (sampled length and
    distance pairs) pasted in until the measured repeat coverage is reached."""
    rng = np.random.default_rng([seed, 13])
    rows = rng.choice(profile["tokens"], size=(n, row_len), p=profile["token_p"]).astype(np.int32)
    spans = profile["spans"]
    if len(spans) == 0:
        return rows
    target = profile["coverage"] * row_len
    for row in rows:
        covered = 0
        for _ in range(4 * row_len):
            if covered >= target:
                break
            length, dist = spans[rng.integers(len(spans))]
            start_hi = row_len - length
            if start_hi < dist:
                continue
            t = int(rng.integers(dist, start_hi + 1))
            row[t:t + length] = row[t - dist:t - dist + length].copy() if dist >= length else \
                np.array([row[t - dist + i % dist] for i in range(length)], dtype=np.int32)
            covered += length
    return rows
