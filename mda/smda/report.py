"""The SMDA report (`reports/smda/`): what the SAE, the policy, the influence scores, the
curation and the fine-tuning runs show, with the plots; rendered by `mda.report.build.Document`.

Split by job: `read_results` (I/O), the `plot_*` functions (figures), `build_report` (text and
tables from the numbers; verdicts by fixed rules, never more than the numbers give).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from mda.core import plots
from mda.core.io import read_json, read_table
from mda.evaluate.fmt import fmt, with_ci
from mda.report.document import Document
from mda.smda.evaluate import set_order

SET_COLOURS = {"full": "tab:gray", "curated": "tab:blue", "random": "lightcoral", "oracle": "tab:green"}


def set_colour(name: str) -> str:
    """A set's colour by its kind (`curated-sign` is a curated set)."""
    return SET_COLOURS.get(name.split("-", 1)[0], "tab:purple")
TOP_PAIRS = 12


# ----------------------------------------------------------------------------- I/O
def read_results(root: str | os.PathLike) -> dict:
    """Everything the report shows, from `data/smda/<stage>/`."""
    root = Path(root)
    tables = {"features": "policy/features.parquet", "prompts": "policy/prompts.parquet",
              "scores": "influence/scores.parquet", "per_feature": "influence/per_feature.parquet",
              "curation": "curate/curation.parquet", "runs": "evaluate/runs.parquet",
              "per_set": "evaluate/per_set.parquet", "hypothesis": "evaluate/hypothesis.parquet",
              "pairs": "task/pairs.parquet", "truth": "task/truth.parquet"}
    out = {}
    for name, rel in tables.items():
        out[name] = read_table(root / rel, f"smda-{rel.split('/')[0]}")
    jsons = {"task": "task/meta.json", "sae": "sae/metrics.json", "policy": "policy/policy.json",
             "influence": "influence/meta.json", "curate": "curate/summary.json", "evaluate": "evaluate/summary.json"}
    for name, rel in jsons.items():
        out[name] = read_json(root / rel, f"run the smda-{rel.split('/')[0]} stage")
    return out


# ----------------------------------------------------------------------------- figures
def plot_policy(features: pd.DataFrame, path) -> None:
    kept = features[features.kept].sort_values("weight")
    fig, ax = plots.plt.subplots(figsize=(7, 0.35 * len(kept) + 1.5))
    colours = ["tab:red" if d > 0 else "tab:blue" for d in kept.difference]
    ax.barh([f"latent {int(l)}" for l in kept.latent], kept.weight, color=colours)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("policy coefficient W_j (Y = log p(refusal prefix) ≈ X·W)")
    ax.set_title("Policy coefficients (red: feature higher on harmful prompts; blue: on harmless)", fontsize=10)
    plots.save(fig, path)


def plot_pathways(scores: pd.DataFrame, path) -> None:
    fig, ax = plots.plt.subplots(figsize=(7, 5.5))
    truth = scores["mislabelled"] if "mislabelled" in scores else pd.Series(False, index=scores.index)
    for harmful, colour in ((True, "tab:red"), (False, "tab:blue")):
        for bad, marker in ((False, "o"), (True, "x")):
            sub = scores[(scores.harmful == harmful) & (truth == bad)]
            if len(sub):
                label = f"{'harmful' if harmful else 'harmless'} prompt{', mislabelled' if bad else ''}"
                ax.scatter(sub.score_x, sub.score_y, c=colour, marker=marker, s=22, alpha=0.75, label=label)
    ax.axhline(0, color="black", lw=0.6)
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xscale("symlog", linthresh=_linthresh(scores.score_x))
    ax.set_yscale("symlog", linthresh=_linthresh(scores.score_y))
    ax.set_xlabel("X pathway: ΔW_X·W (feature activations)")
    ax.set_ylabel("Y pathway: ΔW_Y·W (refusal probability)")
    ax.set_title("Each SFT pair's influence on the policy, by pathway (symlog axes)")
    ax.legend(fontsize=8)
    plots.save(fig, path)


def _linthresh(values: pd.Series) -> float:
    v = np.abs(values.to_numpy(float))
    v = v[v > 0]
    return float(np.quantile(v, 0.1)) if len(v) else 1.0


