"""DVC stage `smda-report`: the SMDA results as reports/smda/report.md, a self-contained
report.html (images embedded) and the PNGs."""

from pathlib import Path

from mda.cli import run_stage
from mda.io import atomic_dir
from mda.smda.report import build_report, read_results, write_document
from mda.tracking import git_commit, stage_run

DATA, OUT = "data/smda", "reports/smda"


def main(params):
    with stage_run("smda-report", {"smda.evaluate": params.smda.evaluate}) as run:
        results = read_results(DATA)
        with atomic_dir(OUT) as tmp:
            doc = build_report(results, Path("params.yaml").read_text(), git_commit()[:12], tmp)
            write_document(doc, tmp, title="SMDA report")
        run.log_artifacts(OUT, artifact_path="smda-report")


if __name__ == "__main__":
    run_stage(main)
