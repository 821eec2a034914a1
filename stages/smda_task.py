"""DVC stage `smda-task`: the instruction task (pairs, prompts) and its ground truth → data/smda/task/."""

import pyarrow as pa

from mda.core.cli import run_stage
from mda.core.io import atomic_dir, write_json, write_parquet
from mda.smda.pipeline import run_task
from mda.core.tracking import stage_run

CORPUS_TOKENIZER, OUT = "data/corpus/tokenizer", "data/smda/task"


def main(params):
    smda = params.smda
    with stage_run("smda-task", {"smda.task": smda.task, "smda.model": smda.model}) as run:
        pairs, truth, prompts, meta = run_task(params, CORPUS_TOKENIZER)
        with atomic_dir(OUT) as tmp:
            for name, frame in (("pairs", pairs), ("truth", truth), ("prompts", prompts)):
                write_parquet(tmp / f"{name}.parquet", pa.Table.from_pandas(frame, preserve_index=False))
            write_json(tmp / "meta.json", meta)
        run.log_metrics({"sft_pairs": meta["pairs"]["sft"], "mislabelled_sft": meta["mislabelled_sft"]})
        run.log_dict(meta, "meta.json")


if __name__ == "__main__":
    run_stage(main)
