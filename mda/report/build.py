"""Stage `report`'s science: the evaluation as a document a researcher reads — `report.md`, a
self-contained `report.html` (images embedded) and the PNGs under `figures/` (linked from
report.md by relative paths).

Split along its jobs: `mda.evaluate.verdicts` decides the answers by fixed rules, `mda.report.figures` draws,
`mda.evaluate.fmt` formats numbers, `mda.report.document` renders; this module lays out the document and
reads/writes files.
The text never claims more than the tests give.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from mda.report import figures as fig
from mda.report.document import Document
from mda.evaluate.effects import CONTROLS
from mda.evaluate.evaluation import TABLES
from mda.evaluate.fmt import fmt, fmt_p, in_arm_order, with_ci
from mda.evaluate.stats import RANK_TEST_MIN_SETS
from mda.report.tokens import overlap_section, token_section
from mda.evaluate.unit_level import LEVEL_LABELS, LEVELS
from mda.evaluate.verdicts import RULES, verdicts

FIGURES = "figures"  # the PNGs' directory next to report.md
PLACEMENT_TEXT = {
    "in_place": "each copy replaces a randomly chosen non-selected row of its original's **own step** — the "
                "mirror image of removal, at the same steps; a step with more copies than non-selected rows "
                "drops the rest (column *dropped* below)",
    "upweight": "the selected row's loss weight becomes 1 + `retrain.copies` in its own step and nothing else "
                "changes (the loss is still divided by all target tokens of the batch) — exactly the gradient of "
                "1 + `retrain.copies` copies of the row in its step with every other row kept; "
                "`augment-synthetic`'s new rows have no weight of their own to raise and are placed in place",
    "later": "each copy replaces a non-selected row of a uniformly drawn **later** step of the window, so most "
             "copies land after the head has formed",
}


# ----------------------------------------------------------------------------- a document, two renderings


# ----------------------------------------------------------------------------- reading guide
def caveats(ev: dict) -> list[str]:
    s = ev["summary"]
    placement = s.get("augment_placement", "later")
    out = [
        f"Arms whose data do not depend on a seed ({', '.join(f'`{a}`' for a in s['fixed_arms'])}) are trained "
        "once — training is deterministic — and evaluated with each seed's probe, so their intervals measure "
        "probe noise only. Random arms train one model per seed (a new random set each), so their spread also "
        "holds set-to-set and training variation. The two are in separate tables.",
        "Evaluation probes (`retrain.probe`, seed `retrain.probe.seed` + run seed) are a namespace of their own: "
        "none is the probe that chose the head and window (`locate.probe`) or one the influence scores were "
        "computed on (`influence.probe_seed`, `influence.overlap_seeds`).",
        f"Emergence is the first step at which the target score reaches {s['threshold']:.0%} of the baseline's "
        f"window-end score (same probe seed), interpolated linearly between evaluations every "
        f"{s['eval_every']} steps.",
        f"Augmentation placement `retrain.augment_placement: {placement}` ({s.get('copies', 1)} "
        f"cop{'y' if s.get('copies', 1) == 1 else 'ies'} per selected sample): {PLACEMENT_TEXT[placement]}. "
        "Tokens per step stay constant. `augment-synthetic` places one new motif row (the top set's repeated "
        "spans, none of its rows) for each top-set row, by the same rule.",
        "Targeted vs random: both the rank test and the prediction-interval t-test are reported; which one "
        f"decides depends on the number of random sets alone (K ≥ {RANK_TEST_MIN_SETS}: rank test). See *How "
        "the verdicts are decided*.",
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


# ----------------------------------------------------------------------------- tables
def headline_tables(ev: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(arms trained once, arms trained per seed): an interval over one model's probe draws (probe
    noise) and one over several trained models (between-model spread) never share a column."""
    effects, per_arm, tests = ev["effects"], ev["per_arm"], ev["tests"]
    once, seeded = [], []
    for arm, g in effects.groupby("arm", sort=False):
        trained_once = bool(g.trained_once.all())
        row = {"arm": arm, ("probe draws" if trained_once else "models"): len(g),
               "emergence step": fmt(g.emergence_step.mean(), 0) if g.emergence_step.notna().all()
               else f"{fmt(g.emergence_step.mean(), 0)} ({g.emergence_step.isna().sum()} never)",
               "score at window end": f"{g.score_end.mean():.3f}",
               "ICL score at window end": f"{g.icl_end.mean():+.3f}"}
        for effect, label, digits in (("delay", "delay (steps)", 0), ("delta_score", "Δ score", 3),
                                      ("icl_gain", "ICL gain", 3)):
            p = per_arm[(per_arm.arm == arm) & (per_arm.effect == effect)]
            row[label] = "ref." if arm == "baseline" else (with_ci(*p[["mean", "ci_low", "ci_high"]].iloc[0], digits)
                                                           if len(p) else "—")
        t = tests[(tests.arm == arm) & (tests.effect == "delay")] if len(tests) else tests
        if arm in CONTROLS:
            row["p vs controls (delay)"] = "; ".join(f"`{r.control}` {fmt_p(r.p_value)} ({r.test}, K = {r.random_sets})"
                                                     for r in t.itertuples()) or "—"
        (once if trained_once else seeded).append(row)
    return pd.DataFrame(once).fillna(""), pd.DataFrame(seeded).fillna("")


