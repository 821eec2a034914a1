"""DVC stage `gradients`: per-sample training gradients of every target block over the
window → data/gradients/shard-*.parquet + manifest.json (resumable: complete shards are kept)."""

from mda.cli import run_stage
from mda.compute import runtime
from mda.data.stream import Stream
from mda.influence.scoring import cache_gradients, read_targets, setup
from mda.tracking import stage_run

CHECKPOINTS, STREAM, TARGETS = "data/checkpoints", "data/corpus/stream", "data/locate/targets.json"
OUT = "data/gradients"


def main(params):
    inf = params.influence
    with stage_run("gradients", {"influence": inf.model_dump()}) as run:
        runtime(params.compute)
        s = setup(inf, CHECKPOINTS, read_targets(TARGETS))
        manifest = cache_gradients(inf, s, Stream(STREAM), OUT)
        run.log_metrics({"samples": manifest["samples"], "shards": len(manifest["shards"]),
                            "reused_shards": manifest["reused_shards"]})
        run.log_artifact(f"{OUT}/manifest.json")


if __name__ == "__main__":
    run_stage(main)