def plot_score_classes(scores: pd.DataFrame, medians: dict, path) -> None:
    """Scores per class (and ground truth), with the two medians the curation rule compares to."""
    fig, ax = plots.plt.subplots(figsize=(7, 4))
    groups = [(True, False), (True, True), (False, False), (False, True)]
    labels, data = [], []
    for harmful, bad in groups:
        sub = scores[(scores.harmful == harmful) & (scores.get("mislabelled", False) == bad)]
        if len(sub):
            labels.append(f"{'harmful' if harmful else 'harmless'}\n{'mislabelled' if bad else 'clean'} (n={len(sub)})")
            data.append(sub.score.to_numpy(float))
    ax.boxplot(data, vert=False, showfliers=True)
    ax.set_yticks(range(1, len(labels) + 1), labels)
    ax.axvline(medians["harmful"], color="tab:red", ls="--", label=f"median, harmful pairs ({medians['harmful']:.3g})")
    ax.axvline(medians["harmless"], color="tab:blue", ls="--", label=f"median, harmless pairs ({medians['harmless']:.3g})")
    ax.set_xscale("symlog", linthresh=_linthresh(scores.score))
    ax.set_xlabel("score (ΔW_X + ΔW_Y)·W, symlog")
    ax.set_title("Scores by declared class and ground truth")
    ax.legend(fontsize=8)
    plots.save(fig, path)


def plot_top_pairs(per_feature: pd.DataFrame, scores: pd.DataFrame, path) -> list[int]:
    """Heatmap of ΔW_j·W_j per feature and pathway for the pairs with the largest |score|."""
    top = scores.reindex(scores.score.abs().sort_values(ascending=False).index).head(TOP_PAIRS)
    latents = sorted(per_feature.latent.unique())
    rows = []
    for pid in top.pair_id:
        sub = per_feature[per_feature.pair_id == pid].set_index("latent")
        rows.append(np.concatenate([sub.x.reindex(latents).to_numpy(), sub.y.reindex(latents).to_numpy()]))
    grid = np.array(rows)
    fig, ax = plots.plt.subplots(figsize=(0.45 * grid.shape[1] + 3, 0.4 * len(rows) + 2))
    limit = np.abs(grid).max() or 1.0
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [f"X:{l}" for l in latents] + [f"Y:{l}" for l in latents], rotation=90,
                  fontsize=8)
    truth = top["mislabelled"] if "mislabelled" in top else pd.Series(False, index=top.index)
    ax.set_yticks(range(len(top)), [f"pair {p} ({'harm' if h else 'safe'}{', mislab.' if b else ''})"
                                    for p, h, b in zip(top.pair_id, top.harmful, truth)], fontsize=8)
    ax.axvline(len(latents) - 0.5, color="black", lw=1)
    fig.colorbar(image, ax=ax, label="ΔW_j·W_j")
    ax.set_title(f"Per-feature decomposition of the {len(top)} pairs with the largest |score|")
    plots.save(fig, path)
    return top.pair_id.tolist()


def plot_sft(per_set: pd.DataFrame, before: dict, path) -> None:
    metrics = ["soft_f1", "soft_correctness", "greedy_f1", "greedy_accuracy"]
    sets = set_order(per_set.set)
    fig, ax = plots.plt.subplots(figsize=(8 + 0.4 * max(0, len(sets) - 4), 4))
    width = 0.8 / max(1, len(sets))
    for i, name in enumerate(sets):
        sub = per_set[per_set.set == name].set_index("metric").reindex(metrics)
        x = np.arange(len(metrics)) + (i - (len(sets) - 1) / 2) * width
        err = np.vstack([sub["mean"] - sub["low"], sub["high"] - sub["mean"]])
        ax.bar(x, sub["mean"], width, yerr=np.nan_to_num(err), capsize=3, color=set_colour(name), label=name)
    for j, metric in enumerate(metrics):
        ax.hlines(before[metric], j - 0.45, j + 0.45, color="black", lw=1.5, label="instruct (before SFT)" if j == 0 else None)
    ax.set_xticks(range(len(metrics)), [m.replace("_", " ") for m in metrics])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out refusal metric (mean, 95 % CI over seeds)")
    ax.set_title("Refusal after SFT on each set")
    ax.legend(fontsize=8, loc="lower right")
    plots.save(fig, path)


# ----------------------------------------------------------------------------- text
def curation_table(curate: dict) -> pd.DataFrame:
    rows = []
    declared = set(curate.get("declared_in_advance", []))
    for rule, t in curate["truth"].items():
        pathways = curate.get("per_rule", {}).get(rule, {}).get("pathways", {}).get("removed", {})
        rows.append({"rule": rule + (" (used)" if rule == curate["rule"] else "")
                     + (" (declared in advance)" if rule in declared else ""),
                     "removed": curate.get("per_rule", {}).get(rule, {}).get("removed", "—"),
                     "precision": fmt(t["precision"]), "recall": fmt(t["recall"]),
                     "random: precision [95 % range]": f"{fmt(t['random_precision_mean'])} "
                                                       f"[{fmt(t['random_precision_low'])}, {fmt(t['random_precision_high'])}]",
                     "random: recall [95 % range]": f"{fmt(t['random_recall_mean'])} "
                                                    f"[{fmt(t['random_recall_low'])}, {fmt(t['random_recall_high'])}]",
                     "p (precision ≥ random)": fmt(t["p_precision"]),
                     "ΔX share of removed pairs' |score|": fmt(pathways.get("x_share"))})
    return pd.DataFrame(rows)


