"""Replication across pretraining runs: the headline effects of several DVC experiments side by
side, read from `dvc exp show --json` (params.yaml and metrics/*.json per experiment).

Run the default under three pretraining seeds, then summarise (nothing here runs experiments):

    for seed in 1 2; do dvc exp run --queue -n init-seed-$seed -S model.init_seed=$seed; done
    dvc queue start --jobs 1 && dvc queue status          # one at a time: 2 CPU cores
    python -m mda.evaluate.replication                             # calls `dvc exp show --json`
    python -m mda.evaluate.replication --input exp.json --out replication.md   # from a saved JSON
    python -m mda.evaluate.replication --dirs results/default results/init-seed-1 results/init-seed-2

One row per experiment (and per commit row of the JSON, e.g. the branch's own run) that has
`metrics/evaluate.json`: init seed, target head, window, k, the baseline's emergence step, each
arm's emergence delay (mean [95 % t-interval] over seeds, as `evaluate` reports it), the p-value
of each targeted arm against each of its random controls (the test `evaluate` chose by K, named),
the ICL coupling r (p). Below the table, per targeted arm and control: in how many
experiments it moved emergence in the hypothesised direction beyond the control, and in how many
with p ≤ 0.05. Then one row per claim: its verdict in each experiment and in how many it was
supported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from mda.core.errors import MdaError
from mda.evaluate.effects import COMPARISONS  # (targeted arm, random control, +1: hypothesis is a later emergence)
from mda.intervene.arms import ARMS
from mda.evaluate.stats import ALPHA

EVALUATE, LOCATE, PARAMS = "metrics/evaluate.json", "metrics/locate.json", "params.yaml"
ARM_ORDER = tuple(a for a in ARMS if a != "baseline")


def exp_rows(exp_show: list[dict], include_workspace: bool = False) -> list[dict]:
    """Flatten `dvc exp show --json` (a list of commit rows, each with `experiments` whose `revs`
    are the runs) into rows {name, rev, params, metrics, error}; `params`/`metrics`: file → data."""
    out = []

    def add(entry: dict, name: str | None):
        data = entry.get("data") or {}
        files = lambda key: {f: (v or {}).get("data") or {} for f, v in (data.get(key) or {}).items()}
        sha = str(entry.get("rev", ""))
        out.append({"name": name or entry.get("name") or (sha if sha == "workspace" else sha[:7]),
                    "rev": str(entry.get("rev", "")), "params": files("params"), "metrics": files("metrics"),
                    "error": entry.get("error")})

    for commit in exp_show:
        if commit.get("rev") != "workspace" or include_workspace:
            add(commit, commit.get("name"))
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                add(rev, rev.get("name") or exp.get("name"))
    return out


def _get(d: dict, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def summarise(row: dict) -> dict | None:
    """One experiment's headline numbers; None if it has no evaluation."""
    ev, loc = row["metrics"].get(EVALUATE), row["metrics"].get(LOCATE, {})
    if not ev:
        return None
    out = {"experiment": row["name"], "rev": row["rev"][:7],
           "init_seed": _get(row["params"], PARAMS, "model", "init_seed"),
           "target": ", ".join(loc.get("targets") or []) or None,
           "window": (ev.get("window_start"), ev.get("window_end")), "k": ev.get("k"),
           "baseline_emergence": _get(ev, "baseline", "emergence_step"),
           "missing_runs": ev.get("missing_runs", 0),
           "delay": {arm: _get(ev, "arms", arm, "delay") for arm in ARM_ORDER if _get(ev, "arms", arm, "delay")},
           "tests": {(arm, control): {"p": t.get("p_delay"), "test": t.get("test"), "k": t.get("random_sets")}
                     for arm, by_control in (ev.get("targeted_vs_random") or {}).items()
                     for control, t in by_control.items()},
           "verdicts": ev.get("verdicts") or {},
           "icl_r": _get(ev, "icl_coupling", "pearson_r"), "icl_p": _get(ev, "icl_coupling", "p_value")}
    return out


def _num(v, digits=0, sign=False) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    return f"{v:+,.{digits}f}" if sign else f"{v:,.{digits}f}"


def _delay(d: dict | None) -> str:
    if not d:
        return "—"
    ci = f" [{_num(d.get('ci_low'), sign=True)}, {_num(d.get('ci_high'), sign=True)}]" \
        if d.get("ci_low") is not None and d.get("ci_low") == d.get("ci_low") else ""
    return _num(d.get("mean"), sign=True) + ci


def _p(t: dict | None) -> str:
    if not t or t.get("p") is None or t["p"] != t["p"]:
        return "—"
    return f"{t['p']:.2g}" + (f" ({t['test']}, K = {t['k']})" if t.get("test") and t.get("k") else
                              f" ({t['test']})" if t.get("test") else "")


def table(summaries: list[dict]) -> pd.DataFrame:
    """The side-by-side table: one row per experiment; arms and tests present in any experiment
    (the verdicts are in `verdict_table`)."""
    arms = [a for a in ARM_ORDER if any(a in s["delay"] for s in summaries)]
    tested = [(a, c) for a, c, _ in COMPARISONS if any((a, c) in s["tests"] for s in summaries)]
    rows = []
    for s in summaries:
        row = {"experiment": s["experiment"], "init seed": _num(s["init_seed"]), "target": s["target"] or "—",
               "window": f"{_num(s['window'][0])} → {_num(s['window'][1])}", "k": _num(s["k"]),
               "baseline emergence": _num(s["baseline_emergence"])}
        row.update({f"{arm} delay": _delay(s["delay"].get(arm)) for arm in arms})
        row.update({f"p {arm} vs {control}": _p(s["tests"].get((arm, control))) for arm, control in tested})
        row["ICL r (p)"] = "—" if s["icl_r"] is None else \
            f"{s['icl_r']:+.2f} ({'—' if s['icl_p'] is None else format(s['icl_p'], '.2g')})"
        if s["missing_runs"]:
            row["experiment"] += f" ({s['missing_runs']} runs missing)"
        rows.append(row)
    return pd.DataFrame(rows)


