"""DVC stage `gradients`: per-sample training gradients of every target block over the
window → data/gradients/shard-*.parquet + manifest.json (resumable: complete shards made from
the same inputs are kept; each rank of a distributed run writes its own shards)."""

from mda.core.cli import run_stage
from mda.core.compute import runtime
from mda.data.stream import Stream
from mda.attribute.gradient_cache import cache_gradients
from mda.attribute.window import setup
from mda.core.io import read_targets
from mda.core.tracking import stage_run

CHECKPOINTS, STREAM, TARGETS = "data/checkpoints", "data/corpus/stream", "data/locate/targets.json"
OUT = "data/gradients"


def main(params):
    inf = params.influence
    with stage_run("gradients", {"influence": inf, "compute": params.compute}) as run:
        rt = runtime(params.compute)
        s = setup(inf, CHECKPOINTS, read_targets(TARGETS), rt)
        manifest, reused = cache_gradients(inf, s, Stream(STREAM), OUT)
        run.log_metrics({"samples": manifest["samples"], "shards": len(manifest["shards"]), "reused_shards": reused})
        run.log_artifact(f"{OUT}/manifest.json")


if __name__ == "__main__":
    run_stage(main)
