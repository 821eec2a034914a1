"""DVC stage `retrain@<arm>[-<seed>]`: `python -m stages.retrain <arm> [<seed>]`.

Fixed arms (data independent of the seed) train once → data/retrain/<arm>/ with one
trajectory per evaluation seed; random arms train per seed → data/retrain/<arm>-<seed>/.
"""

import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pandas as pd

from mda.core.cli import run_stage
from mda.core.compute import runtime
from mda.core.errors import MdaError
from mda.intervene.arms import ARMS
from mda.core.io import atomic_dir, read_table, read_targets, write_json
from mda.data.corpus import read_corpus_meta
from mda.intervene.retrain import run_arm
from mda.core.tracking import stage_run

CORPUS, CHECKPOINTS, WORK = "data/corpus", "data/checkpoints", "data/.work/retrain"
TARGETS, SETS = "data/locate/targets.json", "data/select/sets.parquet"


def main(params):
    arm, seed = parse_args(params, sys.argv[1:])
    r = params.retrain
    fixed = arm in r.fixed_arms
    seeds = list(r.seeds) if fixed else [seed]
    out = f"data/retrain/{arm}" if fixed else f"data/retrain/{arm}-{seed}"
    targets = read_targets(TARGETS)
    sets = read_table(SETS, "select")
    vocab = read_corpus_meta(CORPUS).get("vocab_size")
    work = Path(WORK) / Path(out).name  # resume points; removed once the output is complete
    if not runtime(params.compute).is_main:
        run_arm(params, arm, seeds, seeds[0], CORPUS, CHECKPOINTS, targets, sets, None, vocab, work)
        return
    with ExitStack() as stack:
        # One MLflow run per arm × seed, open for the whole training, so its duration is the arm's.
        runs = {s: stack.enter_context(stage_run(
            "retrain", {"retrain": r, "arm": arm, "seed": s}, run_name=f"retrain-{arm}-{s}",
            tags={"arm": arm, "seed": str(s), "trained_once": str(fixed).lower()})) for s in seeds}
        began = time.perf_counter()
        with atomic_dir(out) as tmp:
            meta = run_arm(params, arm, seeds, seeds[0], CORPUS, CHECKPOINTS, targets, sets, tmp, vocab, work)
            write_json(tmp / "meta.json", meta)
        train_seconds = time.perf_counter() - began  # wall time (MLflow only: outputs stay the same bytes)
        shutil.rmtree(work)
        trajectory = pd.read_parquet(f"{out}/trajectory.parquet")
        target = targets["heads"][0]
        metric = targets["metric"]
        for s, run in runs.items():
            run.set_tag("fresh_optimizer", str(meta["fresh_optimizer"]).lower())
            rows = trajectory[(trajectory.seed == s) & (trajectory.layer == target["layer"])
                              & (trajectory["head"] == target["head"])]
            for row in rows.itertuples():  # per step: one chart per metric, a line per selected run
                run.log_metrics({"target_score": getattr(row, metric), "icl_score": row.icl_score,
                                 "heldout_loss": row.heldout_loss}, step=int(row.step))
            run.log_metric("train_seconds", train_seconds)
            if meta["reproduces_original"] is not None:
                run.log_metric("reproduces_original", float(meta["reproduces_original"]))
            run.log_dict(meta, "meta.json")


def parse_args(params, args):
    r = params.retrain
    known = r.fixed_arms + r.random_arms
    if not args:
        raise MdaError("usage: python -m stages.retrain <arm> [<seed>]")
    arm = args[0]
    if arm not in ARMS:
        raise MdaError(f"retrain: unknown arm {arm!r} (known: {', '.join(ARMS)})")
    if arm not in known:
        raise MdaError(f"retrain: arm {arm!r} is not in retrain.fixed_arms or retrain.random_arms")
    if arm in r.fixed_arms:
        return arm, None
    if len(args) < 2 or not args[1].lstrip("-").isdigit() or int(args[1]) not in r.seeds:
        raise MdaError(f"retrain: arm {arm} needs a seed from retrain.seeds {r.seeds}")
    return arm, int(args[1])


if __name__ == "__main__":
    run_stage(main)
