"""DVC stage `smda-evaluate`: refusal metrics of the instruct model and of every SFT run, per set
with intervals over seeds, and the curated ≥ full > random comparison → data/smda/evaluate/."""

import pyarrow as pa

from mda.core.cli import run_stage
from mda.core.io import atomic_dir, write_json, write_parquet
from mda.smda.pipeline import run_evaluate
from mda.core.tracking import stage_run

INSTRUCT, TASK, SFT = "data/smda/instruct", "data/smda/task", "data/smda/sft"
OUT, METRICS = "data/smda/evaluate", "metrics/smda_evaluate.json"
TABLES = ("runs", "per_set", "hypothesis")


def main(params):
    with stage_run("smda-evaluate", {"smda.evaluate": params.smda.evaluate}) as run:
        result = run_evaluate(params, INSTRUCT, TASK, SFT)
        with atomic_dir(OUT) as tmp:
            for name in TABLES:
                write_parquet(tmp / f"{name}.parquet", pa.Table.from_pandas(result[name], preserve_index=False))
            write_json(tmp / "summary.json", result["summary"])
        per_set, hyp = result["per_set"], result["hypothesis"]
        headline = {f"{row.set}.{row.metric}": row.mean for row in per_set.itertuples()
                    if row.metric in ("soft_f1", "greedy_f1")}
        headline["comparisons"] = {f"{row.comparison}.{row.metric}": {"mean": row.mean_difference, "low": row.low,
                                                                      "high": row.high}
                                   for row in hyp.itertuples() if row.metric in ("soft_f1", "greedy_f1")}
        headline.update({f"instruct.{m}": result["summary"]["instruct"][m] for m in ("soft_f1", "greedy_f1")})
        headline["missing_runs"] = len(result["summary"]["missing_runs"])
        write_json(METRICS, headline)
        run.log_metrics({k: v for k, v in headline.items() if isinstance(v, (int, float))})


if __name__ == "__main__":
    run_stage(main)
