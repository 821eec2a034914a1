"""Stage `locate`: score every head at every checkpoint, pick target heads and their
formation window, and measure in-context learning alongside.

All metrics come from `mda.units.metrics`; this module only runs them over checkpoints and
reads the trajectories.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from mda.core.compute import runtime
from mda.core.config import Locate, Params
from mda.core.errors import MdaError
from mda.data.corpus import read_heldout
from mda.model.heads import Head, check_head
from mda.model.neox import load_model, saved_steps, step_dir
from mda.units.measure import checkpoint_metrics
from mda.units.metrics import ATTENTION_METRICS, COPYING_VERSION, first_crossing, icl_positions, uniform_baseline
from mda.units.probes import probe_tokens

UNIT_METRIC = {"induction": "prefix_matching", "previous_token": "previous_token"}
METRIC_VERSIONS = {"prefix_matching": "tl-mul-target-rows-v1", "previous_token": "tl-mul-target-rows-v1",
                   "duplicate_token": "tl-mul-target-rows-v1", "copying": COPYING_VERSION,
                   "induction_logprob": "zero-ablation-v1", "icl_score": "olsson-positions-v2"}


def check_request(loc: Locate, checkpoints: str | os.PathLike) -> None:
    """Fail before any work on explicit heads, window or influence step the checkpoints lack."""
    from transformers import AutoConfig

    steps = saved_steps(checkpoints)
    config = AutoConfig.from_pretrained(step_dir(checkpoints, steps[0]))
    facts = {"steps": steps, "layers": config.num_hidden_layers, "heads_per_layer": config.num_attention_heads}
    if loc.heads != "auto":
        for layer, head in loc.heads:
            try:
                check_head(facts["layers"], facts["heads_per_layer"], Head(layer, head), "locate.heads:")
            except ValueError as err:
                raise MdaError(str(err)) from None
    explicit = [("locate.window", s) for s in (loc.window if loc.window != "auto" else ())]
    if isinstance(loc.influence_step, int):
        explicit.append(("locate.influence_step", loc.influence_step))
    for key, step in explicit:
        if step not in steps:
            raise MdaError(f"{key}: step {step} is not a saved checkpoint (saved: {_short(steps)})")


def scan_checkpoints(params: Params, checkpoints: str | os.PathLike, corpus_dir: str | os.PathLike,
                     vocab_size: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(heads table, model table, facts about the probes) over every saved checkpoint. Under
    torchrun each rank scores its share of the checkpoints; every rank gets the whole tables."""
    from transformers import AutoConfig

    loc = params.locate
    rt = runtime(params.compute)
    steps = saved_steps(checkpoints)
    heldout = torch.from_numpy(read_heldout(corpus_dir, loc.heldout_rows))
    config = AutoConfig.from_pretrained(step_dir(checkpoints, steps[0]))
    probe = probe_tokens(loc.probe, config, vocab_size)
    if heldout.max() >= config.vocab_size:
        raise MdaError(f"{Path(corpus_dir) / 'heldout.parquet'}: token id {int(heldout.max())} "
                       f"outside the model's vocabulary of {config.vocab_size}")
    mine = rt.shard(len(steps))
    heads, models = [], []
    for step in tqdm(steps[mine.start:mine.stop], desc="locate", unit="ckpt", disable=not rt.is_main):
        model = rt.prepare(load_model(step_dir(checkpoints, step)))
        with rt.autocast():
            frame, model_row = checkpoint_metrics(model, probe, heldout, loc.max_sequences)
        heads.append(frame.assign(step=step))
        models.append({"step": step, **model_row})
    heads = [f for part in rt.gather_objects(heads) for f in part]
    models = [m for part in rt.gather_objects(models) for m in part]
    late, early = icl_positions(heldout.shape[1] - 1)
    facts = {
        "steps": steps,
        "layers": config.num_hidden_layers,
        "heads_per_layer": config.num_attention_heads,
        "probe": {**loc.probe.model_dump(), "uniform_baseline": {
            m: uniform_baseline(m, probe) for m in ATTENTION_METRICS}},
        "icl": {"context": heldout.shape[1] - 1, "late_index": late, "early_index": early,
                "heldout_rows": len(heldout),
                "rule": "mean loss at late_index − mean loss at early_index over the held-out rows "
                        "(Olsson et al.: tokens 500 and 50; the same fractions of the context when it is < 501)"},
    }
    head_table = pd.concat(heads, ignore_index=True)
    head_table = head_table[["step", "layer", "head", *[c for c in head_table if c not in ("step", "layer", "head")]]]
    return head_table, pd.DataFrame(models), facts


