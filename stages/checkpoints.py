"""DVC stage `checkpoints`: data/checkpoints/step<N>/ by local pretraining or from the hub.

The output persists across runs (`persist: true` in dvc.yaml): a run that was stopped resumes
from its last complete checkpoint; checkpoints of another run (other params, corpus or code)
are discarded first (`mda.train.pretrain.open_run`).
"""

from pathlib import Path

import pandas as pd

from mda.core.cli import run_stage
from mda.core.compute import runtime
from mda.core.io import atomic_file, write_json
from mda.model.neox import download_hub_checkpoints
from mda.train.pretrain import checkpoint_induction_scores, hub_identity, open_run, pretrain
from mda.core.tracking import stage_run

CORPUS = "data/corpus"
OUT = "data/checkpoints"
METRICS = "metrics/checkpoints.json"
LOSS_CSV = "plots/pretrain_loss.csv"
INDUCTION_CSV = "plots/induction_curve.csv"


def main(params):
    section = {"model": params.model, "pretrain": params.pretrain, "compute": params.compute}
    with stage_run("checkpoints", section) as run:
        rt = runtime(params.compute)
        if params.model.source == "hub":
            done = open_run(Path(OUT), hub_identity(params), rt)
            if rt.is_main:
                download_hub_checkpoints(params.model.hub, OUT, skip=set(done))
            induction = checkpoint_induction_scores(params, OUT)
            losses = []
        else:
            log = pretrain(params, CORPUS, OUT, on_update=_log_update(params, run),
                           on_checkpoint=_log_checkpoint(run))
            induction, losses = log.induction, log.losses
        if not rt.is_main:
            return
        curve = pd.DataFrame({"step": sorted(induction),
                              "induction_score_max": [max(map(max, induction[s])) for s in sorted(induction)]})
        _write_csv(curve, INDUCTION_CSV)
        _write_csv(pd.DataFrame(losses, columns=["step", "loss", "lr"]), LOSS_CSV)
        metrics = {
            "source": params.model.source,
            "checkpoints": len(curve),
            "induction_score_max_first": float(curve.induction_score_max.iloc[0]),
            "induction_score_max_last": float(curve.induction_score_max.iloc[-1]),
        }
        if losses:
            metrics["final_loss"] = losses[-1][1]
        write_json(METRICS, metrics)
        for path in (METRICS, INDUCTION_CSV, LOSS_CSV):
            run.log_artifact(path)


def _log_update(params, run):
    def log(step, loss, lr):
        if step % params.pretrain.log_every == 0:
            run.log_metrics({"loss": loss, "lr": lr}, step=step)
    return log


def _log_checkpoint(run):
    def log(step, scores):
        run.log_metric("induction_score_max", scores.max().item(), step=step)
    return log


def _write_csv(frame, path):
    with atomic_file(path) as tmp:
        frame.to_csv(tmp, index=False)


if __name__ == "__main__":
    run_stage(main)
