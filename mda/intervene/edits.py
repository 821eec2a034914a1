"""The stream edits of the retraining arms: per step, row weights and replacement rows.

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
- **augment-synthetic**: the copies are new rows from `mda.intervene.motifs.motif_rows`, which carry the repeated-
  span structure measured on the top set (span lengths, distances, coverage, token marginal)
  without copying any of its rows; each is placed like a copy of the top-set row it stands for
  (under `upweight`, where a new row has no weight of its own to raise, `in_place`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


PLACEMENTS = ("in_place", "upweight", "later")  # retrain.augment_placement


# ----------------------------------------------------------------------------- selection


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