def sft_table(per_set: pd.DataFrame, runs: pd.DataFrame, before: dict) -> pd.DataFrame:
    metrics = ["soft_f1", "soft_correctness", "greedy_f1", "greedy_accuracy"]
    rows = [{"set": "instruct (no SFT)", "pairs": "—", **{m: fmt(before[m]) for m in metrics}}]
    for name in set_order(per_set.set):
        sub = per_set[per_set.set == name].set_index("metric")
        pairs = runs[runs.set == name].pairs
        rows.append({"set": name, "pairs": f"{pairs.min()}" if pairs.nunique() == 1 else f"{pairs.min()}–{pairs.max()}",
                     **{m: with_ci(sub.loc[m, "mean"], sub.loc[m, "low"], sub.loc[m, "high"]) for m in metrics}})
    return pd.DataFrame(rows)


def hypothesis_lines(hyp: pd.DataFrame) -> list[str]:
    """One verdict per comparison on soft and greedy F1: "holds" needs the hypothesised
    direction on the mean and an interval of the per-seed difference that excludes 0."""
    lines = []
    for comparison in hyp.comparison.unique():
        for metric in ("soft_f1", "greedy_f1"):
            row = hyp[(hyp.comparison == comparison) & (hyp.metric == metric)].iloc[0]
            if row.direction_holds and row.interval_excludes_zero:
                verdict = "**holds**"
            elif row.direction_holds:
                verdict = "in the hypothesised direction, **not significant**"
            else:
                verdict = "**does not hold**" + (" (the opposite is significant)" if row.interval_excludes_zero else "")
            lines.append(f"{comparison} on {metric.replace('_', ' ')}: {verdict} — difference "
                         f"{with_ci(row.mean_difference, row.low, row.high)} over {row.seeds} seeds")
    return lines


