"""DVC stage `scores`: influence of every window sample on each target head's probe →
data/scores/scores.parquet; the same window scored with other probe draws (draws.parquet) and the
top-k overlap between draws; the top and random samples' scores split over their token positions
(tokens.parquet); metrics/scores.json and the score distribution plot."""

import pyarrow as pa

from mda.core.cli import run_stage
from mda.core.compute import runtime
from mda.data.stream import Stream
from mda.attribute.factors import load_factors
from mda.attribute.overlap import draw_agreement, seed_column
from mda.attribute.scoring import (attach_samples, concentration, plot_scores, preconditioned_probe,
                                   scores_from_cache, scores_streaming)
from mda.attribute.metagradient import window_metagradients
from mda.attribute.tokens import token_sets, token_table
from mda.attribute.trajectory import trajectory_scores
from mda.attribute.token_stats import token_metrics
from mda.attribute.window import setup
from mda.intervene.selection import set_size
from mda.core.io import atomic_dir, read_targets, write_json, write_parquet
from mda.core.tracking import stage_run

CHECKPOINTS, STREAM, TARGETS = "data/checkpoints", "data/corpus/stream", "data/locate/targets.json"
FACTORS, GRADIENTS, OUT, METRICS = "data/factors", "data/gradients", "data/scores", "metrics/scores.json"


def main(params):
    inf, sel = params.influence, params.select
    with stage_run("scores", {"influence": inf, "compute": params.compute,
                              "select": {"fraction": sel.fraction, "count": sel.count}},
                   tags={"estimator": inf.estimator}) as run:
        rt = runtime(params.compute)
        targets = read_targets(TARGETS)
        s = setup(inf, CHECKPOINTS, targets, rt)
        stream = Stream(STREAM)
        draws = {}
        if inf.estimator == "ekfac":
            factors = load_factors(FACTORS, s)
            vectors = preconditioned_probe(inf, s, factors)
            draws = {seed_column(seed): preconditioned_probe(inf.model_copy(update={"probe_seed": seed}), s, factors)
                     for seed in dict.fromkeys(inf.overlap_seeds) if seed != inf.probe_seed}
            raw = scores_from_cache(inf, s, stream, GRADIENTS, vectors, draws=draws) if inf.mode == "cached" \
                else scores_streaming(inf, s, stream, vectors, draws=draws)
        elif inf.estimator == "trajectory":
            raw = trajectory_scores(inf, CHECKPOINTS, targets, stream, rt)
        else:
            raw = window_metagradients(params, CHECKPOINTS, targets, stream, s)
        if not rt.is_main:
            return
        scores = attach_samples(raw[["sample_id", "head", "score"]], stream, s, s.probe)
        metrics = {"estimator": inf.estimator, "probe": s.probe, "mode": inf.mode, "influence_step": s.step,
                   "window": list(s.window), "heads": {}, "probe_draws": {}}
        for head, group in scores.groupby("head"):
            metrics["heads"][head] = concentration(group.score)
        draw_labels = {f"seed {inf.probe_seed}": "score", **{f"seed {c.removeprefix('score_seed')}": c for c in draws}}
        if draws:
            for head, group in raw.groupby("head"):
                k = set_size(len(group), sel.fraction, sel.count)
                metrics["probe_draws"][head] = draw_agreement(group, draw_labels, k)
        tokens = None
        if inf.token_samples and inf.estimator == "ekfac":
            tokens = token_table(inf, s, stream, token_sets(scores, inf.token_samples), vectors)
            metrics["tokens"] = token_metrics(tokens, scores, inf.token_samples)
        with atomic_dir(OUT) as tmp:
            write_parquet(tmp / "scores.parquet", pa.Table.from_pandas(scores, preserve_index=False))
            if draws:
                write_parquet(tmp / "draws.parquet", pa.Table.from_pandas(raw, preserve_index=False))
            if tokens is not None:
                write_parquet(tmp / "tokens.parquet", pa.Table.from_pandas(tokens, preserve_index=False))
            plot_scores(scores, tmp / "score_distribution.png")
        write_json(METRICS, metrics)
        for head, m in metrics["heads"].items():
            run.log_metrics({f"{head}/top1pct_positive_share": m["top1pct_positive_share"],
                             f"{head}/top10pct_positive_share": m["top10pct_positive_share"]})
        for head, m in metrics["probe_draws"].items():
            run.log_metrics({f"{head}/probe_draw_topk_overlap_mean": m["overlap_mean"],
                             f"{head}/probe_draw_topk_overlap_min": m["overlap_min"]})
        for target, m in metrics.get("tokens", {}).get("targets", {}).items():
            run.log_metrics({f"{target}/tokens_top_positive_on_predictable": m["top"]["positive_on_predictable"],
                             f"{target}/tokens_random_positive_on_predictable": m["random"]["positive_on_predictable"]})
        run.log_artifact(f"{OUT}/score_distribution.png")
        run.log_artifact(METRICS)


if __name__ == "__main__":
    run_stage(main)