def tests_table(tests: pd.DataFrame) -> pd.DataFrame:
    """Both tests for every targeted arm and effect; the one that decides is marked."""
    rows = []
    for r in tests.itertuples():
        digits = 0 if r.effect == "delay" else 3
        mark = lambda test, text: f"**{text}**" if r.test == test else text
        word = ("later" if r.direction > 0 else "earlier") if r.effect == "delay" else \
            ("higher" if r.direction > 0 else "lower")
        rows.append({"arm": r.arm, "control": r.control, "effect": r.effect, "hypothesis": f"targeted {word}",
                     "targeted (models)": f"{fmt(r.targeted, digits)} ({r.targeted_models})",
                     "random mean ± sd (K)": f"{fmt(r.random_mean, digits)} ± {fmt(r.random_sd, digits)} ({r.random_sets})",
                     "rank p (smallest)": mark("rank", f"{fmt_p(r.rank_p)} ({fmt_p(r.rank_min_p)})"),
                     "t (df)": f"{fmt(r.t, 2)} ({r.df})", "t-test p": mark("t", fmt_p(r.t_p))})
    return pd.DataFrame(rows)


def edit_timing_table(timing: pd.DataFrame) -> pd.DataFrame:
    by_arm = timing.groupby("arm", sort=False)[["edited_rows", "dropped", "before_emergence", "median_step"]].mean()
    placement = timing.groupby("arm", sort=False).placement.first()
    return pd.DataFrame({"arm": by_arm.index, "runs": timing.groupby("arm", sort=False).size().to_numpy(),
                         "placement": placement.reindex(by_arm.index).to_numpy(),
                         "edited rows": [f"{v:,.0f}" for v in by_arm.edited_rows],
                         "dropped": [f"{v:,.0f}" for v in by_arm.dropped],
                         "before emergence": [f"{b:,.0f} ({b / max(n, 1):.0%})" for b, n in
                                              zip(by_arm.before_emergence, by_arm.edited_rows)],
                         "median step": [fmt(v, 0) for v in by_arm.median_step]})


