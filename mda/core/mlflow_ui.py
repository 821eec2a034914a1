"""`python -m mda.core.mlflow_ui`: `mlflow ui` over the project's store, opened on the `mda` runs.

MLflow 3.17's UI ignores the experiment tag `mlflow.experimentKind` (its feature flag for the
tag is compiled off): an experiment opens as GenAI or as model training according to one
workflow switch kept in the browser (`localStorage["mlflow.workflowType"]`, default `genai`), or
the URL's `workflowType` parameter. So a fresh browser lands on "Traces" whatever the tag says.
This launcher prints, and serves, the address that opens the runs table as model training:
`…/#/experiments/<id>/runs?workflowType=machine_learning`. The tag stays set for the API and for
UI versions that honour it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from mda.core.errors import MdaError
from mda.core.provenance import tracking_uri
from mda.core.tracking import EXPERIMENT, _sqlite_path

WORKFLOW = "machine_learning"
"""The UI's own value for "Model training" (its enum: genai | machine_learning)."""


def runs_url(experiment_id: str, host: str = "127.0.0.1", port: int = 5000) -> str:
    """The address of an experiment's runs table in the model-training view."""
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs?workflowType={WORKFLOW}"


def experiment_id_in(uri: str, name: str = EXPERIMENT) -> str:
    """The id of experiment `name` in the store `uri`, or one line saying it is not there yet."""
    from mlflow.tracking import MlflowClient

    db = _sqlite_path(uri)
    if db is not None and not db.exists():
        raise MdaError(f"{db}: no MLflow store yet; run a stage first (e.g. dvc repro)")
    exp = MlflowClient(uri).get_experiment_by_name(name)
    if exp is None:
        raise MdaError(f"MLflow store {uri}: no experiment {name!r}; run a stage first (e.g. dvc repro)")
    return exp.experiment_id


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--print-url", action="store_true", help="print the runs table's address and exit")
    args = ap.parse_args(argv)
    uri = tracking_uri()
    try:
        url = runs_url(experiment_id_in(uri), args.host, args.port)
    except MdaError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    print(url, flush=True)
    if not args.print_url:
        sys.exit(subprocess.call([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                                  "--host", args.host, "--port", str(args.port)]))


if __name__ == "__main__":
    main()
