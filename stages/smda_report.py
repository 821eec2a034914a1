"""DVC stage `smda-report`: the SMDA results as reports/smda/report.md, a self-contained
report.html (images embedded) and the PNGs."""

from pathlib import Path

from mda.cli import run_stage
from mda.io import atomic_dir
from mda.smda.report import build_report, read_results, write_document
from mda.tracking import git_commit, stage_run

DATA, OUT = "data/smda", "reports/smda"


def smda_section(text: str) -> str:
    """The `smda` section of params.yaml as written (comments kept): the params this report is
    made from, so that an ablation of the MDA pipeline does not rerun it."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith("smda:")), None)
    end = len(lines) if start is None else next(
        (i for i in range(start + 1, len(lines)) if lines[i][:1] not in ("", " ", "#", "\n")), len(lines))
    note = ("# The smda section only; the model it starts from is data/checkpoints, made with the\n"
            "# params quoted in reports/report.md.\n")
    return note + ("".join(lines[start:end]).rstrip() + "\n" if start is not None else "")


def main(params):
    with stage_run("smda-report", {"smda.evaluate": params.smda.evaluate}) as run:
        results = read_results(DATA)
        with atomic_dir(OUT) as tmp:
            doc = build_report(results, smda_section(Path("params.yaml").read_text()), git_commit()[:12], tmp)
            write_document(doc, tmp, title="SMDA report")
        run.log_artifacts(OUT, artifact_path="smda-report")


if __name__ == "__main__":
    run_stage(main)
