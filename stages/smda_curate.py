"""DVC stage `smda-curate`: every rule's removals, same-size random removals for the SFT controls,
and precision/recall against the ground truth → data/smda/curate/ and metrics/smda_curate.json."""

import pyarrow as pa

from mda.core.cli import run_stage
from mda.core.io import atomic_dir, write_json, write_parquet
from mda.smda.pipeline import curate_metrics, run_curate
from mda.core.provenance import flatten
from mda.core.tracking import stage_run

INFLUENCE, TASK, OUT, METRICS = "data/smda/influence", "data/smda/task", "data/smda/curate", "metrics/smda_curate.json"


def main(params):
    smda = params.smda
    with stage_run("smda-curate", {"smda.curate": smda.curate, "smda.sft.seeds": smda.sft.seeds}) as run:
        result = run_curate(params, INFLUENCE, TASK)
        with atomic_dir(OUT) as tmp:
            for name in ("removed", "curation"):
                write_parquet(tmp / f"{name}.parquet", pa.Table.from_pandas(result[name], preserve_index=False))
            write_json(tmp / "summary.json", result["summary"])
        headline = curate_metrics(result["summary"])
        write_json(METRICS, headline)
        run.log_metrics({k: v for k, v in flatten(headline).items() if isinstance(v, (int, float))})


if __name__ == "__main__":
    run_stage(main)
