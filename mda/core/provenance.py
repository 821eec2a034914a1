"""Where a stage's run comes from: the repository root and MLflow store it logs to, the pipeline
(`dvc repro` / `dvc exp run`) it belongs to, the commit, the workspace's params and its process."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
from pathlib import Path


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
            if "torchrun" in cmd or "torch.distributed.run" in cmd:
                anchor = parent  # ranks of one launch share the launcher, if no dvc is above it
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
    """Nested dicts (and params sections) → {"a.b.c": value}."""
    from pydantic import BaseModel

    from mda.core.config import unwrap

    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        v = unwrap(v)
        if isinstance(v, BaseModel):
            v = v.model_dump()
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def workspace_params() -> dict:
    """The params file of the workspace the stage runs in (a `dvc exp run --temp` copy included),
    flattened onto the pipeline's run so that experiments compare by it; {} without one."""
    import yaml

    path = Path.cwd() / "params.yaml"
    try:
        return flatten(yaml.safe_load(path.read_text()) or {})
    except (OSError, yaml.YAMLError):
        return {}


def process_tags() -> dict[str, str]:
    import psutil

    return {"mda.host": socket.gethostname(), "mda.pid": str(os.getpid()),
            "mda.proc_start": repr(psutil.Process().create_time())}
