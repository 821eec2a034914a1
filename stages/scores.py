"""DVC stage `scores`: influence of every window sample on each target head's probe →
data/scores/scores.parquet, metrics/scores.json and the score distribution plot."""

import pyarrow as pa

from mda.cli import run_stage
from mda.compute import runtime
from mda.data.stream import Stream
from mda.influence.factors import load_factors
from mda.influence.scoring import (attach_samples, concentration, plot_scores, preconditioned_probe,
                                   scores_from_cache, scores_streaming)
from mda.influence.window import setup
from mda.io import atomic_dir, read_targets, write_json, write_parquet
from mda.tracking import stage_run

CHECKPOINTS, STREAM, TARGETS = "data/checkpoints", "data/corpus/stream", "data/locate/targets.json"
FACTORS, GRADIENTS, OUT, METRICS = "data/factors", "data/gradients", "data/scores", "metrics/scores.json"


def main(params):
    inf = params.influence
    with stage_run("scores", {"influence": inf, "compute": params.compute}) as run:
        rt = runtime(params.compute)
        s = setup(inf, CHECKPOINTS, read_targets(TARGETS), rt)
        stream = Stream(STREAM)
        vectors = preconditioned_probe(inf, s, load_factors(FACTORS, s))
        raw = scores_from_cache(inf, s, stream, GRADIENTS, vectors) if inf.mode == "cached" \
            else scores_streaming(inf, s, stream, vectors)
        if not rt.is_main:
            return
        scores = attach_samples(raw, stream, s, s.probe)
        metrics = {"probe": s.probe, "mode": inf.mode, "influence_step": s.step,
                   "window": list(s.window), "heads": {}}
        for head, group in scores.groupby("head"):
            metrics["heads"][head] = concentration(group.score)
        with atomic_dir(OUT) as tmp:
            write_parquet(tmp / "scores.parquet", pa.Table.from_pandas(scores, preserve_index=False))
            plot_scores(scores, tmp / "score_distribution.png")
        write_json(METRICS, metrics)
        for head, m in metrics["heads"].items():
            run.log_metrics({f"{head}/top1pct_positive_share": m["top1pct_positive_share"],
                             f"{head}/top10pct_positive_share": m["top10pct_positive_share"]})
        run.log_artifact(f"{OUT}/score_distribution.png")
        run.log_artifact(METRICS)


if __name__ == "__main__":
    run_stage(main)