def consistency(summaries: list[dict]) -> list[str]:
    """Per targeted arm: experiments where its delay is beyond its control's in the hypothesised
    direction, and where its p ≤ ALPHA."""
    out = []
    for arm, control, sign in COMPARISONS:
        both = [s for s in summaries if arm in s["delay"] and control in s["delay"]]
        if not both:
            continue
        beyond = sum(sign * (s["delay"][arm]["mean"] - s["delay"][control]["mean"]) > 0 for s in both)
        p = lambda s: (s["tests"].get((arm, control)) or {}).get("p")
        significant = sum(p(s) is not None and p(s) == p(s) and p(s) <= ALPHA for s in both)
        way = "later" if sign > 0 else "earlier"
        out.append(f"`{arm}` moved emergence {way} than `{control}` in {beyond} of {len(both)} experiments; "
                   f"p ≤ {ALPHA} in {significant} of {len(both)}.")
    return out


def verdict_table(summaries: list[dict]) -> pd.DataFrame:
    """One row per claim: its verdict in each experiment, and in how many it was supported (a
    verdict the K < 19 t-test decided counts, marked exploratory in its cell)."""
    claims = list(dict.fromkeys(v for s in summaries for v in s["verdicts"]))
    rows = []
    for c in claims:
        states = [s["verdicts"].get(c) for s in summaries]
        row = {"claim": c, **{s["experiment"]: v or "—" for s, v in zip(summaries, states)}}
        row["supported in"] = f"{sum(str(v).startswith('supported') for v in states)} of {len(summaries)}"
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame) -> str:
    cells = lambda row: "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"
    return "\n".join([cells(frame.columns), cells(["---"] * len(frame.columns))]
                     + [cells(r) for r in frame.itertuples(index=False)])


def folder_rows(folders: list[str]) -> list[dict]:
    """Rows like `exp_rows`' from experiment folders (`results/<name>/`: its `params.yaml` and
    `metrics/*.json`), named after the folder; a missing or unreadable file is one line naming it."""
    import yaml

    rows = []
    for folder in map(Path, folders):
        params_file = folder / PARAMS
        if not params_file.is_file():
            raise MdaError(f"{params_file}: missing (an experiment folder holds the params it ran)")
        metrics = {}
        for name in (EVALUATE, LOCATE):
            path = folder / name
            if path.is_file():
                try:
                    metrics[name] = json.loads(path.read_text())
                except json.JSONDecodeError as err:
                    raise MdaError(f"{path}: not valid JSON ({err.msg})") from None
        rows.append({"name": folder.name, "rev": "", "params": {PARAMS: yaml.safe_load(params_file.read_text())},
                     "metrics": metrics, "error": None})
    return rows


def report(exp_show: list[dict] | None = None, include_workspace: bool = False, names: list[str] | None = None,
           folders: list[str] | None = None) -> str:
    rows = folder_rows(folders) if folders else exp_rows(exp_show, include_workspace)
    if names:
        rows = [r for r in rows if r["name"] in names]
    summaries, skipped = [], []
    for r in rows:
        s = summarise(r)
        if s is None:
            skipped.append(f"{r['name']} ({'error: ' + str(r['error']) if r['error'] else 'no ' + EVALUATE})")
        else:
            summaries.append(s)
    if not summaries:
        raise MdaError(f"dvc exp show: no experiment has {EVALUATE}"
                       + (f" (skipped: {', '.join(skipped)})" if skipped else ""))
    lines = [markdown(table(summaries)), ""]
    lines += [f"- {line}" for line in consistency(summaries)]
    lines += ["", markdown(verdict_table(summaries)), ""]
    lines.append("- *Moved emergence later / earlier than* compares the arm with its control only; a verdict also "
                 "needs the arm's emergence later (removal) or earlier (augmentation) than the baseline's, and "
                 "its test's p ≤ 0.05: the claims table.")
    lines.append("- Delays: steps, arm − baseline, mean [95 % t-interval] over seeds; p: one-sided, targeted arm "
                 "vs its random control, by the test `evaluate` chose from K (rank or t).")
    if skipped:
        lines.append(f"- Not summarised: {', '.join(skipped)}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", help="a saved `dvc exp show --json` (default: run it here)")
    ap.add_argument("--out", help="write the Markdown here (default: stdout)")
    ap.add_argument("--names", nargs="*", help="only these experiments / commit rows")
    ap.add_argument("--include-workspace", action="store_true", help="also the workspace row")
    ap.add_argument("--dirs", nargs="+", help="experiment folders (results/<name>/: params.yaml, metrics/) "
                                              "instead of `dvc exp show`")
    args = ap.parse_args(argv)
    try:
        if args.dirs:
            text = report(names=args.names, folders=args.dirs)
        elif args.input:
            text = report(json.loads(Path(args.input).read_text()), args.include_workspace, args.names)
        else:
            res = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True, text=True)
            if res.returncode:
                raise MdaError(f"dvc exp show --json failed: {res.stderr.strip().splitlines()[-1:]}")
            text = report(json.loads(res.stdout), args.include_workspace, args.names)
    except MdaError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    if args.dirs:  # a summary of committed folders says how to remake it
        text += f"- Made by `python -m mda.evaluate.replication --dirs {' '.join(args.dirs)}`.\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
