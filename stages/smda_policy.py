"""DVC stage `smda-policy`: SAE features by mean-activation difference and the closed-form ridge
policy over them → data/smda/policy/ (features, prompts, arrays.safetensors, policy.json)."""

import pyarrow as pa
from safetensors.numpy import save_file

from mda.core.cli import run_stage
from mda.core.io import atomic_dir, write_json, write_parquet
from mda.smda.pipeline import run_policy
from mda.core.tracking import stage_run

INSTRUCT, SAE, TASK = "data/smda/instruct", "data/smda/sae", "data/smda/task"
OUT, METRICS = "data/smda/policy", "metrics/smda_policy.json"


def main(params):
    with stage_run("smda-policy", {"smda.policy": params.smda.policy}) as run:
        result = run_policy(params, INSTRUCT, SAE, TASK)
        summary = result["summary"]
        with atomic_dir(OUT) as tmp:
            for name in ("features", "prompts"):
                write_parquet(tmp / f"{name}.parquet", pa.Table.from_pandas(result[name], preserve_index=False))
            save_file(result["arrays"], tmp / "arrays.safetensors")
            write_json(tmp / "policy.json", summary)
        headline = {k: summary[k] for k in ("train_accuracy", "test_accuracy", "majority_baseline")}
        headline["features"] = len(summary["features"])
        write_json(METRICS, headline)
        run.log_metrics(headline)


if __name__ == "__main__":
    run_stage(main)
