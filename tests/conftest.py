import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import mda  # noqa: F401  (before any test imports torch: mda's OpenMP spin count, see mda/__init__.py)

REPO = Path(__file__).resolve().parents[1]

# Small enough for seconds on 2 cores; same code paths as the default.
TINY = {
    "compute": {"threads": 1},
    "corpus": {"seq_len": 32, "batch_size": 4, "steps": 12, "heldout_rows": 16},
    "model": {"layers": 2, "hidden_size": 32, "heads": 2, "intermediate_size": 64,
              "max_position_embeddings": 64},
    "pretrain": {"warmup_steps": 2, "save_every": 4, "log_every": 2,
                 "probe": {"sequences": 4, "half_len": 8}},
    "locate": {"probe": {"sequences": 4, "half_len": 8}, "heldout_rows": 16},
    "retrain": {"eval_every": 2},
}


def deep_update(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_update(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


@pytest.fixture
def tiny_params():
    """Default params with the tiny overrides, validated."""
    from mda.core.config import parse_params

    return parse_params(deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), TINY))


@pytest.fixture
def pipeline_repo(tmp_path):
    """A fresh copy of the repository (code, dvc.yaml, tiny params.yaml) as its own git+DVC repo."""
    return make_pipeline_repo(tmp_path / "repo")


@pytest.fixture(scope="module")
def trained_repo(tmp_path_factory):
    """A tiny pipeline repo whose `corpus` and `checkpoints` stages have run (shared by a module)."""
    repo = make_pipeline_repo(tmp_path_factory.mktemp("trained") / "repo")
    for stage in ("corpus", "checkpoints"):
        res = run_stage(repo, stage)
        assert res.returncode == 0, res.stderr
    return repo


@pytest.fixture(scope="session")
def quick_repo(tmp_path_factory):
    """A repo on the `quick` preset after one whole `dvc repro` (the DAG CI runs once), with
    every params key each stage read recorded in `params-read.jsonl` (tests/test_dvc_deps.py)."""
    import os

    repo = make_pipeline_repo(tmp_path_factory.mktemp("quick") / "repo",
                              yaml.safe_load((REPO / "presets/quick.yaml").read_text()))
    env = {**os.environ, "MDA_RECORD_PARAMS": str(repo / "params-read.jsonl")}
    res = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return repo


def make_pipeline_repo(repo: Path, params: dict | None = None) -> Path:
    """A git+DVC repo with the code, dvc.yaml, the plot template and `params` (default: tiny)."""
    repo.mkdir(parents=True)
    for name in ("mda", "stages", "dvc.yaml", "pyproject.toml", ".dvcignore", ".gitignore"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, repo / name)
    if params is None:
        params = deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    run = lambda *cmd: subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    run("git", "init", "-q")
    run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init")
    run(sys.executable, "-m", "dvc", "init", "-q")
    shutil.copytree(REPO / ".dvc" / "plots", repo / ".dvc" / "plots")
    return repo


def set_params(repo: Path, override: dict) -> dict:
    """Apply `override` to the repo's params.yaml; return the previous params to restore."""
    before = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(deep_update(before, override)))
    return before


def run_stage(repo: Path, stage: str, env: dict | None = None, args: list[str] | None = None):
    import os

    full_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}", **(env or {})}
    return subprocess.run([sys.executable, "-m", f"stages.{stage}", *(args or [])], cwd=repo, capture_output=True,
                          text=True, env=full_env)


# ----------------------------------------------------------------------------- a fake hub cache
REPO_DIR = "models--EleutherAI--pythia-14m"


def tiny_model(seed):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32))
    with torch.no_grad():  # peaked attention, different in every head (the init's is near uniform)
        for block in model.gpt_neox.layers:
            block.attention.query_key_value.weight.add_(torch.randn_like(block.attention.query_key_value.weight))
    return model


def add_revision(cache, revision, saved):
    """Lay out `saved` as huggingface_hub does: blobs, a snapshot of symlinks, a ref."""
    repo = cache / REPO_DIR
    commit = hashlib.sha1(revision.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        data = (saved / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(f"../../blobs/{blob.name}")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)


@pytest.fixture
def cache(tmp_path):
    models = {}
    for step in (0, 1):
        models[step] = tiny_model(seed=step)
        models[step].save_pretrained(tmp_path / f"saved{step}")
        add_revision(tmp_path / "cache", f"step{step}", tmp_path / f"saved{step}")
        shutil.rmtree(tmp_path / f"saved{step}")
    return tmp_path / "cache", models
