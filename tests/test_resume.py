"""Kill -9 anywhere, rerun, same bytes: `checkpoints`, `gradients` and a `retrain` arm are
killed (SIGKILL, a subprocess) at a random point of their work, rerun, and their outputs
compared with an uninterrupted run's; stale caches are discarded with one line."""

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import yaml

from tests.conftest import REPO, TINY, deep_update, make_pipeline_repo, run_stage, set_params

# Longer than TINY so that each stage's work spans many artefacts (checkpoints, shards,
# resume points) a kill can land between.
LONGER = {"corpus": {"steps": 40}, "pretrain": {"save_every": 4},
          "influence": {"shard_samples": 4, "batch_size": 4, "factor_samples": 0},
          "retrain": {"eval_every": 1, "fixed_arms": ["baseline", "remove-top", "augment-top"],
                      "random_arms": ["remove-random"], "seeds": [0]},
          "locate": {"window": [8, 32]}}


@pytest.fixture(scope="module")
def ready_repo(tmp_path_factory):
    params = deep_update(deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), TINY), LONGER)
    repo = make_pipeline_repo(tmp_path_factory.mktemp("resume") / "repo", params)
    for stage in ("corpus", "checkpoints", "locate", "factors", "gradients", "scores", "select"):
        res = run_stage(repo, stage)
        assert res.returncode == 0, (stage, res.stderr[-2000:])
    return repo


def digest_tree(*paths: Path) -> dict[str, str]:
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f.relative_to(root.parent))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def kill_midway(repo: Path, stage: str, args: list[str], progress, total: int, rng: random.Random) -> bool:
    """Start the stage, SIGKILL it once `progress()` reaches a random count in [1, total − 1].
    Returns whether it was killed while still working (retried by the caller otherwise)."""
    target = rng.randint(1, total - 1)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    proc = subprocess.Popen([sys.executable, "-m", f"stages.{stage}", *args], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while proc.poll() is None:
        if progress() >= target:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    return False


CASES = {
    # stage, args, outputs compared, what counts as progress, how many of it a full run makes
    "checkpoints": ([], ["data/checkpoints", "plots/pretrain_loss.csv", "metrics/checkpoints.json"],
                    lambda r: len(list((r / "data/checkpoints").glob("step*"))), 14),
    "gradients": ([], ["data/gradients"],
                  lambda r: len(list((r / "data/gradients").glob("shard-*.parquet"))), 24),
    "retrain": (["remove-top"], ["data/retrain/remove-top"],
                lambda r: retrained_steps(r / "data/.work/retrain/remove-top/resume/progress.json"), 24),
}


def retrained_steps(progress: Path) -> int:
    """Updates done at the arm's last resume point (0 before the first one)."""
    import json

    try:
        return len(json.loads(progress.read_text())["losses"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(CASES))
def test_kill_anywhere_then_rerun_gives_the_same_bytes(ready_repo, tmp_path, stage):
    args, outputs, progress, total = CASES[stage]
    reference = tmp_path / "reference"
    shutil.copytree(ready_repo, reference, symlinks=True)
    killed = tmp_path / "killed"
    shutil.copytree(ready_repo, killed, symlinks=True)
    for repo in (reference, killed):  # a fresh start for the stage in both copies
        for out in outputs:
            path = repo / out
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    res = run_stage(reference, stage, args=args)
    assert res.returncode == 0, res.stderr[-2000:]

    rng = random.Random(os.environ.get("PYTEST_SEED", stage))
    for attempt in range(8):
        if kill_midway(killed, stage, args, lambda: progress(killed), total, rng):
            break
        for out in outputs:  # it finished first: start over and try another point
            path = killed / out
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        shutil.rmtree(killed / "data/.work", ignore_errors=True)
    else:
        pytest.fail(f"{stage} always finished before the kill")
    assert progress(killed) >= 1  # it died with partial work on disk
    rerun = run_stage(killed, stage, args=args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert digest_tree(*(killed / o for o in outputs)) == digest_tree(*(reference / o for o in outputs))
    # Nothing temporary is left, whichever process made it.
    leftovers = [p for o in outputs for p in (killed / o).parent.rglob(".*.tmp-*")]
    assert not leftovers
    if stage == "retrain":
        assert not (killed / "data/.work/retrain/remove-top").exists()
    else:  # the killed stage's MLflow run was closed as FAILED by the rerun
        client = MlflowClient(f"sqlite:///{killed / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("mda").experiment_id],
                                  filter_string=f"tags.stage = '{stage}'")
        assert not [r for r in runs if r.info.status == "RUNNING"]
        assert any(r.data.tags.get("mda.killed") == "true" and r.info.status == "FAILED" for r in runs)


@pytest.mark.slow
def test_stale_gradient_shards_are_recomputed_not_reused(ready_repo, tmp_path):
    """Other weights at the influence step (as after `-S pretrain.lr=…`), another projection
    seed, another dtype: each discards the cache with one line, and the result equals a
    fresh computation."""
    from safetensors.torch import load_file, save_file

    repo = tmp_path / "repo"
    shutil.copytree(ready_repo, repo, symlinks=True)
    before = digest_tree(repo / "data/gradients")
    targets = yaml.safe_load((repo / "data/locate/targets.json").read_text())
    weights = repo / f"data/checkpoints/step{targets['influence_step']}/model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if "query_key_value.weight" in k)
    tensors[name] = tensors[name] * 1.01  # same shapes, same row count: only the content says
    save_file(tensors, weights, metadata={"format": "pt"})
    res = run_stage(repo, "gradients")
    assert res.returncode == 0, res.stderr
    assert "cached shard(s) made from other inputs" in res.stdout and "checkpoint" in res.stdout
    after = digest_tree(repo / "data/gradients")
    assert all(after[k] != before[k] for k in after if "shard-" in k)
    fresh = tmp_path / "fresh"
    shutil.copytree(repo, fresh, symlinks=True)
    shutil.rmtree(fresh / "data/gradients")
    assert run_stage(fresh, "gradients").returncode == 0
    assert digest_tree(fresh / "data/gradients") == after
    # Factors of the old weights, then a cache of another dtype: scores refuse both, naming them.
    res = run_stage(repo, "scores")
    assert res.returncode == 1 and res.stderr.strip().endswith("checkpoint differ); rerun the factors stage")
    assert run_stage(repo, "factors").returncode == 0
    set_params(repo, {"influence": {"dtype": "float16"}})
    res = run_stage(repo, "scores")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].endswith("(dtype differ); rerun the gradients stage")
    for change, word in (({"dtype": "float16"}, "dtype"), ({"projection": 4, "projection_seed": 3}, "projection")):
        set_params(repo, {"influence": {"dtype": "float32", "projection": 0, "projection_seed": 0, **change}})
        res = run_stage(repo, "gradients")
        assert res.returncode == 0 and word in res.stdout, res.stdout + res.stderr


@pytest.mark.slow
def test_pretraining_with_other_params_starts_over(ready_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ready_repo, repo, symlinks=True)
    set_params(repo, {"pretrain": {"lr": 0.002}})
    res = run_stage(repo, "checkpoints")
    assert res.returncode == 0, res.stderr
    assert "made by another run (pretrain differ); starting over" in res.stdout
    fresh = tmp_path / "fresh"
    shutil.copytree(repo, fresh, symlinks=True)
    shutil.rmtree(fresh / "data/checkpoints")
    assert run_stage(fresh, "checkpoints").returncode == 0
    assert digest_tree(fresh / "data/checkpoints") == digest_tree(repo / "data/checkpoints")