def unit_table(ev: dict) -> pd.DataFrame:
    """Per arm: the delay at each level (mean [CI] over seeds), the best heads at the window end,
    and the runs where the role moved."""
    per_arm, effects, moves = ev["unit_per_arm"], ev["unit_effects"], ev["role_moves"]
    rows = []
    for arm in dict.fromkeys(effects.arm):
        row = {"arm": arm}
        for level in LEVELS:
            d = per_arm[(per_arm.arm == arm) & (per_arm.level == level) & (per_arm.effect == "delay")]
            e = effects[(effects.arm == arm) & (effects.level == level)]
            never = int(e.emergence_step.isna().sum())
            value = "ref." if arm == "baseline" else (with_ci(*d[["mean", "ci_low", "ci_high"]].iloc[0], 0)
                                                      if len(d) else "—")
            row[f"delay: {LEVEL_LABELS[level]}"] = value + (f" ({never} never)" if never else "")
        best = effects[(effects.arm == arm) & (effects.level == "layer")].best_head_end.value_counts()
        row["best of layer at window end (seeds)"] = ", ".join(f"{h} ({n})" for h, n in best.items())
        m = moves[moves.arm == arm]
        moved = m[m.moved_to != ""]
        row["role moved (runs)"] = "—" if arm == "baseline" else (
            f"{len(moved)} of {len(m)}" + (f": to {', '.join(sorted(set(', '.join(moved.moved_to).split(', '))))}"
                                           if len(moved) else ""))
        rows.append(row)
    return pd.DataFrame(rows)


def role_table(moves: pd.DataFrame) -> pd.DataFrame:
    """Every run where the target fell short of its emergence level at the window end."""
    short = moves[moves.target_end < moves.level]
    return pd.DataFrame({"arm": short.arm, "seed": short.seed, "target": short.target,
                         "target end (level)": [f"{t:.3f} ({l:.3f})" for t, l in zip(short.target_end, short.level)],
                         "rival": short.rival.fillna("—"),
                         "rival end (baseline)": [f"{e:.3f} ({b:.3f})" for e, b in
                                                  zip(short.rival_end, short.rival_baseline_end)],
                         "role moved to": [m or "—" for m in short.moved_to]})