def formation_window(steps: list[int], scores: np.ndarray, low: float, high: float) -> dict:
    """Bracket the rise of a trajectory with saved steps: start = the last checkpoint before the
    score first reaches `low` of its rise (max − first value), end = the first checkpoint at or
    after reaching `high` of it. Also the interpolated steps where the thresholds are crossed."""
    scores = np.asarray(scores, dtype=float)
    rise = float(scores.max() - scores[0])
    if rise <= 0:
        return {"start": steps[0], "end": steps[-1], "rise": rise, "low_step": None, "high_step": None}
    lo_level, hi_level = scores[0] + low * rise, scores[0] + high * rise
    i_lo = int(np.argmax(scores >= lo_level))
    i_hi = i_lo + int(np.argmax(scores[i_lo:] >= hi_level))
    return {"start": steps[max(i_lo - 1, 0)], "end": steps[max(i_hi, i_lo)], "rise": rise,
            "low_step": first_crossing(steps, scores, lo_level),
            "high_step": first_crossing(steps, scores, hi_level)}


def choose_targets(heads: pd.DataFrame, loc: Locate, facts: dict) -> dict:
    """The targets file: unit, heads, window and influence checkpoint, with the rules used."""
    metric = UNIT_METRIC[loc.unit]
    steps = facts["steps"]
    if not steps:
        raise MdaError("locate: no checkpoints to choose targets from")
    wide = heads.assign(name=[Head(l, h).name for l, h in zip(heads.layer, heads["head"])]) \
        .pivot(index="step", columns="name", values=metric).loc[steps]
    rise = wide.max() - wide.iloc[0]
    if loc.heads == "auto":
        order = sorted(rise.index, key=lambda n: (-rise[n], Head.parse(n)))
        chosen = [Head.parse(n) for n in order[:loc.auto_count]]
        head_rule = f"auto: the {loc.auto_count} head(s) whose {metric} score rose most (max − first checkpoint)"
    else:
        chosen = [Head(l, h) for l, h in loc.heads]
        for head in chosen:
            try:
                check_head(facts["layers"], facts["heads_per_layer"], head, "locate.heads:")
            except ValueError as err:
                raise MdaError(str(err)) from None
        head_rule = "explicit (params locate.heads)"
    mean_curve = wide[[h.name for h in chosen]].mean(axis=1).to_numpy()
    auto = formation_window(steps, mean_curve, loc.window_low, loc.window_high)
    if loc.window == "auto":
        window = {"start": auto["start"], "end": auto["end"],
                  "rule": f"auto: last checkpoint before {loc.window_low:.0%} of the targets' mean "
                          f"{metric} rise → first checkpoint at {loc.window_high:.0%}"}
    else:
        for s in loc.window:
            if s not in steps:
                raise MdaError(f"locate.window: step {s} is not a saved checkpoint "
                               f"(saved: {_short(steps)})")
        window = {"start": loc.window[0], "end": loc.window[1], "rule": "explicit (params locate.window)"}
    window.update(low_step=auto["low_step"], high_step=auto["high_step"])
    if loc.influence_step in ("start", "end"):
        influence_step, influence_rule = window[loc.influence_step], f"window {loc.influence_step}"
    else:
        if loc.influence_step not in steps:
            raise MdaError(f"locate.influence_step: step {loc.influence_step} is not a saved "
                           f"checkpoint (saved: {_short(steps)})")
        influence_step, influence_rule = loc.influence_step, "explicit (params locate.influence_step)"
    formed = bool(auto["rise"] > 0 and mean_curve[-1] >= 2 * facts["probe"]["uniform_baseline"][metric])
    return {
        "unit": loc.unit,
        "metric": metric,
        "heads": [{"name": h.name, "layer": h.layer, "head": h.head,
                   "first": float(wide[h.name].iloc[0]), "final": float(wide[h.name].iloc[-1]),
                   "rise": float(rise[h.name])} for h in chosen],
        "head_rule": head_rule,
        "window": window,
        "influence_step": influence_step,
        "influence_rule": influence_rule,
        "formed": formed,
        "formed_rule": "final mean target score ≥ 2 × the uniform-attention baseline",
        **facts,
    }


