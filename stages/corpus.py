"""DVC stage `corpus`: the training stream, tokenizer and meta under data/corpus/."""

from mda.core.cli import run_stage
from mda.data.corpus import build_corpus
from mda.core.io import atomic_dir
from mda.core.tracking import stage_run

OUT = "data/corpus"


def main(params):
    with stage_run("corpus", {"corpus": params.corpus}) as run:
        with atomic_dir(OUT) as tmp:
            meta = build_corpus(params.corpus, tmp)
        run.log_metrics({"rows": meta["rows"], "tokens": meta["tokens"]})
        run.log_metrics({f"domain_rows.{k}": v for k, v in meta["domain_counts"].items()})
        run.log_artifact(f"{OUT}/meta.json")


if __name__ == "__main__":
    run_stage(main)