# ----------------------------------------------------------------------------- the report
def build_report(ev: dict, scores: pd.DataFrame, params_text: str, commit: str, figures_dir: Path,
                 link_dir: str = FIGURES, tokens: pd.DataFrame | None = None,
                 score_metrics: dict | None = None) -> Document:
    """Write the PNGs into `figures_dir` and return the document that embeds them (Markdown
    links: `link_dir/<name>.png`, relative to report.md). `tokens` (data/scores/tokens.parquet) and
    `score_metrics` (metrics/scores.json) add the token view and the probe-draw overlap."""
    s = ev["summary"]
    names = ("trajectories", "effects", "unit_levels", "icl_vs_induction", "enrichment", "influence", "transfer")
    figures = {name: Path(figures_dir) / f"{name}.png" for name in names}
    link = {name: f"{link_dir}/{name}.png" for name in names}
    fig.plot_arm_trajectories(ev["curves"], ev["effects"], s, figures["trajectories"])
    fig.plot_effects(ev["per_arm"], figures["effects"])
    fig.plot_unit_levels(ev["unit_curves"], ev["unit_effects"], s, figures["unit_levels"])
    fig.plot_icl_coupling(ev["curves"], ev["effects"], s, figures["icl_vs_induction"])
    fig.plot_enrichment(ev["enrichment"], s, figures["enrichment"])
    window_scores = scores if s["target"] == "union" else scores[scores["head"] == s["target"]]
    fig.plot_influence(window_scores, s["k"], figures["influence"])
    if len(ev["transfer"]):
        fig.plot_transfer(ev["transfer"], s["unit"], figures["transfer"])
    doc = Document()
    image = lambda name, caption: doc.image(figures[name], caption, link[name])
    doc.heading(1, f"mda report: did the data make {', '.join(s['heads'])}?")
    doc.paragraph(f"Unit `{s['unit']}` (metric `{s['metric']}`), target head(s) {', '.join(s['heads'])}, "
                  f"formation window steps {s['window'][0]:,} → {s['window'][1]:,} "
                  f"({s['window_samples']:,} samples); sets chosen on `{s['target']}`, k = {s['k']:,}; "
                  f"augmentation placement `{s.get('augment_placement', 'later')}`. Made from commit `{commit}`.")
    doc.heading(2, "Answer")
    doc.bullets([v.sentence() for v in verdicts(ev)])
    doc.heading(2, "Headline numbers")
    once, seeded = headline_tables(ev)
    doc.paragraph("Effects are arm − baseline with the same probe seed. ICL gain = baseline ICL score − arm ICL "
                  "score (+ = more in-context learning). p: one-sided, targeted arm vs each random control, by "
                  "the test K chooses (rank at K ≥ 19: confirmatory; t at K < 19: exploratory).")
    doc.paragraph("**Arms trained once** — one model each, scored with every seed's evaluation probe. The "
                  "interval is the 95 % t-interval over those probe draws: **probe noise only**, not the spread "
                  "between trained models.")
    doc.table(once)
    if len(seeded):
        doc.paragraph("**Arms trained per seed** — one model per seed (a new random set, or new synthetic rows, "
                      "each). The interval is the 95 % t-interval **between trained models**.")
        doc.table(seeded)
    if len(ev["tests"]):
        doc.heading(2, "Targeted vs random: both tests")
        doc.paragraph("One-sided in the hypothesised direction; the p that decides the verdict is in bold. "
                      "*targeted (models)*: the targeted arm's effect and how many trained models it is the mean "
                      "of (1: an arm trained once, its probe seeds averaged; more: `augment-synthetic`, one model "
                      "per seed, compared as a group).")
        doc.table(tests_table(ev["tests"]))
    doc.heading(2, "How the verdicts are decided")
    doc.paragraph("Each verdict above names the condition that decided it. The rank test at K ≥ 19 is the "
                  "confirmatory test, declared before the K = 19 runs; the t-test that decides at K < 19 was "
                  "adopted after the K = 3 rank test had given p = 0.25, so verdicts at K < 19 are exploratory "
                  "and are marked so.")
    doc.bullets(RULES)
    doc.heading(2, "How to read these numbers")
    doc.bullets(caveats(ev))
    if len(ev["edit_timing"]):
        doc.heading(2, "When the edits happen")
        doc.paragraph(f"An edit can only move emergence if it happens before the head forms: per arm (mean over "
                      f"the runs' edits) its placement, rows removed or copies placed (an upweighted row counts "
                      f"once per extra copy, at its own step), copies dropped for lack of a free row, and how many "
                      f"edits come before the baseline's emergence (step {s['edits_before_step']:,.0f}).")
        doc.table(edit_timing_table(ev["edit_timing"]))
    unit_section(doc, ev, image)
    doc.heading(2, "Trajectories")
    image("trajectories", "Target head score and ICL score per arm during retraining; band: range over seeds.")
    image("effects", "Effect of each arm against the baseline, mean and 95 % CI over seeds.")
    doc.heading(2, "In-context learning and the head")
    image("icl_vs_induction", "Left: ICL score against the target score along each run. "
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
        image("transfer", "Mean absolute change of each kind of head at the window end, per arm.")
    doc.heading(2, "Catalysts: what the top-k set is made of")
    e = ev["enrichment"].sort_values("enrichment", ascending=False)
    doc.table(pd.DataFrame({"domain": e.domain, "top-k share": [f"{v:.1%}" for v in e.top_share],
                            "window share": [f"{v:.1%}" for v in e.window_share],
                            "enrichment [95 % CI]": [f"{r:.2f} [{lo:.2f}, {hi:.2f}]" for r, lo, hi in
                                                     zip(e.enrichment, e.ci_low, e.ci_high)]}))
    image("enrichment", "Share of each domain in the top-k set over its share in the window.")
    top = ev["top_samples"]
    if len(top):
        doc.paragraph("The most influential samples, decoded with the corpus tokenizer:")
        doc.table(pd.DataFrame({"rank": top["rank"], "sample": top.sample_id, "step": top.step, "domain": top.domain,
                                "score": [f"{v:.3g}" for v in top.score],
                                "text (first 300 characters)": [("`" + t[:300].replace("`", "'") + ("…" if len(t) > 300 else "") + "`")
                                                                if isinstance(t, str) else "(no tokenizer)" for t in top.text]}))
    if score_metrics is not None:
        token_section(doc, ev, tokens, scores, score_metrics)
    doc.heading(2, "Influence distribution")
    image("influence", "Influence of every window sample on the probe, by domain, and its concentration.")
    if score_metrics is not None:
        overlap_section(doc, ev, score_metrics)
    doc.heading(2, "Provenance")
    doc.paragraph(f"Commit `{commit}`; the `params.yaml` this report was made from:")
    doc.code(params_text)
    return doc


def unit_section(doc: Document, ev: dict, image) -> None:
    """The unit-level view: delays of the target head, its layer's best head and the model's."""
    s = ev["summary"]
    doc.heading(2, "The unit, not only the head")
    doc.paragraph(f"A per-head emergence step cannot tell *the function formed later* from *the function formed "
                  f"in another head*. Next to the target head, the best `{s['metric']}` score among the heads of "
                  f"the target's layer and among all heads of the model, each with its own emergence step (the "
                  f"same {s['threshold']:.0%} rule, relative to the baseline's window-end value of that level, same "
                  f"probe seed) and delay (mean [95 % CI] over seeds).")
    doc.table(unit_table(ev))
    doc.paragraph(f"**Role moved** (rule fixed in advance): in a run, the role moved from target head T to head H "
                  f"when T's window-end score is below its emergence level ({s['threshold']:.0%} of the baseline's "
                  f"T at the window end, same probe seed), H is another head of T's layer whose window-end score "
                  f"is at or above that level, and H's window-end score exceeds H's own baseline window-end score "
                  f"by more than `evaluate.role_margin` = {s['role_margin']:g}.")
    moved = {a: v for a, v in in_arm_order(s["role_moved"]).items() if v["moved"]}
    if moved:
        doc.paragraph("**The role moved to another head** in " + "; ".join(
            f"`{a}`: {v['moved']} of {v['runs']} runs (to {', '.join(v['to'])})" for a, v in moved.items())
            + ". In those runs the function formed in another head, so the target head's delay does not say when "
              "the function formed: read the layer's and the model's delays.")
    else:
        doc.paragraph("The role did not move to another head in any run.")
    short = role_table(ev["role_moves"])
    if len(short):
        doc.paragraph("Runs whose target head ended below its emergence level, and the head of its layer that "
                      "rose most over its baseline (the rival):")
        doc.table(short)
    base = ev["unit_effects"][ev["unit_effects"].arm == "baseline"]
    early = [LEVEL_LABELS[l] for l in LEVELS[1:]
             if (base[base.level == l].emergence_step <= s["window"][0]).any()]
    if early:
        one = len(early) == 1
        doc.paragraph(f"In the baseline, the {' and the '.join(early)} {'is' if one else 'are'} already at "
                      f"{'its threshold' if one else 'their thresholds'} at the window start, so "
                      f"{'its' if one else 'their'} delays cannot show an earlier emergence and say little.")
    image("unit_levels", "The unit's score at three levels per arm (mean over seeds), each with its own threshold.")


def write_report(ev: dict, scores: pd.DataFrame, params_text: str, commit: str, out: str | os.PathLike,
                 title: str, tokens: pd.DataFrame | None = None, score_metrics: dict | None = None) -> Document:
    """`out/report.md`, `out/report.html` and `out/figures/`, each replaced whole; nothing else under
    `out` is touched (another stage may write there)."""
    from mda.core.io import atomic_dir, atomic_file

    out = Path(out)
    with atomic_dir(out / FIGURES) as figures:
        doc = build_report(ev, scores, params_text, commit, figures, tokens=tokens, score_metrics=score_metrics)
        markdown, page = doc.markdown(), doc.html(title)  # the HTML embeds the PNGs before they move
    for name, text in (("report.md", markdown), ("report.html", page)):
        with atomic_file(out / name) as tmp:
            tmp.write_text(text)
    return doc


def read_evaluation(directory: str | os.PathLike) -> dict:
    """The tables `evaluate` wrote, by name."""
    from mda.core.io import read_json, read_table

    directory = Path(directory)
    ev = {"summary": read_json(directory / "summary.json", "run the evaluate stage")}
    for name in TABLES:
        ev[name] = read_table(directory / f"{name}.parquet", "evaluate")
    return ev
