"""Stage `report`: the evaluation as a document a researcher reads — `report.md`, a
self-contained `report.html` (images embedded) and the PNGs.

The verdicts are computed from the evaluation's numbers by the fixed rules in `verdicts`;
the text never claims more than the tests give.
"""

from __future__ import annotations

import base64
import html
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from mda import plots
from mda.evaluate import CONTROLS, EFFECT_LABELS, TABLES
from mda.interventions import ARMS

ARM_COLOURS = {"baseline": "black", "remove-top": "tab:red", "remove-random": "lightcoral",
               "remove-bottom": "tab:purple", "augment-top": "tab:blue", "augment-random": "lightskyblue",
               "augment-synthetic": "tab:green"}
ALPHA = 0.05


# ----------------------------------------------------------------------------- a document, two renderings
class Document:
    """Blocks rendered both as Markdown and as one HTML file with the images inlined.
    Inline markup in text: **bold** and `code`."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def heading(self, level: int, text: str):
        self.blocks.append(("heading", level, text))

    def paragraph(self, text: str):
        self.blocks.append(("paragraph", text))

    def bullets(self, items: list[str]):
        self.blocks.append(("bullets", items))

    def table(self, frame: pd.DataFrame):
        self.blocks.append(("table", frame))

    def image(self, path: Path, caption: str, link: str | None = None):
        """A PNG: embedded from `path` in the HTML, linked as `link` (default: its file name,
        relative to the Markdown file) in Markdown."""
        self.blocks.append(("image", Path(path), caption, link or Path(path).name))

    def code(self, text: str):
        self.blocks.append(("code", text))

    def markdown(self) -> str:
        out = []
        for kind, *rest in self.blocks:
            if kind == "heading":
                out.append("#" * rest[0] + " " + rest[1])
            elif kind == "paragraph":
                out.append(rest[0])
            elif kind == "bullets":
                out.append("\n".join(f"- {item}" for item in rest[0]))
            elif kind == "table":
                frame = rest[0]
                cells = lambda row: "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"
                out.append("\n".join([cells(frame.columns), cells(["---"] * len(frame.columns))]
                                     + [cells(r) for r in frame.itertuples(index=False)]))
            elif kind == "image":
                out.append(f"![{rest[1]}]({rest[2]})\n\n*{rest[1]}*")
            elif kind == "code":
                out.append("```\n" + rest[0].rstrip("\n") + "\n```")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        out = []
        for kind, *rest in self.blocks:
            if kind == "heading":
                out.append(f"<h{rest[0]}>{_inline(rest[1])}</h{rest[0]}>")
            elif kind == "paragraph":
                out.append(f"<p>{_inline(rest[0])}</p>")
            elif kind == "bullets":
                out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in rest[0]) + "</ul>")
            elif kind == "table":
                frame = rest[0]
                head = "".join(f"<th>{_inline(str(c))}</th>" for c in frame.columns)
                body = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>"
                               for row in frame.itertuples(index=False))
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif kind == "image":
                data = base64.b64encode(rest[0].read_bytes()).decode()
                out.append(f'<figure><img alt="{html.escape(rest[1])}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{_inline(rest[1])}</figcaption></figure>")
            elif kind == "code":
                out.append(f"<pre>{html.escape(rest[0])}</pre>")
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
                 "table{border-collapse:collapse;margin:1em 0;font-size:90%}"
                 "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}"
                 "img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow-x:auto}"
                 "figcaption{font-style:italic;color:#444}code{background:#f0f0f0}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def in_arm_order(by_arm: dict) -> dict:
    """A per-arm dict (JSON sorts keys) back in `ARMS` order."""
    return dict(sorted(by_arm.items(), key=lambda item: ARMS.index(item[0]) if item[0] in ARMS else len(ARMS)))


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


# ----------------------------------------------------------------------------- formatting
def fmt(value, digits: int = 3) -> str:
    """A number for a table cell; "—" for a missing one (None or NaN)."""
    if value is None or not np.isfinite(value):
        return "—"
    return f"{value:,.{digits}f}"


def with_ci(mean, low, high, digits: int = 3) -> str:
    if mean is None or not np.isfinite(mean):
        return "—"
    if low is None or not np.isfinite(low):
        return f"{mean:+.{digits}f}"
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


# ----------------------------------------------------------------------------- verdicts
def verdicts(ev: dict) -> list[str]:
    """The report's answer to the three hypotheses, from the evaluation's numbers: "supported"
    needs the hypothesised direction (against the baseline and beyond the random sets' mean)
    and one-sided p ≤ 0.05."""
    per_arm, tests, s = ev["per_arm"], ev["tests"], ev["summary"]
    lines = []
    for arm, claim, sign in (("remove-top", "Removing the top-k set delays emergence more than removing a random set", +1),
                             ("augment-top", "Duplicating the top-k set advances emergence more than duplicating a random set", -1)):
        t = tests[(tests.arm == arm)] if len(tests) else tests
        d = per_arm[(per_arm.arm == arm) & (per_arm.effect == "delay")]
        if d.empty or t.empty:
            lines.append(f"{claim}: **not tested** — the runs it needs are missing.")
            continue
        d, delay, auc = d.iloc[0], t[t.effect == "delay"].iloc[0], t[t.effect == "delta_auc"].iloc[0]
        in_direction = sign * delay.targeted > 0 and sign * (delay.targeted - delay.random_mean) > 0
        state = ("supported" if in_direction and delay.p_value <= ALPHA else
                 "in the hypothesised direction, not significant" if in_direction else "not shown")
        never = (f" In {d.not_emerged} seed(s) `{arm}` never reached the threshold; those have no delay."
                 if d.not_emerged else "")
        lines.append(
            f"{claim}: **{state}**. `{arm}` shifted emergence by {with_ci(d['mean'], d.ci_low, d.ci_high, 0)} steps "
            f"(mean [95 % CI] over {d.seeds} probe seeds; + = later); `{delay.control}` by "
            f"{delay.random_mean:+,.0f} (sd {fmt(delay.random_sd, 0)} over {delay.random_sets} random sets). "
            f"One-sided p = {delay.p_value:.2f} (the smallest possible with {delay.random_sets} random sets: "
            f"{delay.min_p:.2f}). Mean score over the window: Δ {auc.targeted:+.3f} vs {auc.random_mean:+.3f} "
            f"for random sets, p = {auc.p_value:.2f}.{never}")
    c = s["icl_coupling"]
    r, p = c["pearson_r"], c["p_value"]
    claim = "In-context learning moves with the head"
    if r is None or not np.isfinite(r):
        lines.append(f"{claim}: **not tested** — fewer than 3 trained models, or no variation in one of the "
                     "two effects.")
    else:
        targeted = [v for a, v in c["sign_agreement"].items() if a in CONTROLS]
        in_direction = r > 0 and all(v >= 0.5 for v in targeted)
        state = ("supported" if in_direction and p <= ALPHA else
                 "in the hypothesised direction, not significant" if in_direction else "not shown")
        lines.append(
            f"{claim}: **{state}**. Over {c['models']} trained models, Pearson r between Δ target score and ICL "
            f"gain at the window end = {r:+.2f} (one-sided p = {p:.2g}); both move the same way in "
            + ", ".join(f"{v:.0%} of `{a}`" for a, v in in_arm_order(c["sign_agreement"]).items()) + " seeds.")
    return lines


def caveats(ev: dict) -> list[str]:
    s = ev["summary"]
    out = [
        f"Arms whose data do not depend on a seed ({', '.join(f'`{a}`' for a in s['fixed_arms'])}) are trained "
        "once — training is deterministic — and evaluated with each seed's probe, so their intervals measure "
        "probe noise only. Random arms train one model per seed (a new random set each), so their spread also "
        "holds set-to-set and training variation.",
        f"Emergence is the first step at which the target score reaches {s['threshold']:.0%} of the baseline's "
        f"window-end score (same probe seed), interpolated linearly between evaluations every "
        f"{s['eval_every']} steps.",
        "The targeted-vs-random p-value ranks the targeted arm's effect among the random sets' effects "
        "(a Monte-Carlo permutation test over which samples are edited). More seeds (`retrain.seeds`) give "
        "more random sets and a finer p.",
    ]
    base = ev["effects"][ev["effects"].arm == "baseline"]
    if (base.emergence_step <= s["window"][0]).any():
        out.insert(0, "**The baseline is already at the emergence threshold at the window start, so emergence "
                      "cannot move earlier there and delays are not informative: the target did not form inside "
                      "this window.**")
    timing = ev["edit_timing"].groupby("arm")[["edited_rows", "before_emergence"]].sum()
    shares = [f"`{arm}` {timing.before_emergence[arm] / timing.edited_rows[arm]:.0%}" for arm in CONTROLS
              if arm in timing.index and timing.edited_rows[arm]]
    if shares:
        out.append(f"Share of edits made before the baseline's emergence (step {s['edits_before_step']:,.0f}): "
                   f"{', '.join(shares)}. Only those can move emergence; the rest act on a head that has already "
                   "formed and show only in the later score (see *When the edits happen*).")
    if s["missing_runs"]:
        out.insert(0, "**Missing runs (not evaluated, not filled in): " + ", ".join(s["missing_runs"]) + ".**")
    return out


# ----------------------------------------------------------------------------- figures
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
            if np.isfinite(row.ci_low):
                ax.plot([row.ci_low, row.ci_high], [yi, yi], color=colour, lw=2)
            ax.plot([row["mean"]], [yi], "o", color=colour, ms=7)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(y)
        ax.set_yticklabels(arms)
        ax.set_xlabel(EFFECT_LABELS[effect])
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_title("Effect vs baseline (mean, 95 % CI over seeds)", loc="left")
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


# ----------------------------------------------------------------------------- the report
def headline_table(ev: dict) -> pd.DataFrame:
    effects, per_arm, tests = ev["effects"], ev["per_arm"], ev["tests"]
    rows = []
    for arm, g in effects.groupby("arm", sort=False):
        row = {"arm": arm, "seeds": len(g),
               "emergence step": fmt(g.emergence_step.mean(), 0) if g.emergence_step.notna().all()
               else f"{fmt(g.emergence_step.mean(), 0)} ({g.emergence_step.isna().sum()} never)",
               "score at window end": f"{g.score_end.mean():.3f}",
               "ICL score at window end": f"{g.icl_end.mean():+.3f}"}
        for effect, label, digits in (("delay", "delay (steps)", 0), ("delta_score", "Δ score", 3),
                                      ("icl_gain", "ICL gain", 3)):
            p = per_arm[(per_arm.arm == arm) & (per_arm.effect == effect)]
            row[label] = "ref." if arm == "baseline" else (with_ci(*p[["mean", "ci_low", "ci_high"]].iloc[0], digits)
                                                           if len(p) else "—")
        t = tests[(tests.arm == arm)] if len(tests) else tests
        row["p vs random (delay / AUC)"] = " / ".join(
            f"{t[t.effect == e].p_value.iloc[0]:.2f}" for e in ("delay", "delta_auc")) if len(t) else ""
        rows.append(row)
    return pd.DataFrame(rows)


def edit_timing_table(timing: pd.DataFrame) -> pd.DataFrame:
    by_arm = timing.groupby("arm", sort=False)[["edited_rows", "before_emergence", "median_step"]].mean()
    return pd.DataFrame({"arm": by_arm.index, "runs": timing.groupby("arm", sort=False).size().to_numpy(),
                         "edited rows": [f"{v:,.0f}" for v in by_arm.edited_rows],
                         "before emergence": [f"{b:,.0f} ({b / max(n, 1):.0%})" for b, n in
                                              zip(by_arm.before_emergence, by_arm.edited_rows)],
                         "median step": [fmt(v, 0) for v in by_arm.median_step]})


def build_report(ev: dict, scores: pd.DataFrame, params_text: str, commit: str,
                 out: Path) -> Document:
    """Write the PNGs into `out` and return the document that embeds them."""
    s = ev["summary"]
    figures = {name: out / f"{name}.png" for name in
               ("trajectories", "effects", "icl_vs_induction", "enrichment", "influence", "transfer")}
    plot_arm_trajectories(ev["curves"], ev["effects"], s, figures["trajectories"])
    plot_effects(ev["per_arm"], figures["effects"])
    plot_icl_coupling(ev["curves"], ev["effects"], s, figures["icl_vs_induction"])
    plot_enrichment(ev["enrichment"], s, figures["enrichment"])
    window_scores = scores if s["target"] == "union" else scores[scores["head"] == s["target"]]
    plot_influence(window_scores, s["k"], figures["influence"])
    if len(ev["transfer"]):
        plot_transfer(ev["transfer"], s["unit"], figures["transfer"])

    doc = Document()
    doc.heading(1, f"mda report: did the data make {', '.join(s['heads'])}?")
    doc.paragraph(f"Unit `{s['unit']}` (metric `{s['metric']}`), target head(s) {', '.join(s['heads'])}, "
                  f"formation window steps {s['window'][0]:,} → {s['window'][1]:,} "
                  f"({s['window_samples']:,} samples); sets chosen on `{s['target']}`, k = {s['k']:,}. "
                  f"Made from commit `{commit}`.")
    doc.heading(2, "Answer")
    doc.bullets(verdicts(ev))
    doc.heading(2, "Headline numbers")
    doc.paragraph("Effects are arm − baseline with the same probe seed; mean with 95 % t-interval over seeds. "
                  "ICL gain = baseline ICL score − arm ICL score (+ = more in-context learning). "
                  "p: one-sided, targeted arm vs its random control.")
    doc.table(headline_table(ev))
    doc.heading(2, "How to read these numbers")
    doc.bullets(caveats(ev))
    if len(ev["edit_timing"]):
        doc.heading(2, "When the edits happen")
        doc.paragraph(f"An edit can only move emergence if it happens before the head forms: rows removed or "
                      f"copies placed per arm (mean over the runs' edits) and how many of them come before the "
                      f"baseline's emergence (step {s['edits_before_step']:,.0f}).")
        doc.table(edit_timing_table(ev["edit_timing"]))
    doc.heading(2, "Trajectories")
    doc.image(figures["trajectories"], "Target head score and ICL score per arm during retraining; band: range over seeds.")
    doc.image(figures["effects"], "Effect of each arm against the baseline, mean and 95 % CI over seeds.")
    doc.heading(2, "In-context learning and the head")
    doc.image(figures["icl_vs_induction"], "Left: ICL score against the target score along each run. "
                                           "Right: per run, Δ target score against ICL gain at the window end.")
    doc.heading(2, "Transfer to other heads")
    if len(ev["transfer"]):
        t = in_arm_order(s["transfer"])
        doc.table(pd.DataFrame([{"arm": a, "target |Δ|": fmt(v["abs_delta_target"]),
                                 f"other {s['unit']} heads |Δ| (n)": f"{fmt(v['abs_delta_same_kind'])} ({v['same_kind_heads']})",
                                 f"non-{s['unit']} heads |Δ| (n)": f"{fmt(v['abs_delta_other'])} ({v['other_heads']})",
                                 "ratio": fmt(v["same_kind_over_other"], 2)} for a, v in t.items()]))
        doc.paragraph(f"A head counts as another `{s['unit']}` head when its score at the window end in the baseline "
                      f"run is ≥ `evaluate.same_kind_score`. The paper reports about 10× larger effects on other "
                      "induction heads than on the rest.")
        doc.image(figures["transfer"], "Mean absolute change of each kind of head at the window end, per arm.")
    doc.heading(2, "Catalysts: what the top-k set is made of")
    e = ev["enrichment"].sort_values("enrichment", ascending=False)
    doc.table(pd.DataFrame({"domain": e.domain, "top-k share": [f"{v:.1%}" for v in e.top_share],
                            "window share": [f"{v:.1%}" for v in e.window_share],
                            "enrichment [95 % CI]": [f"{r:.2f} [{lo:.2f}, {hi:.2f}]" for r, lo, hi in
                                                     zip(e.enrichment, e.ci_low, e.ci_high)]}))
    doc.image(figures["enrichment"], "Share of each domain in the top-k set over its share in the window.")
    top = ev["top_samples"]
    if len(top):
        doc.paragraph("The most influential samples, decoded with the corpus tokenizer:")
        doc.table(pd.DataFrame({"rank": top["rank"], "sample": top.sample_id, "step": top.step, "domain": top.domain,
                                "score": [f"{v:.3g}" for v in top.score],
                                "text (first 300 characters)": [("`" + t[:300].replace("`", "'") + ("…" if len(t) > 300 else "") + "`")
                                                                if isinstance(t, str) else "(no tokenizer)" for t in top.text]}))
    doc.heading(2, "Influence distribution")
    doc.image(figures["influence"], "Influence of every window sample on the probe, by domain, and its concentration.")
    doc.heading(2, "Provenance")
    doc.paragraph(f"Commit `{commit}`; the `params.yaml` this report was made from:")
    doc.code(params_text)
    return doc


def write_report(doc: Document, out: Path, title: str) -> None:
    from mda.io import atomic_file

    with atomic_file(out / "report.md") as tmp:
        tmp.write_text(doc.markdown())
    with atomic_file(out / "report.html") as tmp:
        tmp.write_text(doc.html(title))


def read_evaluation(directory: str | os.PathLike) -> dict:
    """The tables `evaluate` wrote, by name."""
    from mda.errors import MdaError
    from mda.io import read_json

    directory = Path(directory)
    ev = {"summary": read_json(directory / "summary.json", "run the evaluate stage")}
    for name in TABLES:
        try:
            ev[name] = pd.read_parquet(directory / f"{name}.parquet")
        except FileNotFoundError:
            raise MdaError(f"{directory / name}.parquet: missing; run the evaluate stage") from None
    return ev
