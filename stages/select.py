"""DVC stage `select`: top-k, bottom-k and seeded random sets → data/select/sets.parquet + meta.json."""

import pandas as pd
import pyarrow as pa

from mda.core.cli import run_stage
from mda.core.errors import MdaError
from mda.attribute.scoring import concentration
from mda.intervene.edits import select_sets, set_size
from mda.core.io import atomic_dir, read_targets, write_json, write_parquet
from mda.core.tracking import stage_run

SCORES, TARGETS, OUT = "data/scores/scores.parquet", "data/locate/targets.json", "data/select"


def main(params):
    sel = params.select
    with stage_run("select", {"select": sel, "retrain.seeds": params.retrain.seeds}) as run:
        try:
            scores = pd.read_parquet(SCORES)
        except FileNotFoundError:
            raise MdaError(f"{SCORES}: missing; run the scores stage") from None
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


def plot_cut(scores, meta, path):
    import numpy as np

    from mda.core import plots

    fig, ax = plots.plt.subplots(figsize=(8, 4.5))
    for head, g in scores.groupby("head"):
        v = np.sort(g.score.to_numpy())[::-1]
        ax.plot(np.arange(1, len(v) + 1), v, lw=1.5, label=head)
    ax.axvline(meta["k"], color="tab:orange", ls="--", label=f"top-k cut (k = {meta['k']})")
    ax.axvline(meta["window_samples"] - meta["k"], color="tab:purple", ls=":", label="bottom-k cut")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("rank (log)")
    ax.set_ylabel("influence score (positive: raises the probe)")
    ax.set_title("Sorted influence of the window's samples")
    ax.legend(fontsize=8)
    plots.save(fig, path)


if __name__ == "__main__":
    run_stage(main)
