"""DVC stage `report`: the evaluation as reports/report.md, a self-contained report.html and PNGs."""

import subprocess
from pathlib import Path


import pandas as pd

from mda.cli import run_stage
from mda.errors import MdaError
from mda.io import atomic_dir
from mda.report import build_report, read_evaluation, write_report
from mda.tracking import git_commit, repo_root, stage_run

EVALUATE, SCORES, OUT = "data/evaluate", "data/scores/scores.parquet", "reports"


def commit_label() -> str:
    """The commit, marked `+changes` when the code, dvc.yaml or params.yaml differ from it
    (as in a `dvc exp run -S …`); outputs such as dvc.lock do not count."""
    commit = git_commit()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                            "params.yaml", "dvc.yaml", "mda", "stages"], cwd=repo_root(),
                           capture_output=True, text=True).stdout.strip()
    return f"{commit[:12]}{' +changes' if dirty else ''}"


def main(params):
    with stage_run("report", {"evaluate": params.evaluate.model_dump()}) as run:
        ev = read_evaluation(EVALUATE)
        try:
            scores = pd.read_parquet(SCORES)
        except FileNotFoundError:
            raise MdaError(f"{SCORES}: missing; run the scores stage") from None
        # Interim (the eval14 branch does this properly): three outputs, report.md, report.html and
        # figures/, so that reports/smda/ can be another stage's output.
        with atomic_dir(f"{OUT}/figures") as figures:
            doc = build_report(ev, scores, Path("params.yaml").read_text(), commit_label(), figures)
            doc.blocks = [("image", b[1], b[2], f"figures/{b[1].name}") if b[0] == "image" else b for b in doc.blocks]
            write_report(doc, Path(OUT), title=f"mda report: {', '.join(ev['summary']['heads'])}")
        run.log_artifacts(OUT, artifact_path="report")
        run.set_tag("missing_runs", ", ".join(ev["summary"]["missing_runs"]) or "none")


if __name__ == "__main__":
    run_stage(main)
