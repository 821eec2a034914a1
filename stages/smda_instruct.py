"""DVC stage `smda-instruct`: the studied model fine-tuned into the refusal policy on the clean
instruct pairs → data/smda/instruct/ (weights + tokenizer, or a pin of an untouched hub model)."""

from mda.core.cli import run_stage
from mda.core.io import atomic_dir, write_json
from mda.smda.pipeline import run_instruct
from mda.core.tracking import stage_run

CHECKPOINTS, CORPUS_TOKENIZER = "data/checkpoints", "data/corpus/tokenizer"
TASK, OUT = "data/smda/task", "data/smda/instruct"


def main(params):
    smda = params.smda
    with stage_run("smda-instruct", {"smda.instruct": smda.instruct,
                                     "smda.model": smda.model}) as run:
        log_step = lambda step, loss, lr: run.log_metrics({"loss": loss, "lr": lr}, step=step)
        with atomic_dir(OUT) as tmp:
            _, meta = run_instruct(params, CHECKPOINTS, CORPUS_TOKENIZER, TASK, tmp, on_step=log_step)
            write_json(tmp / "meta.json", meta)
        run.log_dict(meta, "meta.json")


if __name__ == "__main__":
    run_stage(main)
