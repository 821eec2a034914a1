"""DVC stage `smda-sae`: a TopK SAE trained on the instruct model's residual stream (or an SAE in
SAELens's format from the hub) → data/smda/sae/ (cfg.json, sae_weights.safetensors, metrics.json)."""

from mda.core.cli import run_stage
from mda.core.io import atomic_dir, write_json
from mda.smda.pipeline import run_sae
from mda.core.tracking import stage_run

INSTRUCT, TASK, OUT, METRICS = "data/smda/instruct", "data/smda/task", "data/smda/sae", "metrics/smda_sae.json"


def main(params):
    with stage_run("smda-sae", {"smda.sae": params.smda.sae}) as run:
        log_row = lambda row: run.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        with atomic_dir(OUT) as tmp:
            metrics = run_sae(params, INSTRUCT, TASK, tmp, on_log=log_row)
            write_json(tmp / "metrics.json", metrics)
        headline = {"explained_variance": metrics["heldout_every_position"]["explained_variance"],
                    "explained_variance_last_token": metrics["heldout_last_token"]["explained_variance"],
                    "dead_share": metrics["heldout_every_position"]["dead_share"],
                    "l0": metrics["heldout_every_position"]["l0"]}
        write_json(METRICS, headline)
        run.log_metrics(headline)


if __name__ == "__main__":
    run_stage(main)
