"""DVC stage `factors`: EK-FAC curvature of each target head's blocks → data/factors/<head>/<block>.safetensors."""

from mda.cli import run_stage
from mda.compute import runtime
from mda.data.stream import Stream
from mda.influence.scoring import fit_factors, read_targets, setup
from mda.io import atomic_dir, write_json
from mda.tracking import stage_run

CHECKPOINTS, STREAM, TARGETS = "data/checkpoints", "data/corpus/stream", "data/locate/targets.json"
OUT = "data/factors"


def main(params):
    inf = params.influence
    with stage_run("factors", {"influence": inf.model_dump()}) as run:
        runtime(params.compute)
        s = setup(inf, CHECKPOINTS, read_targets(TARGETS))
        with atomic_dir(OUT) as tmp:
            summary = fit_factors(inf, s, Stream(STREAM), tmp)
            write_json(tmp / "summary.json", summary)
        run.log_metrics({f"damping/{name}": b["damping"] for name, b in summary["blocks"].items()})
        run.log_metric("samples", summary["samples"])
        run.log_artifact(f"{OUT}/summary.json")


if __name__ == "__main__":
    run_stage(main)
