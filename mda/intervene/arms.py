"""The retraining arms: which set each arm edits and the stream edit it makes (`build_edit`),
read by `retrain`, by `evaluate` (when the edits happen) and by nothing else."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mda.core.config import Params
from mda.core.errors import MdaError
from mda.data.stream import Stream
from mda.intervene.edits import StreamEdit, augmentation, removal, upweighting
from mda.intervene.motifs import motif_profile, motif_rows


ARMS = ("baseline", "remove-top", "remove-random", "remove-matched", "remove-bottom",
        "augment-top", "augment-random", "augment-matched", "augment-synthetic")


SEEDED_ARMS = {"remove-random", "remove-matched", "augment-random", "augment-matched",
               "augment-synthetic"}  # the seed changes the data


def arm_set(arm: str, seed: int) -> str | None:
    """Which selected set an arm uses (`None` for baseline)."""
    if arm == "baseline":
        return None
    kind = arm.split("-", 1)[1]
    return f"{kind}-{seed}" if kind in ("random", "matched") else ("top" if kind == "synthetic" else kind)


def chosen_sets(sets: pd.DataFrame, params: Params, targets: dict) -> str:
    """The target whose sets the arms use (params select.target)."""
    names = sorted(sets.target.unique())
    wanted = params.select.target
    if wanted == "auto":
        wanted = "union" if "union" in names else targets["heads"][0]["name"]
    if wanted not in names:
        raise MdaError(f"select.target: no sets for {wanted!r} (have: {', '.join(names)})")
    return wanted


def build_edit(arm: str, seed: int, params: Params, sets: pd.DataFrame, target: str, stream: Stream,
               window: tuple[int, int]) -> StreamEdit:
    start, end = window
    if arm == "baseline":
        return StreamEdit(summary={"rule": "no change"})
    name = f"{target}:{arm_set(arm, seed)}"
    chosen = sets[sets.set == name]
    if chosen.empty:
        raise MdaError(f"data/select/sets.parquet: no set {name!r} for arm {arm} seed {seed}; rerun select")
    ids = set(chosen.sample_id.tolist())
    rows = stream.read(start, end - 1, columns=["sample_id", "step", "batch_pos"]).to_pandas()
    placement, copies = params.retrain.augment_placement, params.retrain.copies
    if arm.startswith("remove"):
        edit = removal(rows, ids, stream.batch_size)
    elif placement == "upweight" and arm != "augment-synthetic":
        edit = upweighting(rows, ids, stream.batch_size, copies)
    else:
        table = stream.read(start, end - 1, columns=["sample_id", "step", "input_ids"])
        mask = np.isin(table.column("sample_id").to_numpy(), list(ids))
        picked = table.filter(mask)
        steps = picked.column("step").to_numpy()
        tokens = np.stack(picked.column("input_ids").to_numpy(zero_copy_only=False))
        if arm == "augment-synthetic":
            profile = motif_profile(tokens[:1000])
            tokens = motif_rows(profile, len(tokens), tokens.shape[1], seed)
        # New rows have no weight of their own to raise: under `upweight` they go in place.
        where = "in_place" if placement == "upweight" else placement
        edit = augmentation(rows, list(zip(steps.tolist(), tokens)), ids, end - 1, copies, seed, where)
        if arm == "augment-synthetic":
            edit.summary["motifs"] = {"spans": int(len(profile["spans"])), "coverage": profile["coverage"]}
    if arm.startswith("augment"):
        edit.summary["augment_placement"] = placement  # the params value; `placement`: what this arm did
    edit.summary.update(set=name, set_size=len(ids))
    return edit