def build_report(r: dict, params_text: str, commit: str, out: Path) -> Document:
    sae, policy, curate, evaluation = r["sae"], r["policy"], r["curate"], r["evaluate"]
    scores = r["scores"].merge(r["truth"], on="pair_id", how="left") if curate["has_truth"] else r["scores"]
    figures = {name: out / f"{name}.png" for name in ("policy", "pathways", "score_classes", "top_pairs", "sft")}
    plot_policy(r["features"], figures["policy"])
    plot_pathways(scores, figures["pathways"])
    plot_score_classes(scores, curate["median_score"], figures["score_classes"])
    top_ids = plot_top_pairs(r["per_feature"], scores, figures["top_pairs"])
    plot_sft(r["per_set"], evaluation["instruct"], figures["sft"])

    doc = Document()
    image = lambda name, caption: doc.image(figures[name], caption, link=figures[name].name)  # next to report.md
    doc.heading(1, "SMDA: which fine-tuning pairs shaped refusal")
    task = r["task"]
    doc.paragraph(
        f"Task: `{task['source']}`, {task['pairs']['sft']} SFT pairs under study"
        + (f", of which **{task['mislabelled_sft']} are mislabelled** (known by construction, never shown to "
           "the method)" if task["has_truth"] else "") + f"; refusal prefixes {', '.join(f'`{p}`' for p in task['refusal_prefixes'])}.")
    doc.heading(2, "Answer")
    every, last = sae["heldout_every_position"], sae["heldout_last_token"]
    answer = [
        f"**SAE** ({sae['architecture']}, {sae['d_in']} → {sae['d_sae']} latents"
        + (f", k = {sae['k']}" if sae.get("k") else "") + f", block {sae['layer']}): explained variance "
        f"{every['explained_variance']:.3f} on held-out activations ({last['explained_variance']:.3f} at the last "
        f"prompt token); dead latents {every['dead_share']:.1%} ({last['dead_share']:.1%} never active at the last token).",
        f"**Policy**: {len(policy['features'])} features kept (|mean difference| > {policy['feature_threshold']}); "
        f"test accuracy {policy['test_accuracy']:.3f} against a majority-class baseline of "
        f"{policy['majority_baseline']:.3f} ({policy['train_prompts']} training / {policy['test_prompts']} test prompts).",
        f"**Influence**: analysed weights restored bit for bit after every SGD step: "
        f"**{str(r['influence']['restored_bit_for_bit']).lower()}**.",
    ]
    if curate["has_truth"]:
        t = curate["truth"][curate["rule"]]
        auc = curate["auc_mislabelled"]
        answer.append(
            f"**Curation vs ground truth** (rule `{curate['rule']}`, {curate['removed']} pairs removed): precision "
            f"{t['precision']:.3f} and recall {t['recall']:.3f}, against {t['random_precision_mean']:.3f} / "
            f"{t['random_recall_mean']:.3f} for random removals of the same size per class (p = {t['p_precision']:.3g}). "
            f"Within each class, the scores rank the mislabelled pairs with AUC {auc['harmful']:.3f} (harmful) and "
            f"{auc['harmless']:.3f} (harmless) — ½ is no information, 0 or 1 a perfect ranking in one direction.")
    answer += hypothesis_lines(r["hypothesis"])
    doc.bullets(answer)

    doc.heading(2, "The policy")
    image("policy", "Policy coefficients by feature.")
    kept = r["features"][r["features"].kept].sort_values("difference")
    doc.table(pd.DataFrame({"latent": kept.latent, "mean on harmful": kept.mean_harmful.map(fmt),
                            "mean on harmless": kept.mean_harmless.map(fmt), "difference": kept.difference.map(fmt),
                            "coefficient": kept.weight.map(fmt)}))
    doc.paragraph(f"Decision threshold on X·W: {policy['threshold']:.4g} (chosen on the training prompts). Refusal "
                  f"rate of the instruct model (greedy): {policy['refusal_rate']['harmful']:.1%} of harmful and "
                  f"{policy['refusal_rate']['harmless']:.1%} of harmless policy prompts.")

    doc.heading(2, "Influence of each SFT pair")
    doc.paragraph(f"One plain SGD step (lr {r['influence']['lr']}) per pair on its response tokens, measured on "
                  f"{r['influence']['probe_prompts']} policy prompts; score = (ΔW_X + ΔW_Y)·W, positive when the "
                  "step moves the policy further the way it already points.")
    image("pathways", "Each pair's X- and Y-pathway scores.")
    image("score_classes", "Scores by class; the curation rule compares each class with the other's median.")
    image("top_pairs", "Per-feature decomposition (X and Y pathways) of the top pairs.")
    pairs = r["pairs"].set_index("pair_id")
    top = scores.set_index("pair_id").loc[top_ids].reset_index()
    doc.table(pd.DataFrame({
        "pair": top.pair_id, "class": np.where(top.harmful, "harmful", "harmless"),
        **({"mislabelled": top.mislabelled.map({True: "yes", False: "no"})} if "mislabelled" in top else {}),
        "score": top.score.map(lambda v: f"{v:+.3g}"), "X pathway": top.score_x.map(lambda v: f"{v:+.3g}"),
        "Y pathway": top.score_y.map(lambda v: f"{v:+.3g}"),
        "prompt → response": [f"`{pairs.prompt[p]}` → `{pairs.response[p]}`" for p in top.pair_id]}))

    doc.heading(2, "Curation")
    doc.paragraph(f"Medians of the scores: harmful pairs {curate['median_score']['harmful']:.4g}, harmless pairs "
                  f"{curate['median_score']['harmless']:.4g}. SMDA's rule (`median`) drops harmful pairs below the "
                  "harmless median and harmless pairs above the harmful median, which presumes harmful pairs score "
                  "higher; `oriented` reads that order from the two medians (an ablation added after seeing the "
                  "scores of the quick preset, not a confirmatory test).")
    if curate["has_truth"]:
        doc.table(curation_table(curate))
    doc.heading(2, "Fine-tuning on the full, curated and random-removed sets")
    image("sft", "Held-out refusal after SFT, mean and 95 % t-interval over seeds.")
    doc.table(sft_table(r["per_set"], r["runs"], evaluation["instruct"]))
    if evaluation["missing_runs"]:
        doc.paragraph("Missing runs (not evaluated): " + ", ".join(evaluation["missing_runs"]))
    doc.paragraph("Soft metrics use p = exp(Y), the probability of a refusal prefix: correctness = mean of p on "
                  "harmful and 1 − p on harmless prompts; recall = Σp on harmful / #harmful; precision = Σp on "
                  "harmful / Σp; F1 their harmonic mean. Greedy: a generation refuses when it opens with a "
                  "refusal pattern.")
    doc.heading(2, "Provenance")
    doc.paragraph(f"Commit `{commit}`; the `params.yaml` this report was made from:")
    doc.code(params_text)
    return doc


def write_document(doc: Document, out: Path, title: str) -> None:
    """report.md (images linked next to it) and the self-contained report.html."""
    from mda.core.io import atomic_file

    with atomic_file(out / "report.md") as tmp:
        tmp.write_text(doc.markdown())
    with atomic_file(out / "report.html") as tmp:
        tmp.write_text(doc.html(title))
