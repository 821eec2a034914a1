"""DVC stage `report`: the evaluation as reports/report.md, a self-contained reports/report.html
and the PNGs in reports/figures/ — three outputs, so that other stages may write elsewhere under
reports/ (e.g. reports/smda/)."""

import subprocess
from pathlib import Path


import pandas as pd

from mda.core.cli import run_stage
from mda.core.io import read_json, read_table
from mda.report.build import FIGURES, read_evaluation, write_report
from mda.core.provenance import git_commit, repo_root
from mda.core.tracking import stage_run

EVALUATE, SCORES, OUT = "data/evaluate", "data/scores/scores.parquet", "reports"
TOKENS, SCORE_METRICS = "data/scores/tokens.parquet", "metrics/scores.json"


def commit_label() -> str:
    """The commit, marked `+changes` when the code, dvc.yaml or params.yaml differ from it
    (as in a `dvc exp run -S …`); outputs such as dvc.lock do not count."""
    commit = git_commit()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                            "params.yaml", "dvc.yaml", "mda", "stages"], cwd=repo_root(),
                           capture_output=True, text=True).stdout.strip()
    return f"{commit[:12]}{' +changes' if dirty else ''}"


def main(params):
    with stage_run("report", {"evaluate": params.evaluate}) as run:
        ev = read_evaluation(EVALUATE)
        scores = read_table(SCORES, "scores")
        tokens = pd.read_parquet(TOKENS) if Path(TOKENS).is_file() else None  # none: influence.token_samples 0
        write_report(ev, scores, Path("params.yaml").read_text(), commit_label(), OUT,
                     title=f"mda report: {', '.join(ev['summary']['heads'])}", tokens=tokens,
                     score_metrics=read_json(SCORE_METRICS, "run the scores stage"))
        for name in ("report.md", "report.html"):
            run.log_artifact(f"{OUT}/{name}", artifact_path="report")
        run.log_artifacts(f"{OUT}/{FIGURES}", artifact_path=f"report/{FIGURES}")
        run.set_tag("missing_runs", ", ".join(ev["summary"]["missing_runs"]) or "none")


if __name__ == "__main__":
    run_stage(main)
