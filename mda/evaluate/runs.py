"""The counterfactual runs as `evaluate` reads them: every trajectory the retrain matrix defines
(a missing one listed, never filled in) and the target's curve per arm × seed."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from mda.core.config import Params
from mda.core.errors import MdaError
from mda.intervene.arms import ARMS


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
