"""The report's view of the scores stage's extras: each top sample's text shaded by its tokens'
contributions to its influence score (HTML; a compact table in Markdown), the share of positive
influence on induction-predictable tokens in the top samples against random ones, and how much
the top-k set depends on the probe draw. Reads what `stages.scores` wrote; decides nothing."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from mda.evaluate.fmt import fmt
from mda.attribute.token_stats import target_contributions

POSITIVE, NEGATIVE = (214, 39, 40), (31, 119, 180)  # red: raises the probe; blue: lowers it

MEANING = ("A sample's score is a sum over its input positions t: its gradient on each of the head's "
           "blocks is Σ_t g_t a_tᵀ, so score = Σ_t c_t with c_t = −Σ_blocks g_tᵀ H⁻¹∇f a_t. c_t is the part "
           "of the score that flows through the head's weights **at position t**: a_t is the block's input "
           "there (the token at t in its context) and g_t the gradient of the row's loss at the block's output "
           "there — which carries the loss of predicting token t + 1 **and of every later position** that "
           "reads what the head computed at t (later queries attend to t's key and value). So c_t credits the "
           "token at t, in its context, for its effect on the losses from t on; it is not a leave-one-token-out "
           "effect. The row's last token is only a label and has no c_t.")
PREDICTABLE = ("A position t is **induction-predictable** when its token occurred earlier in the row and the "
               "token that followed its latest earlier occurrence is the token at t + 1 — what an induction head "
               "predicts there (the induction probe's own target, `mda.units.metrics.induction_targets`).")


def shaded_html(pieces: list[str], contributions: np.ndarray, predictable: np.ndarray, scale: float) -> str:
    """The row's tokens as spans, background red (c > 0) or blue (c < 0) with opacity |c| / scale,
    induction-predictable positions underlined, the value in each span's tooltip; the last piece
    (a label only) plain."""
    out = []
    for t, piece in enumerate(pieces):
        text = html.escape(piece).replace("\n", "↵<br>")
        if t >= len(contributions):
            out.append(f'<span title="label only">{text}</span>')
            continue
        c = float(contributions[t])
        rgb = POSITIVE if c > 0 else NEGATIVE
        alpha = min(1.0, abs(c) / scale) if scale > 0 else 0.0
        style = f"background:rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.3f})"
        if predictable[t]:
            style += ";border-bottom:2px solid #222"
        tip = f"position {t}: {c:+.4g}" + (", induction-predictable" if predictable[t] else "")
        out.append(f'<span style="{style}" title="{tip}">{text}</span>')
    return '<div style="font-family:monospace;line-height:1.9;margin:0.3em 0 1em 0">' + "".join(out) + "</div>"


def legend_html(scale: float) -> str:
    swatch = lambda rgb, a: (f'<span style="background:rgba({rgb[0]},{rgb[1]},{rgb[2]},{a});'
                             f'padding:0 0.6em;margin:0 0.2em">&nbsp;</span>')
    return (f"<p>Scale: {swatch(POSITIVE, 1)} c = +{scale:.3g} (raises the probe) · {swatch(POSITIVE, 0.3)} "
            f"+{0.3 * scale:.2g} · {swatch(NEGATIVE, 0.3)} −{0.3 * scale:.2g} · {swatch(NEGATIVE, 1)} "
            f"c = −{scale:.3g} (lowers it); opacity ∝ |c|, one scale for all samples shown (full colour: the "
            "largest |c| among them). <span style=\"border-bottom:2px solid #222\">Underlined</span>: "
            "induction-predictable position. Hover a token for its value.</p>")


def top_sample_tokens(ev: dict, tokens: pd.DataFrame, scores: pd.DataFrame) -> list[dict]:
    """Per decoded top sample that has a token split: rank, sample, score, its pieces and its
    contributions / predictable flags by position."""
    target = ev["summary"]["target"]
    rows = target_contributions(tokens, scores, target).drop_duplicates(["sample_id", "position"])
    by_sample = {sid: g.sort_values("position") for sid, g in rows.groupby("sample_id")}
    out = []
    for r in ev["top_samples"].itertuples(index=False):
        g = by_sample.get(r.sample_id)
        pieces = getattr(r, "pieces", None)
        if g is None or pieces is None:
            continue
        out.append({"rank": r.rank, "sample_id": r.sample_id, "score": r.score, "pieces": list(pieces),
                    "contribution": g.contribution.to_numpy(), "predictable": g.predictable.to_numpy(bool),
                    "token": g.token.to_numpy()})
    return out


def strongest(sample: dict, sign: int, n: int = 3) -> str:
    """The n tokens with the largest contributions of one sign, as `token` (+c) — Markdown."""
    c = sample["contribution"] * sign
    order = [t for t in np.argsort(-c, kind="stable")[:n] if c[t] > 0]
    return ", ".join(f"`{sample['pieces'][t].strip() or repr(sample['pieces'][t])}`"
                     f"{'*' if sample['predictable'][t] else ''} ({sample['contribution'][t]:+.3g})" for t in order) or "—"


def token_section(doc, ev: dict, tokens: pd.DataFrame | None, scores: pd.DataFrame, score_metrics: dict) -> None:
    """Inside the top samples: shaded text, and the predictable-token shares, top vs random."""
    s = ev["summary"]
    doc.heading(2, "Inside the top samples: which tokens carry the influence")
    if tokens is None:
        doc.paragraph("No token split was computed (`influence.token_samples: 0`).")
        return
    doc.paragraph(MEANING)
    samples = top_sample_tokens(ev, tokens, scores)
    if samples:
        scale = max(float(np.abs(x["contribution"]).max()) for x in samples)
        blocks = [legend_html(scale)]
        for x in samples:
            blocks.append(f"<p><b>#{x['rank']}</b> sample {x['sample_id']}, score {x['score']:.4g} "
                          f"(Σ c_t = {x['contribution'].sum():.4g})</p>"
                          + shaded_html(x["pieces"], x["contribution"], x["predictable"], scale))
        table = pd.DataFrame({
            "rank": [x["rank"] for x in samples], "sample": [x["sample_id"] for x in samples],
            "score": [f"{x['score']:.3g}" for x in samples],
            "Σ c_t": [f"{x['contribution'].sum():.3g}" for x in samples],
            "largest + (c)": [strongest(x, +1) for x in samples],
            "largest − (c)": [strongest(x, -1) for x in samples],
            "positive c on predictable": [fmt(_share(x), 2) for x in samples]})
        fallback = type(doc)()
        fallback.paragraph("Each top sample's strongest tokens (`*`: induction-predictable position; the HTML "
                           "report shades every token of the text by its contribution):")
        fallback.table(table)
        doc.rich("\n".join(blocks), fallback)
    shares = score_metrics.get("tokens", {}).get("targets", {}).get(s["target"])
    if shares:
        n = score_metrics["tokens"]["samples_per_set"]
        doc.paragraph(PREDICTABLE + f" Over the top {n} samples of `{s['target']}` and {n} window samples drawn "
                      "uniformly (seeded): the share of all positive contributions that sits on predictable "
                      "positions, against the share of positions that are predictable.")
        doc.table(pd.DataFrame([{
            "samples": f"{label} ({m['samples']})", "positions": f"{m['positions']:,}",
            "predictable positions": f"{m['predictable_positions']:.1%}",
            "positive influence on predictable": f"{m['positive_on_predictable']:.1%}",
            "on all other positions": f"{m['positive_on_other']:.1%}",
            "mean positive c, predictable / other": fmt(m["per_token_ratio"], 2)}
            for label, m in (("top", shares["top"]), ("random", shares["random"]))]))
        doc.paragraph(f"The split is exact: Σ_t c_t differs from the sample's score in `scores.parquet` by at most "
                      f"{score_metrics['tokens']['sum_check_max_rel']:.1e} of the largest score (the cache stores "
                      "gradients rounded to its dtype).")


def _share(x: dict) -> float:
    pos = np.clip(x["contribution"], 0, None)
    return float(pos[x["predictable"]].sum() / pos.sum()) if pos.sum() > 0 else float("nan")


def overlap_section(doc, ev: dict, score_metrics: dict) -> None:
    """How much of the top-k set changes with the probe draw."""
    draws = score_metrics.get("probe_draws") or {}
    doc.heading(2, "Does the selection depend on the probe draw?")
    if not draws:
        doc.paragraph("Not measured (`influence.overlap_seeds: []`).")
        return
    doc.paragraph("The window scored again with other draws of the probe's random sequences "
                  "(`influence.overlap_seeds`, same number of sequences): per pair of draws, the share of the "
                  "top-k set (k as `select` chooses it) they have in common, and the Spearman correlation of all "
                  "scores. The default number of probe sequences was fixed, before any retraining result, as the "
                  "fewest at which every pair of six draws kept ≥ 95 % of the top-k set on the default model "
                  "(`benchmarks/results/probe_overlap.json`).")
    doc.table(pd.DataFrame([{"head": head, "draws": ", ".join(m["draws"]), "k": f"{m['k']:,}",
                             "top-k overlap, mean [min] over pairs": f"{m['overlap_mean']:.1%} [{m['overlap_min']:.1%}]",
                             "Spearman, mean": fmt(m["spearman_mean"], 4)} for head, m in draws.items()]))
    if ev["summary"]["target"] == "union":
        doc.paragraph("The arms use the union of the heads' scores; its overlap is not measured separately.")
