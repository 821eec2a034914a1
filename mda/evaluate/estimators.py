"""How the estimators compare on one run: `ekfac` (the paper's single checkpoint), `trajectory`
(each sample at its own checkpoint) and `exact` (the metagradient through the window).

    python -m mda.evaluate.estimators --scores ekfac=A/scores.parquet trajectory=B/... exact=C/... \\
        --lds results/lds/fraction-0.5 results/lds/fraction-0.05 --stream data/corpus/stream \\
        --arms ekfac=E1/metrics/evaluate.json trajectory=E2/... exact=E3/... --out results/estimators

- **Agreement**, pairwise: Spearman over all window samples and the overlap of the top 10 %.
- **LDS on the same subsets**: the `lds` stage's retraining runs (results folders holding its
  `per_subset.parquet` and `params.yaml`) measured each subset's change of the probe and of the
  target score; the measured changes do not depend on the estimator, so each estimator's LDS is
  Spearman between −Σ of its scores over the removed samples (`mda.evaluate.lds.predicted_change`) and
  those changes, with the stage's bootstrap interval (`mda.evaluate.lds.lds`). The subsets are redrawn
  from `lds.seed` and the window's sample ids (`mda.evaluate.lds.subset_ids`), as the stage drew them.
- **Scale along the window**: per estimator, the median |score| of the samples in each of
  `SLICES` equal spans of window steps, over the last span's. An estimator whose early samples'
  scores are orders of magnitude larger than the late ones' ranks by step position more than by
  content, and its top set lies early.
- **Remove-top per estimator** (`--arms`): each estimator's top-k set removed, against the same
  random sets (drawn independently of the scores, `mda.intervene.edits.select_sets`): the emergence
  delay, the p of the test `evaluate` chose, and the share of the top set before the baseline's
  emergence, from each run's `metrics/evaluate.json`.

Writes `agreement.json`, `lds.json`, `scale.json`, `arms.json` and `README.md` (the tables) into `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from mda.core.errors import MdaError
from mda.evaluate.lds import OUTPUTS, lds, predicted_change, subset_ids
from mda.core.io import read_table

TOP_FRACTION = 0.10
SLICES = 6


def read_scores(path: str | Path) -> pd.DataFrame:
    """A scores table of a single head (the comparison takes one target head)."""
    table = read_table(path, "scores")
    heads = sorted(table["head"].unique())
    if len(heads) != 1:
        raise MdaError(f"{path}: {len(heads)} heads ({', '.join(heads)}); the comparison takes one target head")
    return table


def by_sample(table: pd.DataFrame) -> pd.Series:
    """A scores table's scores, indexed by sample id (sorted)."""
    return table.set_index("sample_id").score.sort_index()


def top_overlap(a: pd.Series, b: pd.Series, fraction: float = TOP_FRACTION) -> float:
    k = max(1, int(round(fraction * len(a))))
    top = lambda s: set(s.sort_values(ascending=False, kind="stable").index[:k])
    return len(top(a) & top(b)) / k


def agreement(scores: dict[str, pd.Series]) -> list[dict]:
    """Pairwise Spearman and top-10 % overlap over the samples every table scores."""
    from scipy.stats import spearmanr

    out = []
    for a, b in combinations(scores, 2):
        common = scores[a].index.intersection(scores[b].index)
        if len(common) != len(scores[a]) or len(common) != len(scores[b]):
            raise MdaError(f"scores: {a} and {b} score different samples ({len(scores[a])} vs {len(scores[b])})")
        x, y = scores[a].loc[common], scores[b].loc[common]
        out.append({"a": a, "b": b, "samples": int(len(common)),
                    "spearman": float(spearmanr(x, y).statistic), "top10_overlap": top_overlap(x, y)})
    return out


