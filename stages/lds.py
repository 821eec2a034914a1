"""DVC stage `lds`: the linear datamodeling score of the influence scores (`mda.evaluate.lds`) for EK-FAC,
K-FAC and plain gradient dot products → data/lds/ (subsets.parquet, per_subset.parquet,
scores.parquet, summary.json, lds.png) and metrics/lds.json.

Off unless `lds.enabled` (presets/lds.yaml): then it writes only a summary saying so. Finished
subsets are kept in data/.work/lds/ (one file each, identity-checked): a killed run resumes there.
"""

import time

import numpy as np
import pyarrow as pa

from mda.core.cli import run_stage
from mda.core.compute import runtime
from mda.data.stream import Stream
from mda.attribute.factors import load_factors
from mda.attribute.window import setup
from mda.core.io import atomic_dir, read_targets, write_json, write_parquet
from mda.evaluate.lds import (OUTPUTS, estimator_scores, per_subset_table, plot_lds, proponent_sets, proponent_summary, proponent_table,
                     subset_ids, subset_outcomes, subset_table, summarise)
from mda.data.corpus import read_corpus_meta
from mda.core.tracking import stage_run

CHECKPOINTS, CORPUS, TARGETS = "data/checkpoints", "data/corpus", "data/locate/targets.json"
FACTORS, GRADIENTS, OUT, METRICS, WORK = "data/factors", "data/gradients", "data/lds", "metrics/lds.json", "data/.work/lds"


def main(params):
    if not params.lds.enabled:
        with stage_run("lds", {"lds": params.lds}, tags={"lds": "disabled"}):
            note = {"enabled": False, "note": "lds.enabled is false: no subsets retrained (presets/lds.yaml turns it on)"}
            if runtime(params.compute).is_main:
                with atomic_dir(OUT) as tmp:
                    write_json(tmp / "summary.json", note)
                write_json(METRICS, note)
        return
    c, inf = params.lds, params.influence
    with stage_run("lds", {"lds": c, "influence": inf, "compute": params.compute}) as run:
        began = time.perf_counter()
        rt = runtime(params.compute)
        targets = read_targets(TARGETS)
        s = setup(inf, CHECKPOINTS, targets, rt)
        stream = Stream(f"{CORPUS}/stream")
        scores = estimator_scores(inf, s, stream, GRADIENTS, load_factors(FACTORS, s))
        probe = s.probe
        del s  # the influence checkpoint's model is not needed any more
        window = stream.read(int(targets["window"]["start"]), int(targets["window"]["end"]) - 1,
                             columns=["sample_id"]).column("sample_id").to_numpy()
        subsets = {m: subset_ids(window, c.fraction, c.seed, m) for m in range(c.subsets)}
        vocab = read_corpus_meta(CORPUS).get("vocab_size")
        unedited, outcomes, reused = subset_outcomes(params, CHECKPOINTS, CORPUS, targets, probe, subsets, WORK, rt,
                                                     vocab)
        # Proponents: each estimator's top `fraction` removed, against the random subsets of that size.
        _, top_outcomes, _ = subset_outcomes(params, CHECKPOINTS, CORPUS, targets, probe,
                                             proponent_sets(scores, c.fraction), WORK, rt, vocab, what="top sets")
        if not rt.is_main:
            return
        table = per_subset_table(scores, subsets, unedited, outcomes)
        summary = summarise(table, c.bootstrap, c.confidence, c.seed)
        proponents = proponent_table(table, unedited, top_outcomes, c.bootstrap, c.confidence, c.seed)
        seconds = [o["seconds"] for o in outcomes.values()]
        meta = {"enabled": True, "probe": probe, "metric": targets["metric"], "window": targets["window"],
                "subsets": c.subsets, "fraction": c.fraction, "removed_per_subset": int(len(subsets[0])),
                "window_samples": int(len(window)), "unedited": unedited,
                "fresh_optimizer": any(o["fresh_optimizer"] for o in outcomes.values()),
                "predicted": "−Σ score over the removed samples (removing a sample undoes its step)",
                "lds": summary, "proponent_ratio": proponent_summary(proponents),
                "proponent_rule": "measured change from removing the estimator's top `fraction` by score over the "
                                  "mean measured change from removing the random subsets (same size)"}
        # no wall times in these files: same inputs, same bytes (they go to MLflow)
        with atomic_dir(OUT) as tmp:
            write_parquet(tmp / "subsets.parquet", pa.Table.from_pandas(subset_table(subsets), preserve_index=False))
            write_parquet(tmp / "per_subset.parquet", pa.Table.from_pandas(table, preserve_index=False))
            write_parquet(tmp / "scores.parquet", pa.Table.from_pandas(scores, preserve_index=False))
            write_parquet(tmp / "proponents.parquet", pa.Table.from_pandas(proponents, preserve_index=False))
            write_json(tmp / "summary.json", meta)
            plot_lds(table, summary, tmp / "lds.png")
        write_json(METRICS, {k: meta[k] for k in ("enabled", "subsets", "fraction", "probe", "metric", "lds",
                                                  "proponent_ratio")})
        for head, by_estimator in summary.items():
            for name, by_output in by_estimator.items():
                run.log_metrics({f"{head}/{name}/lds_{out}": by_output[out]["lds"] for out in OUTPUTS})
        run.log_metrics({"retrain_seconds_per_subset": float(np.median(seconds)),
                         "stage_seconds": time.perf_counter() - began, "subsets_reused": reused})
        run.log_artifact(f"{OUT}/lds.png")
        run.log_artifact(f"{OUT}/summary.json")


if __name__ == "__main__":
    run_stage(main)
