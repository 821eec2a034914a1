"""DVC stage `smda-influence`: each SFT pair's influence on the policy, by pathway (ΔX / ΔY) and
feature → data/smda/influence/ (scores.parquet, per_feature.parquet, meta.json)."""

import pyarrow as pa

from mda.core.cli import run_stage
from mda.core.io import atomic_dir, write_json, write_parquet
from mda.smda.pipeline import run_influence
from mda.core.tracking import stage_run

INSTRUCT, SAE, POLICY, TASK = "data/smda/instruct", "data/smda/sae", "data/smda/policy", "data/smda/task"
OUT = "data/smda/influence"


def main(params):
    with stage_run("smda-influence", {"smda.influence": params.smda.influence}) as run:
        result = run_influence(params, INSTRUCT, SAE, POLICY, TASK)
        with atomic_dir(OUT) as tmp:
            for name in ("scores", "per_feature"):
                write_parquet(tmp / f"{name}.parquet", pa.Table.from_pandas(result[name], preserve_index=False))
            write_json(tmp / "meta.json", result["meta"])
        run.log_metrics({"restored_bit_for_bit": float(result["meta"]["restored_bit_for_bit"]),
                         "pairs": result["meta"]["pairs"]})


if __name__ == "__main__":
    run_stage(main)
