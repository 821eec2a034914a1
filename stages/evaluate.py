"""DVC stage `evaluate`: effects of the counterfactual runs → data/evaluate/ + metrics/evaluate.json.

Reads whatever part of the retrain matrix exists (a missing run is listed in `summary.json`,
never filled in); the baseline run is required.
"""

import pyarrow as pa

from mda.core.cli import run_stage
from mda.data.stream import Stream
from mda.evaluate.effects import COMPARISONS
from mda.evaluate.evaluation import TABLES, evaluate, headline_metrics, json_ready
from mda.core.io import atomic_dir, atomic_file, read_table, read_targets, write_json, write_parquet
from mda.core.provenance import flatten
from mda.core.tracking import stage_run
from mda.evaluate.verdicts import verdicts

RETRAIN, TARGETS, OUT = "data/retrain", "data/locate/targets.json", "data/evaluate"
SETS, SCORES = "data/select/sets.parquet", "data/scores/scores.parquet"
STREAM, TOKENIZER = "data/corpus/stream", "data/corpus/tokenizer"
METRICS, CURVES_CSV = "metrics/evaluate.json", "plots/retrain_trajectories.csv"


def main(params):
    with stage_run("evaluate", {"evaluate": params.evaluate, "retrain.seeds": params.retrain.seeds}) as run:
        result = evaluate(params, RETRAIN, read_targets(TARGETS), read_table(SETS, "select"),
                          read_table(SCORES, "scores"), Stream(STREAM), TOKENIZER)
        metrics = headline_metrics(result)
        found = verdicts(result)  # one per COMPARISONS entry, then the ICL claim
        states = [v.state + (" (exploratory)" if v.exploratory else "") for v in found]
        metrics["verdicts"] = {v.claim: state for v, state in zip(found, states)}
        keys = [f"verdict.{arm}.vs.{control}" for arm, control, _ in COMPARISONS] + ["verdict.icl"]
        with atomic_dir(OUT) as tmp:
            for name in TABLES:
                write_parquet(tmp / f"{name}.parquet", pa.Table.from_pandas(result[name], preserve_index=False))
            write_json(tmp / "summary.json", json_ready(result["summary"]))
        write_json(METRICS, metrics)
        with atomic_file(CURVES_CSV) as tmp:  # drawn per arm by the top-level `plots:` of dvc.yaml
            result["curves"].to_csv(tmp, index=False)
        numeric = {k: v for k, v in flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        run.log_metrics(numeric)
        # The pipeline's run holds the headline numbers and verdicts: one row per experiment.
        run.log_to_pipeline(numeric, dict(zip(keys, states)))
        run.set_tag("missing_runs", ", ".join(result["summary"]["missing_runs"]) or "none")
        run.log_artifacts(OUT, artifact_path="evaluate")
        run.log_artifact(METRICS)


if __name__ == "__main__":
    run_stage(main)