def scale_along_window(tables: dict[str, pd.DataFrame], slices: int = SLICES) -> dict[str, list[dict]]:
    """Per estimator: for each of `slices` equal spans of window steps, its step range, the median
    |score| there and that median over the last span's."""
    out = {}
    for name, table in tables.items():
        lo, hi = int(table.step.min()), int(table.step.max()) + 1
        edges = np.linspace(lo, hi, slices + 1).round().astype(int)
        spans = np.clip(np.searchsorted(edges, table.step.to_numpy(), side="right") - 1, 0, slices - 1)
        medians = [float(np.median(np.abs(table.score.to_numpy()[spans == i]))) for i in range(slices)]
        out[name] = [{"steps": [int(edges[i]), int(edges[i + 1])], "median_abs_score": m,
                      "over_last": m / medians[-1] if medians[-1] > 0 else None} for i, m in enumerate(medians)]
    return out


def lds_run(folder: str | Path, scores: dict[str, pd.Series], window_ids: np.ndarray) -> dict:
    """One `lds` results folder: each estimator's LDS against its measured changes."""
    folder = Path(folder)
    params = yaml.safe_load((folder / "params.yaml").read_text())["lds"]
    table_path = folder / "files" / "data" / "lds" / "per_subset.parquet"
    try:
        table = pd.read_parquet(table_path)
    except FileNotFoundError:
        raise MdaError(f"{table_path}: missing (the lds results folder keeps the stage's per_subset table)") from None
    heads = sorted(table["head"].unique())
    measured = table[(table.estimator == "ekfac") & (table["head"] == heads[0])].set_index("subset").sort_index()
    subsets = {int(m): subset_ids(window_ids, params["fraction"], params["seed"], int(m)) for m in measured.index}
    out = {"fraction": params["fraction"], "subsets": len(subsets), "seed": params["seed"], "estimators": {}}
    for name, s in scores.items():
        predicted = predicted_change(s, subsets).loc[measured.index]
        out["estimators"][name] = {o: lds(predicted, measured[f"{o}_change"], params["bootstrap"], params["confidence"],
                                          params["seed"]) for o in OUTPUTS}
    # The stage's own EK-FAC predictions: the redrawn subsets must give the same numbers.
    if "ekfac" in scores:
        stage = table[(table.estimator == "ekfac") & (table["head"] == heads[0])].set_index("subset").predicted_change
        ours = predicted_change(scores["ekfac"], subsets).loc[stage.index]
        if not np.allclose(ours.to_numpy(), stage.to_numpy(), rtol=1e-9, atol=0):
            raise MdaError(f"{table_path}: the redrawn subsets do not reproduce the stage's EK-FAC predictions; "
                           "the scores or the window differ from the lds run's")
    return out


def arm_rows(arms: dict[str, str | Path]) -> list[dict]:
    """Per estimator, its remove-top arm from that run's metrics/evaluate.json."""
    rows = []
    for name, path in arms.items():
        ev = json.loads(Path(path).read_text())
        delay = (ev.get("arms", {}).get("remove-top") or {}).get("delay") or {}
        tests = ev.get("targeted_vs_random", {}).get("remove-top", {})
        rows.append({"estimator": name, "delay": delay.get("mean"), "delay_ci": [delay.get("ci_low"), delay.get("ci_high")],
                     "random_delay": ((ev.get("arms", {}).get("remove-random") or {}).get("delay") or {}).get("mean"),
                     "tests": {c: {"p": t.get("p_delay"), "test": t.get("test"), "random_sets": t.get("random_sets")}
                               for c, t in tests.items()},
                     "before_emergence_share": (ev.get("edits_before_emergence_share") or {}).get("remove-top"),
                     "baseline_emergence": (ev.get("baseline") or {}).get("emergence_step")})
    return rows


