"""Peak memory of whole runs, stage by stage: which stage is the largest process, at K = 3 and at
K = 19 random sets (or any runs collected by `benchmarks/experiment.py`).

    python benchmarks/peak_rss.py results/default results/power --json benchmarks/results/peak-rss.json

Reads each results folder's `run.json`: the largest process of the whole command (`/usr/bin/time
-v`) and, per MLflow run, the stage process's own peak RSS (`peak_rss_gib`, logged by
`mda.core.tracking.stage_run` from `getrusage`). Goal: ≤ 3 GiB whatever K is.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

GOAL_GIB = 3.0


def stage_of(run_name: str) -> str:
    """`retrain-remove-random-7` → `retrain` arms are grouped; other runs are their stage."""
    return "retrain" if run_name.startswith("retrain-") else re.sub(r"@.*$", "", run_name)


def summary(folder: Path) -> dict:
    info = json.loads((folder / "run.json").read_text())
    seeds = None
    params = folder / "params.yaml"
    if params.is_file():
        import yaml
        seeds = len(yaml.safe_load(params.read_text())["retrain"]["seeds"])
    by_stage: dict[str, float] = {}
    for name, run in info["mlflow_runs"].items():
        if run.get("peak_rss_gib") is not None:
            stage = stage_of(name)
            by_stage[stage] = max(by_stage.get(stage, 0.0), run["peak_rss_gib"])
    largest = max(by_stage.items(), key=lambda kv: kv[1], default=(None, None))
    return {"run": folder.name, "random_sets_K": seeds, "command": info["command"],
            "peak_rss_gib_whole_command": info["peak_rss_gib"], "largest_stage": largest[0],
            "largest_stage_gib": largest[1], "per_stage_gib": dict(sorted(by_stage.items(), key=lambda kv: -kv[1])),
            "within_goal": info["peak_rss_gib"] is not None and info["peak_rss_gib"] <= GOAL_GIB,
            "cpu_model": info["cpu_model"], "commit": info["commit"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    out = {"goal_gib": GOAL_GIB, "runs": [summary(Path(f)) for f in args.folders],
           "note": "peak_rss_gib_whole_command: /usr/bin/time -v over the command (the largest single process, "
                   "dvc included); per_stage_gib: each stage process's own getrusage peak, the largest arm for retrain"}
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
