"""DVC stage `select`: top-k, bottom-k and seeded random sets → data/select/sets.parquet + meta.json."""

import pyarrow as pa

from mda.core.cli import run_stage
from mda.attribute.scoring import concentration
from mda.intervene.selection import plot_cut, select_sets, set_size
from mda.core.io import atomic_dir, read_table, read_targets, write_json, write_parquet
from mda.core.tracking import stage_run

SCORES, TARGETS, OUT = "data/scores/scores.parquet", "data/locate/targets.json", "data/select"


def main(params):
    sel = params.select
    with stage_run("select", {"select": sel, "retrain.seeds": params.retrain.seeds}) as run:
        scores = read_table(SCORES, "scores")
        targets = read_targets(TARGETS)
        window_samples = scores.sample_id.nunique()
        k = set_size(window_samples, sel.fraction, sel.count)
        sets = select_sets(scores, k, params.retrain.seeds, sel.union)
        meta = {"k": k, "window_samples": window_samples, "seeds": params.retrain.seeds,
                "rule": "top/bottom: k highest/lowest scores; random-<seed>: k drawn uniformly "
                        "with numpy default_rng([seed, 7]); matched-<seed>: per domain as many as the top set "
                        "holds, drawn uniformly within the domain with default_rng([seed, 19]); union: mean "
                        "of score/std over heads",
                "targets": {}}
        for target, group in sets.groupby("target"):
            by_head = scores if target == "union" else scores[scores["head"] == target]
            meta["targets"][target] = {
                "concentration": concentration(by_head.groupby("sample_id").score.mean()),
                "cut_score": float(group[group.set == f"{target}:top"].score.min()),
                "sets": sorted(group.set.unique())}
        with atomic_dir(OUT) as tmp:
            write_parquet(tmp / "sets.parquet", pa.Table.from_pandas(sets, preserve_index=False))
            write_json(tmp / "meta.json", meta)
            plot_cut(scores, meta, tmp / "sorted_influence.png")
        run.log_metric("k", k)
        run.log_artifacts(OUT, artifact_path="select")


if __name__ == "__main__":
    run_stage(main)
