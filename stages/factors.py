"""DVC stage `factors`: EK-FAC curvature of each target head's blocks → data/factors/<head>/<block>.safetensors."""

from mda.core.cli import run_stage
from mda.core.compute import runtime
from mda.data.stream import Stream
from mda.attribute.factors import fit_factors
from mda.attribute.window import setup
from mda.core.io import atomic_dir, read_targets, write_json
from mda.core.tracking import stage_run

CHECKPOINTS, STREAM, TARGETS = "data/checkpoints", "data/corpus/stream", "data/locate/targets.json"
OUT = "data/factors"


def main(params):
    inf = params.influence
    with stage_run("factors", {"influence": inf, "compute": params.compute}) as run:
        rt = runtime(params.compute)
        s = setup(inf, CHECKPOINTS, read_targets(TARGETS), rt)
        if rt.is_main:
            with atomic_dir(OUT) as tmp:
                summary = fit_factors(inf, s, Stream(STREAM), tmp)
                write_json(tmp / "summary.json", summary)
        else:
            summary = fit_factors(inf, s, Stream(STREAM), None)
        run.log_metrics({f"damping/{name}": b["damping"] for name, b in summary["blocks"].items()})
        run.log_metric("samples", summary["samples"])
        run.log_artifact(f"{OUT}/summary.json")


if __name__ == "__main__":
    run_stage(main)
