"""MLflow tracking shared by every stage: one run per stage, grouped by pipeline id.

- Store: sqlite at the repository root (`$DVC_ROOT` when DVC sets it, so runs made by
  `dvc exp run --temp/--queue` in a scratch copy still land in the user's store);
  `MLFLOW_TRACKING_URI` overrides. The file store is never used (MLflow 3 refuses it).
- Tags: `stage`, `pipeline_id` (shared by all stages launched by one `dvc repro` /
  `dvc exp run`), `dvc_exp` (the DVC experiment name, if any), `git_commit`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

EXPERIMENT = "mda"


def repo_root() -> Path:
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"])
    here = Path.cwd().resolve()
    for p in (here, *here.parents):
        if (p / ".dvc").is_dir() or (p / "dvc.yaml").is_file():
            return p
    return here


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def pipeline_id() -> str:
    """Identify the `dvc repro` (or `dvc exp run`) process that launched this stage.

    Stages run as separate processes; their nearest `dvc` ancestor is the same process
    for one pipeline run, so its pid and start time name the group. `MDA_PIPELINE_ID`
    overrides; outside DVC each process is its own pipeline.
    """
    if os.environ.get("MDA_PIPELINE_ID"):
        return os.environ["MDA_PIPELINE_ID"]
    import psutil

    proc = psutil.Process()
    anchor = proc
    try:
        for parent in proc.parents():
            cmd = " ".join(parent.cmdline()[:3])
            if "dvc" in Path(parent.cmdline()[0]).name or " -m dvc" in cmd or "/dvc " in cmd + " ":
                anchor = parent
                break
    except (psutil.Error, IndexError):
        pass
    return hashlib.sha1(f"{anchor.pid}-{anchor.create_time()}".encode()).hexdigest()[:12]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextmanager
def stage_run(stage: str, params: dict, run_name: str | None = None,
              tags: dict[str, str] | None = None) -> Iterator["mlflow.ActiveRun"]:
    """An MLflow run for one stage (or one retrain arm × seed), with its params logged."""
    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri())
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        artifacts = (repo_root() / "mlartifacts").resolve().as_uri()
        try:
            mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts)
        except mlflow.exceptions.MlflowException:
            pass  # a parallel stage created it first
    mlflow.set_experiment(EXPERIMENT)
    all_tags = {"stage": stage, "pipeline_id": pipeline_id(), "git_commit": git_commit(),
                "dvc_exp": os.environ.get("DVC_EXP_NAME", "")}
    all_tags.update(tags or {})
    with mlflow.start_run(run_name=run_name or stage, tags=all_tags) as run:
        flat = {k: str(v) for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow caps a log_params batch at 100
            mlflow.log_params(dict(items[i:i + 100]))
        yield run
