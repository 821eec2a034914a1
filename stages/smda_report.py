"""DVC stage `smda-report`: the SMDA results as reports/smda/report.md, a self-contained
report.html (images embedded) and the PNGs."""


import yaml

from mda.core.cli import run_stage
from mda.core.io import atomic_dir
from mda.smda.report import build_report, read_results, write_document
from mda.core.provenance import git_commit
from mda.core.tracking import stage_run

DATA, OUT = "data/smda", "reports/smda"


def smda_section(params) -> str:
    """The `smda` params this report is made from (reading them all), as YAML: the report
    depends on this section only, so an ablation of the MDA pipeline does not rerun it."""
    note = ("# The smda section of params.yaml; the model it starts from is data/checkpoints, made\n"
            "# with the params quoted in reports/report.md.\n")
    return note + yaml.safe_dump({"smda": params.smda.model_dump(mode="json")}, sort_keys=False)


def main(params):
    with stage_run("smda-report", {"smda.evaluate": params.smda.evaluate}) as run:
        results = read_results(DATA)
        with atomic_dir(OUT) as tmp:
            doc = build_report(results, smda_section(params), git_commit()[:12], tmp)
            write_document(doc, tmp, title="SMDA report")
        run.log_artifacts(OUT, artifact_path="smda-report")


if __name__ == "__main__":
    run_stage(main)
