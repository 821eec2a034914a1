import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Small enough for seconds on 2 cores; same code paths as the default.
TINY = {
    "corpus": {"seq_len": 32, "batch_size": 4, "steps": 12},
    "model": {"layers": 2, "hidden_size": 32, "heads": 2, "intermediate_size": 64,
              "max_position_embeddings": 64},
    "pretrain": {"warmup_steps": 2, "save_every": 4, "log_every": 2, "threads": 1,
                 "probe": {"sequences": 4, "half_len": 8}},
}


def deep_update(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_update(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


@pytest.fixture
def tiny_params():
    """Default params with the tiny overrides, validated."""
    from mda.config import parse_params

    return parse_params(deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), TINY))


@pytest.fixture
def pipeline_repo(tmp_path):
    """A fresh copy of the repository (code, dvc.yaml, tiny params.yaml) as its own git+DVC repo."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("mda", "stages", "dvc.yaml", "pyproject.toml", ".dvcignore", ".gitignore"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, repo / name)
    params = deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    run = lambda *cmd: subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    run("git", "init", "-q")
    run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init")
    run(sys.executable, "-m", "dvc", "init", "-q")
    return repo


def run_stage(repo: Path, stage: str, env: dict | None = None):
    import os

    full_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}", **(env or {})}
    return subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=repo, capture_output=True,
                          text=True, env=full_env)
