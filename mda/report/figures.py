"""The report's figures: one function per PNG, each a pure function of evaluation tables."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mda.core import plots
from mda.evaluate.effects import EFFECT_LABELS
from mda.evaluate.fmt import fmt
from mda.evaluate.unit_level import LEVEL_LABELS, LEVELS

ARM_COLOURS = {"baseline": "black", "remove-top": "tab:red", "remove-random": "lightcoral",
               "remove-matched": "tab:brown", "remove-bottom": "tab:purple", "augment-top": "tab:blue",
               "augment-random": "lightskyblue", "augment-matched": "tab:cyan", "augment-synthetic": "tab:green"}


def plot_arm_trajectories(curves: pd.DataFrame, effects: pd.DataFrame, summary: dict, path) -> None:
    """Target score and ICL score per arm: mean over seeds, band = range over seeds."""
    fig, axes = plots.plt.subplots(1, 2, figsize=(13, 4.8))
    for arm, g in curves.groupby("arm", sort=False):
        colour = ARM_COLOURS.get(arm, "grey")
        for ax, col in zip(axes, ("target_score", "icl_score")):
            by_step = g.groupby("step")[col]
            mean, low, high = by_step.mean(), by_step.min(), by_step.max()
            n = g.seed.nunique()
            ax.plot(mean.index, mean.to_numpy(), color=colour, lw=2.2 if arm == "baseline" else 1.6,
                    label=f"{arm} ({n} seed{'s' if n > 1 else ''})")
            if n > 1:
                ax.fill_between(mean.index, low.to_numpy(), high.to_numpy(), color=colour, alpha=0.15, lw=0)
    start, end = summary["window"]
    level = effects[effects.arm == "baseline"].threshold_level.mean()
    axes[0].axhline(level, color="grey", ls="--", lw=1, label=f"emergence threshold ({summary['threshold']:.0%} of baseline end)")
    for ax in axes:
        ax.axvline(end, color="tab:orange", ls=":", lw=1.2, label="window end")
        ax.set_xlabel(f"training step (window {start:,} → {end:,})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"target {summary['metric']} score ({', '.join(summary['heads'])})")
    axes[0].set_title("Target head during retraining (band: range over seeds)")
    axes[1].set_ylabel("ICL score (nats; lower = more in-context learning)")
    axes[1].set_title("In-context learning during retraining")
    axes[0].legend(fontsize=8, loc="upper left")
    plots.save(fig, path)


def plot_effects(per_arm: pd.DataFrame, path) -> None:
    """Forest plot: per arm, mean effect and interval over seeds, for delay and Δ score."""
    arms = list(dict.fromkeys(per_arm.arm))
    fig, axes = plots.plt.subplots(1, 3, figsize=(13, 0.6 * len(arms) + 2.2), sharey=True)
    for ax, effect in zip(axes, ("delay", "delta_score", "icl_gain")):
        g = per_arm[per_arm.effect == effect].set_index("arm").reindex(arms)
        y = np.arange(len(arms))[::-1]
        for yi, (arm, row) in zip(y, g.iterrows()):
            colour = ARM_COLOURS.get(arm, "grey")
            probe_noise = row.get("interval") == "probe"  # one model's probe draws: dashed, hollow
            if np.isfinite(row.ci_low):
                ax.plot([row.ci_low, row.ci_high], [yi, yi], color=colour, lw=2, ls=":" if probe_noise else "-")
            ax.plot([row["mean"]], [yi], "o", color=colour, ms=7, mfc="white" if probe_noise else colour)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(y)
        ax.set_yticklabels(arms)
        ax.set_xlabel(EFFECT_LABELS[effect])
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_title("Effect vs baseline: mean and 95 % interval — solid: between trained models; "
                      "hollow, dotted: arms trained once (probe noise only)", loc="left", fontsize=9)
    plots.save(fig, path)


def plot_icl_coupling(curves: pd.DataFrame, effects: pd.DataFrame, summary: dict, path) -> None:
    fig, axes = plots.plt.subplots(1, 2, figsize=(13, 4.8))
    for arm, g in curves.groupby("arm", sort=False):
        m = g.groupby("step")[["target_score", "icl_score"]].mean()
        axes[0].plot(m.target_score, m.icl_score, "-", color=ARM_COLOURS.get(arm, "grey"), lw=1.5, label=arm)
    axes[0].set_xlabel(f"target {summary['metric']} score (mean over seeds)")
    axes[0].set_ylabel("ICL score (nats; lower = more ICL)")
    axes[0].set_title("ICL vs induction score along each run")
    axes[0].legend(fontsize=8)
    e = effects[effects.arm != "baseline"]
    for arm, g in e.groupby("arm", sort=False):
        axes[1].scatter(g.delta_score, g.icl_gain, color=ARM_COLOURS.get(arm, "grey"), s=40, label=arm,
                        edgecolor="black", lw=0.5)
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].axvline(0, color="grey", lw=0.8)
    c = summary["icl_coupling"]
    axes[1].set_title(f"Effects at the window end, per run (r over {c['models']} models = {fmt(c['pearson_r'], 2)})")
    axes[1].set_xlabel("Δ target score vs baseline")
    axes[1].set_ylabel("ICL gain vs baseline (nats; + = more ICL)")
    axes[1].legend(fontsize=8)
    plots.save(fig, path)


def plot_enrichment(enrichment: pd.DataFrame, summary: dict, path) -> None:
    e = enrichment.sort_values("enrichment", ascending=False)
    fig, ax = plots.plt.subplots(figsize=(8, 4.5))
    x = np.arange(len(e))
    ratio = e.enrichment.to_numpy()
    floor = 1e-2  # a domain absent from the top set has ratio 0: draw it at the axis floor
    shown = np.maximum(ratio, floor)
    err = np.vstack([shown - np.maximum(e.ci_low.to_numpy(), floor), np.maximum(e.ci_high.to_numpy(), floor) - shown])
    ax.bar(x, shown, color=["tab:red" if r > 1 else "tab:grey" for r in ratio], yerr=err, capsize=4)
    for xi, r, top in zip(x, ratio, np.maximum(e.ci_high.to_numpy(), shown)):
        ax.annotate(f"{r:.2f}×" if r > 0 else "absent", (xi, max(top, floor)), xytext=(0, 4),
                    textcoords="offset points", ha="center", fontsize=8)
    ax.axhline(1, color="black", lw=1, ls="--", label="no enrichment")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{d}\n{t:.1%} of top-k\n{w:.1%} of window" for d, t, w in
                        zip(e.domain, e.top_share, e.window_share)], fontsize=8)
    ax.set_ylabel("enrichment (share in top-k / share in window, log)")
    ax.set_title(f"Which domains the top-k set (k = {summary['k']:,}) is made of (95 % bootstrap CI)")
    ax.legend(fontsize=8)
    plots.save(fig, path)


def plot_influence(scores: pd.DataFrame, k: int, path) -> None:
    """Distribution of the window's influence scores by domain, and how concentrated it is."""
    fig, axes = plots.plt.subplots(1, 2, figsize=(13, 4.8))
    cut = np.sort(scores.score.to_numpy())[::-1][k - 1]
    bins = np.linspace(scores.score.min(), scores.score.max(), 80)
    for domain, g in scores.groupby("domain"):
        axes[0].hist(g.score, bins=bins, histtype="step", lw=1.4, label=f"{domain} ({len(g):,})")
    axes[0].axvline(cut, color="tab:orange", ls="--", label=f"top-k cut (k = {k:,})")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("influence score (positive: raises the probe)")
    axes[0].set_ylabel("window samples (log)")
    axes[0].set_title("Influence scores by domain")
    axes[0].legend(fontsize=8)
    v = np.sort(scores.score.to_numpy())[::-1]
    positive = v.clip(min=0)
    share = np.cumsum(positive) / positive.sum() if positive.sum() > 0 else np.zeros_like(v)
    rank = np.arange(1, len(v) + 1) / len(v) * 100
    axes[1].plot(rank, share * 100, color="tab:red", lw=2)
    axes[1].plot([0, 100], [0, 100], color="grey", ls=":", label="evenly spread")
    axes[1].axvline(k / len(v) * 100, color="tab:orange", ls="--", label=f"top-k = {k / len(v):.0%} of the window")
    axes[1].set_xlabel("samples, by decreasing influence (% of window)")
    axes[1].set_ylabel("cumulative share of positive influence (%)")
    axes[1].set_title("Concentration of influence")
    axes[1].legend(fontsize=8)
    axes[1].grid(alpha=0.3)
    plots.save(fig, path)