def _short(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 12 else \
        ", ".join(map(str, steps[:6])) + ", …, " + ", ".join(map(str, steps[-3:]))


# ----------------------------------------------------------------------------- plots
def plot_trajectories(heads: pd.DataFrame, targets: dict, path) -> None:
    from mda.core import plots

    fig, axes = plots.plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    colours = plots.plt.get_cmap("tab10").colors
    cmap = lambda layer: [c for i, c in enumerate(colours) if i != 3][layer % 9]  # no red: red is the target
    names = {t["name"] for t in targets["heads"]}
    for ax, metric, title in ((axes[0], "prefix_matching", "induction (prefix-matching) score"),
                              (axes[1], "previous_token", "previous-token score")):
        for (layer, head), g in heads.groupby(["layer", "head"]):
            name = Head(layer, head).name
            is_target = name in names
            ax.plot(g.step, g[metric], color="crimson" if is_target else cmap(layer),
                    lw=2.4 if is_target else 1.0, alpha=1 if is_target else 0.7,
                    label=f"{name} (target)" if is_target else (f"layer {layer}" if head == 0 else None))
        ax.axhline(targets["probe"]["uniform_baseline"][metric], color="grey", ls=":", label="uniform attention")
        plots.shade_window(ax, targets["window"]["start"], targets["window"]["end"])
        plots.step_axis(ax)
        ax.set_ylabel(title)
        ax.set_title(f"{title}, every head")
    axes[0].legend(fontsize=8, loc="upper left")
    plots.save(fig, path)


def plot_heatmap(heads: pd.DataFrame, targets: dict, path) -> None:
    from mda.core import plots

    metric = targets["metric"]
    last = heads[heads.step == heads.step.max()]
    grid = last.pivot(index="layer", columns="head", values=metric).to_numpy()
    fig, ax = plots.plt.subplots(figsize=(1.2 + 0.9 * grid.shape[1], 1.0 + 0.7 * grid.shape[0]))
    im = ax.imshow(grid, cmap="magma", vmin=0, vmax=max(1e-6, grid.max()), aspect="auto")
    if grid.size <= 400:
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if v < 0.6 * grid.max() else "black")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(grid.shape[0]))
    ax.set_title(f"{metric} at step {int(heads.step.max())}")
    fig.colorbar(im, ax=ax, label=metric)
    plots.save(fig, path)


def plot_icl(curve: pd.DataFrame, targets: dict, path) -> None:
    from mda.core import plots

    fig, ax = plots.plt.subplots(figsize=(8, 4.5))
    ax.plot(curve.step, curve.target_score, color="crimson", lw=2,
            label=f"target {targets['metric']} ({', '.join(h['name'] for h in targets['heads'])})")
    ax.set_ylabel(f"target head {targets['metric']} score", color="crimson")
    plots.shade_window(ax, targets["window"]["start"], targets["window"]["end"])
    plots.step_axis(ax)
    right = ax.twinx()
    icl = targets["icl"]
    right.plot(curve.step, curve.icl_score, color="tab:blue", lw=2,
               label=f"ICL score (loss@{icl['late_index']} − loss@{icl['early_index']})")
    right.set_ylabel("ICL score (nats; lower = more in-context learning)", color="tab:blue")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="center left")
    ax.set_title("Induction head and in-context learning")
    plots.save(fig, path)


def target_curve(heads: pd.DataFrame, models: pd.DataFrame, targets: dict) -> pd.DataFrame:
    """step, mean target score, ICL score, held-out loss: the curve DVC plots."""
    names = {(h["layer"], h["head"]) for h in targets["heads"]}
    mask = [(l, h) in names for l, h in zip(heads.layer, heads["head"])]
    score = heads[mask].groupby("step")[targets["metric"]].mean().rename("target_score")
    return models.set_index("step").join(score)[["target_score", "icl_score", "heldout_loss"]] \
        .reset_index()