def readme(agree: list[dict], lds_runs: list[dict], arms: list[dict], scale: dict[str, list[dict]] | None = None) -> str:
    f = lambda v, d=3: "—" if v is None or not np.isfinite(v) else f"{v:+.{d}f}"
    lines = ["# Estimators compared: ekfac, trajectory, exact", "",
             "Generated by `python -m mda.evaluate.estimators` (the command and inputs: `inputs.json`).", "",
             "## Agreement (all window samples)", "", "| pair | Spearman | top-10 % overlap |", "|---|---|---|"]
    lines += [f"| {r['a']} – {r['b']} | {r['spearman']:.3f} | {r['top10_overlap']:.1%} |" for r in agree]
    for run in lds_runs:
        lines += ["", f"## LDS, {run['subsets']} subsets removing {run['fraction']:.0%} of the window each", "",
                  "| estimator | LDS (probe f) [95 % CI] | LDS (target score) [95 % CI] |", "|---|---|---|"]
        for name, by_out in run["estimators"].items():
            cell = lambda o: f"{f(by_out[o]['lds'])} [{f(by_out[o]['low'])}, {f(by_out[o]['high'])}]"
            lines.append(f"| {name} | {cell('probe')} | {cell('target_score')} |")
    if scale:
        spans = next(iter(scale.values()))
        lines += ["", "## Scale along the window: median |score| per span of steps, over the last span's", "",
                  "| estimator | " + " | ".join(f"{r['steps'][0]:,}–{r['steps'][1]:,}" for r in spans) + " |",
                  "|---|" + "---|" * len(spans)]
        lines += [f"| {name} | " + " | ".join("—" if r["over_last"] is None else f"{r['over_last']:.3g}" for r in rows) + " |"
                  for name, rows in scale.items()]
    if arms:
        lines += ["", "## Remove-top per estimator (same k, same random sets)", "",
                  "| estimator | delay (steps) [probe-noise interval] | remove-random mean | p vs controls | "
                  "top set before the baseline's emergence |", "|---|---|---|---|---|"]
        for r in arms:
            tests = "; ".join(f"`{c}` {t['p']:.2g} ({t['test']}, K = {t['random_sets']})" for c, t in r["tests"].items()
                              if t["p"] is not None) or "—"
            share = "—" if r["before_emergence_share"] is None else f"{r['before_emergence_share']:.0%}"
            lines.append(f"| {r['estimator']} | {f(r['delay'], 0)} [{f(r['delay_ci'][0], 0)}, {f(r['delay_ci'][1], 0)}] | "
                         f"{f(r['random_delay'], 0)} | {tests} | {share} |")
    return "\n".join(lines) + "\n"


def pair(text: str) -> tuple[str, str]:
    """`name=path` → (name, path)."""
    if "=" not in text:
        raise MdaError(f"{text}: expected name=path")
    name, path = text.split("=", 1)
    return name, path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scores", nargs="+", required=True, help="name=path/to/scores.parquet")
    ap.add_argument("--lds", nargs="*", default=[], help="lds results folders (params.yaml, files/data/lds/)")
    ap.add_argument("--stream", help="the run's data/corpus/stream (to redraw the LDS subsets)")
    ap.add_argument("--arms", nargs="*", default=[], help="name=path/to/metrics/evaluate.json")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        tables = {n: read_scores(p) for n, p in map(pair, args.scores)}
        scores = {n: by_sample(t) for n, t in tables.items()}
        agree = agreement(scores)
        scale = scale_along_window(tables)
        lds_runs = []
        if args.lds:
            if not args.stream:
                raise MdaError("--lds needs --stream (the window's sample ids, to redraw the subsets)")
            from mda.data.stream import Stream

            steps = next(iter(tables.values())).step
            window = Stream(args.stream).read(int(steps.min()), int(steps.max()), columns=["sample_id"])
            lds_runs = [lds_run(folder, scores, window.column("sample_id").to_numpy()) for folder in args.lds]
        arms = arm_rows(dict(map(pair, args.arms)))
    except MdaError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "agreement.json").write_text(json.dumps(agree, indent=1) + "\n")
    (out / "lds.json").write_text(json.dumps(lds_runs, indent=1, default=float) + "\n")
    (out / "scale.json").write_text(json.dumps(scale, indent=1) + "\n")
    (out / "arms.json").write_text(json.dumps(arms, indent=1, default=float) + "\n")
    (out / "inputs.json").write_text(json.dumps({"argv": sys.argv[1:] if argv is None else argv}, indent=1) + "\n")
    (out / "README.md").write_text(readme(agree, lds_runs, arms, scale))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
