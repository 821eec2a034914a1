"""DVC stage `locate`: head metrics over every checkpoint → data/locate/, targets and window."""

import json


import pyarrow as pa

from mda.core.cli import run_stage
from mda.core.compute import runtime
from mda.core.io import atomic_dir, atomic_file, write_json, write_parquet
from mda.units.locate import (METRIC_VERSIONS, check_request, choose_targets, plot_heatmap, plot_icl, plot_trajectories,
                        scan_checkpoints, target_curve)
from mda.data.corpus import read_corpus_meta
from mda.core.tracking import stage_run

CORPUS = "data/corpus"
CHECKPOINTS = "data/checkpoints"
OUT = "data/locate"
METRICS = "metrics/locate.json"
CURVE_CSV = "plots/locate_target.csv"


def main(params):
    with stage_run("locate", {"locate": params.locate, "compute": params.compute}) as run:
        check_request(params.locate, CHECKPOINTS)
        meta = read_corpus_meta(CORPUS)
        heads, models, facts = scan_checkpoints(params, CHECKPOINTS, CORPUS, meta.get("vocab_size"))
        if not runtime(params.compute).is_main:
            return
        targets = choose_targets(heads, params.locate, facts)
        targets["metric_versions"] = METRIC_VERSIONS
        curve = target_curve(heads, models, targets)
        with atomic_dir(OUT) as tmp:
            versions = {b"mda.metric_versions": json.dumps(METRIC_VERSIONS).encode()}
            write_parquet(tmp / "heads.parquet", pa.Table.from_pandas(heads, preserve_index=False)
                          .replace_schema_metadata(versions))
            write_parquet(tmp / "model.parquet", pa.Table.from_pandas(models, preserve_index=False)
                          .replace_schema_metadata(versions))
            write_json(tmp / "targets.json", targets)
            plot_trajectories(heads, targets, tmp / "head_trajectories.png")
            plot_heatmap(heads, targets, tmp / "heads_final.png")
            plot_icl(curve, targets, tmp / "icl_vs_target.png")
        with atomic_file(CURVE_CSV) as tmp:
            curve.to_csv(tmp, index=False)
        last = heads[heads.step == heads.step.max()]
        write_json(METRICS, {
            "targets": [h["name"] for h in targets["heads"]],
            "unit": targets["unit"],
            "formed": targets["formed"],
            "window_start": targets["window"]["start"],
            "window_end": targets["window"]["end"],
            "influence_step": targets["influence_step"],
            "target_score_final": float(curve.target_score.iloc[-1]),
            "max_prefix_matching_final": float(last.prefix_matching.max()),
            "max_previous_token_final": float(last.previous_token.max()),
            "icl_score_final": float(curve.icl_score.iloc[-1]),
            "heldout_loss_final": float(curve.heldout_loss.iloc[-1]),
        })
        for row in curve.itertuples():
            run.log_metrics({"target_score": row.target_score, "icl_score": row.icl_score,
                                "heldout_loss": row.heldout_loss}, step=int(row.step))
        run.set_tags({"targets": ",".join(h["name"] for h in targets["heads"]),
                         "window": f"{targets['window']['start']}-{targets['window']['end']}"})
        run.log_artifacts(OUT, artifact_path="locate")
        for path in (METRICS, CURVE_CSV):
            run.log_artifact(path)


if __name__ == "__main__":
    run_stage(main)