def plot_transfer(transfer: pd.DataFrame, unit: str, path) -> None:
    kinds = ("target", "same_kind", "other")
    arms = list(dict.fromkeys(transfer.arm))
    count = lambda kind: transfer[transfer.arm == arms[0]].kind.eq(kind).sum()
    fig, ax = plots.plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        means = [transfer[(transfer.arm == a) & (transfer.kind == kind)].delta_mean.abs().mean() for a in arms]
        ax.bar(np.arange(len(arms)) + (i - 1) * width, np.nan_to_num(means), width,
               label={"target": "target head", "same_kind": f"other {unit} heads (n = {count(kind)})",
                      "other": f"non-{unit} heads (n = {count(kind)})"}[kind])
    ax.set_xticks(np.arange(len(arms)))
    ax.set_xticklabels(arms, fontsize=9)
    ax.set_ylabel("mean |Δ score at window end| vs baseline")
    ax.set_title("Transfer: how much each arm moved each kind of head")
    ax.legend(fontsize=8)
    plots.save(fig, path)


def plot_unit_levels(unit_curves: pd.DataFrame, unit_effects: pd.DataFrame, summary: dict, path) -> None:
    """Per level (target head, best of its layer, best of the model): the score per arm, mean over
    seeds, with the level's own emergence threshold."""
    fig, axes = plots.plt.subplots(1, len(LEVELS), figsize=(15, 4.6), sharey=True)
    start, end = summary["window"]
    for ax, level in zip(axes, LEVELS):
        g = unit_curves[unit_curves.level == level]
        for arm, a in g.groupby("arm", sort=False):
            mean = a.groupby("step").score.mean()
            ax.plot(mean.index, mean.to_numpy(), color=ARM_COLOURS.get(arm, "grey"),
                    lw=2.2 if arm == "baseline" else 1.5, label=arm)
        e = unit_effects[(unit_effects.level == level) & (unit_effects.arm == "baseline")]
        ax.axhline(e.threshold_level.mean(), color="grey", ls="--", lw=1, label="emergence threshold")
        ax.axvline(end, color="tab:orange", ls=":", lw=1.2)
        ax.set_title(LEVEL_LABELS[level])
        ax.set_xlabel(f"training step (window {start:,} → {end:,})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{summary['metric']} score (mean over seeds)")
    axes[0].legend(fontsize=8, loc="upper left")
    plots.save(fig, path)
