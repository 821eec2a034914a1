"""The curation rules side by side over task draws: one row per task seed × rule, from each
draw's results folder (`metrics/smda_curate.json`, `metrics/smda_evaluate.json`, `params.yaml`).

    python -m mda.smda.rules_table --dirs results/smda-rules/task-seed-{0,1,2,3} --out results/smda-rules/table.md

Per row: the rule's removals against the ground truth (precision, recall, random removals'
precision of the same size per class, p), the share of the removed pairs' |score| that is the ΔX
pathway's, and the SFT outcome — curated − full and full − random in soft and greedy F1 (mean
[95 % t-interval] of the per-seed differences) — with the oracle's gain (oracle − full) of that
draw. Below the table, per rule: on how many of the *new* draws (task seed ≠ 0) curated ≥ full >
random held.

"Held" (fixed with the rules, before any of their results): on soft F1, the mean per-seed
difference curated − full is ≥ 0 *and* full − random is > 0 (the direction of SMDA's claim);
"clearly" when, in addition, the full − random interval excludes 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from mda.core.errors import MdaError

PRIMARY = "soft_f1"


def _load(folder: Path, name: str) -> dict:
    path = folder / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MdaError(f"{path}: missing (a task draw's results folder holds the smda metrics)") from None
    except json.JSONDecodeError as err:
        raise MdaError(f"{path}: not valid JSON ({err.msg})") from None


def rows_of(folder: Path) -> list[dict]:
    params = yaml.safe_load((folder / "params.yaml").read_text())
    seed = params["smda"]["task"]["seed"]
    curate, ev = _load(folder, "metrics/smda_curate.json"), _load(folder, "metrics/smda_evaluate.json")
    comps = ev.get("comparisons", {})
    configured = params["smda"]["curate"]["rule"]  # its sets are also trained as plain `curated` / `random`

    def get(rule: str, key: str, plain: str | None = None) -> dict:
        return comps.get(key) or (comps.get(plain) if plain and rule == configured else None) or {}

    rows = []
    for rule, r in curate["rules"].items():
        row = {"task_seed": seed, "rule": rule, **{k: r.get(k) for k in ("removed", "precision", "recall",
                                                                           "random_precision_mean", "p_precision",
                                                                           "x_share_removed")}}
        for metric in ("soft_f1", "greedy_f1"):
            row[f"curated_minus_full_{metric}"] = get(rule, f"curated-{rule} ≥ full.{metric}", f"curated ≥ full.{metric}")
            row[f"full_minus_random_{metric}"] = get(rule, f"full > random-{rule}.{metric}", f"full > random.{metric}")
            row[f"oracle_minus_full_{metric}"] = get(rule, f"oracle ≥ full.{metric}")
        c, f = row[f"curated_minus_full_{PRIMARY}"], row[f"full_minus_random_{PRIMARY}"]
        trained = bool(c) and bool(f)
        row["held"] = trained and c["mean"] >= 0 and f["mean"] > 0
        row["held_clearly"] = row["held"] and f["low"] is not None and f["low"] > 0
        row["trained"] = trained
        rows.append(row)
    return rows


def _num(v, digits=3):
    return "—" if v is None or v != v else f"{v:.{digits}f}"


def _diff(d: dict | None) -> str:
    if not d:
        return "—"
    low, high = d.get("low"), d.get("high")
    ci = f" [{low:+.3f}, {high:+.3f}]" if low is not None and low == low else ""
    return f"{d['mean']:+.3f}{ci}"


def markdown(rows: list[dict], declared: set[str]) -> str:
    head = ["task seed", "rule", "removed", "precision", "recall", "random precision", "p", "ΔX share",
            "curated − full (soft F1)", "full − random (soft F1)", "curated − full (greedy F1)",
            "full − random (greedy F1)", "oracle − full (soft F1)", "held"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = f"`{r['rule']}`" + (" †" if r["rule"] in declared else "")
        held = ("yes" + (" (clearly)" if r["held_clearly"] else "")) if r["held"] else ("no" if r["trained"] else "not trained")
        lines.append("| " + " | ".join([str(r["task_seed"]), name, str(r["removed"]), _num(r["precision"]),
                                        _num(r["recall"]), _num(r["random_precision_mean"]), _num(r["p_precision"], 3),
                                        _num(r["x_share_removed"], 2), _diff(r["curated_minus_full_soft_f1"]),
                                        _diff(r["full_minus_random_soft_f1"]), _diff(r["curated_minus_full_greedy_f1"]),
                                        _diff(r["full_minus_random_greedy_f1"]), _diff(r["oracle_minus_full_soft_f1"]),
                                        held]) + " |")
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    new = [r for r in rows if r["task_seed"] != 0]
    draws = sorted({r["task_seed"] for r in new})
    lines += ["", f"On the new task draws (seeds {', '.join(map(str, draws))}), curated ≥ full > random held "
                  f"(soft F1, the rule fixed in `mda.smda.rules_table`):", ""]
    for rule in rules:
        mine = [r for r in new if r["rule"] == rule and r["trained"]]
        held = sum(r["held"] for r in mine)
        clearly = sum(r["held_clearly"] for r in mine)
        lines.append(f"- `{rule}`{' †' if rule in declared else ''}: {held} of {len(mine)}"
                     + (f" ({clearly} clearly)" if clearly else ""))
    lines += ["", "† declared before any of its results (issue 22). `median` is the published rule; `oriented` was "
                  "chosen after seeing scores (an ablation)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from mda.smda.curate import DECLARED_IN_ADVANCE

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dirs", nargs="+", required=True, help="results folders, one per task draw")
    ap.add_argument("--out", help="write the Markdown here (default: stdout)")
    ap.add_argument("--json", help="also the rows as JSON")
    args = ap.parse_args(argv)
    try:
        rows = [r for d in args.dirs for r in rows_of(Path(d))]
    except MdaError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    text = markdown(rows, set(DECLARED_IN_ADVANCE))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
