"""DVC stage `smda-sft@<set>-<seed>`: `python -m stages.smda_sft <set> <seed>` fine-tunes the
instruct model on one SFT set (full, oracle, a rule's curated or random-removed set) and evaluates it on the held-out
prompts → data/smda/sft/<set>-<seed>/ (eval.parquet, train_log.parquet, meta.json)."""

import sys

import pyarrow as pa

from mda.core.cli import run_stage
from mda.core.errors import MdaError
from mda.core.io import atomic_dir, write_json, write_parquet
from mda.smda.pipeline import run_sft
from mda.core.tracking import stage_run

INSTRUCT, TASK, CURATE = "data/smda/instruct", "data/smda/task", "data/smda/curate"


def parse_args(params, args):
    if len(args) != 2 or not args[1].lstrip("-").isdigit():
        raise MdaError("usage: python -m stages.smda_sft <set> <seed> (a set of smda.sft.sets)")
    seed = int(args[1])
    if args[0] not in params.smda.sft.sets:
        raise MdaError(f"smda-sft: set {args[0]} is not in smda.sft.sets {params.smda.sft.sets}")
    if seed not in params.smda.sft.seeds:
        raise MdaError(f"smda-sft: seed {seed} is not in smda.sft.seeds {params.smda.sft.seeds}")
    return args[0], seed


def main(params):
    set_name, seed = parse_args(params, sys.argv[1:])
    out = f"data/smda/sft/{set_name}-{seed}"
    tags = {"set": set_name, "seed": str(seed)}
    with stage_run("smda-sft", {"smda.sft": params.smda.sft, "set": set_name, "seed": seed},
                   run_name=f"smda-sft-{set_name}-{seed}", tags=tags) as run:
        log_step = lambda step, loss, lr: run.log_metrics({"loss": loss, "lr": lr}, step=step)
        result = run_sft(params, set_name, seed, INSTRUCT, TASK, CURATE, on_step=log_step)
        with atomic_dir(out) as tmp:
            write_parquet(tmp / "eval.parquet", pa.Table.from_pandas(result["outputs"], preserve_index=False))
            write_parquet(tmp / "train_log.parquet", pa.Table.from_pandas(result["log"], preserve_index=False))
            write_json(tmp / "meta.json", result["meta"])
        run.log_metrics(result["meta"]["metrics"])


if __name__ == "__main__":
    run_stage(main)
