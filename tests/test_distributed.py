"""The scale path on CPU: torchrun ranks (gloo) against one process, micro-batched gradient
accumulation against the full batch, bf16 autocast against float32, and the compute
settings' bad input."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mda.core.compute import Runtime
from mda.model.neox import neox_config, new_model
from mda.train.loop import Trainer
from tests.conftest import run_stage, set_params


def spearman(x, y) -> float:
    return pd.Series(np.asarray(x)).corr(pd.Series(np.asarray(y)), method="spearman")


def launch(repo, stage, *args, env=None):
    """The stage through the launcher dvc.yaml uses (`python -m mda.core.launch <procs> …`)."""
    import os
    import subprocess
    import sys

    import yaml

    procs = yaml.safe_load((repo / "params.yaml").read_text())["compute"]["procs"]
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}", **(env or {})}
    return subprocess.run([sys.executable, "-m", "mda.core.launch", str(procs), f"stages.{stage}", *args], cwd=repo,
                          capture_output=True, text=True, env=full_env)


# ----------------------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("weights", [None, torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])])
def test_micro_batches_accumulate_the_full_batch_gradient(tiny_params, weights):
    """6 rows in micro-batches of 2 give the full batch's gradient (1e-6), weight-0 rows included:
    one loss normaliser for the whole step."""
    ids = torch.randint(2, 100, (6, 17), generator=torch.Generator().manual_seed(0))
    grads = []
    for micro in (None, 2, 1):
        rt = Runtime(device=torch.device("cpu"), dtype=torch.float32, micro_batch=micro, threads=1)
        trainer = Trainer(new_model(neox_config(tiny_params.model, 128), seed=0), tiny_params.pretrain, 10, rt=rt)
        loss = trainer.accumulate(ids, weights)
        grads.append((loss, torch.cat([p.grad.flatten() for p in trainer.model.parameters()])))
    (full_loss, full), *parts = grads
    for loss, g in parts:
        assert abs(loss - full_loss) <= 1e-6 * abs(full_loss)
        torch.testing.assert_close(g, full, rtol=1e-6, atol=1e-6 * full.abs().max().item())


def test_bad_compute_settings_are_one_line(tiny_params, trained_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(trained_repo, repo, symlinks=True)
    shutil.rmtree(repo / "data/checkpoints")
    cases = [({"compute": {"device": "cuda"}}, "compute.device: cuda, but no CUDA device is available")]
    if not torch.cuda.is_available():
        cases.append(({"compute": {"procs": 64}}, "compute.procs: 64 processes on a machine with"))
    cases.append(({"compute": {"micro_batch": 3}}, "compute.micro_batch: 3 does not divide the 4 rows"))
    cases.append(({"compute": {"procs": 2, "micro_batch": 3}}, "compute.micro_batch: 3 does not divide the 2 rows"))
    for override, message in cases:
        before = set_params(repo, override)
        res = launch(repo, "checkpoints")
        (repo / "params.yaml").write_text(json.dumps(before))
        lines = [line for line in res.stderr.strip().splitlines() if line.startswith("error:")]
        assert res.returncode != 0 and lines and message in lines[0], res.stderr[-2000:]
        assert not (repo / "data/checkpoints").exists() or not any((repo / "data/checkpoints").glob("step*"))


# ----------------------------------------------------------------------------- torchrun ranks
@pytest.mark.slow
def test_two_rank_pretraining_equals_one_process_and_resumes_on_one(trained_repo, tmp_path):
    """2 ranks × micro-batches of 1 row against 1 process with the whole batch: the same loss at
    every step and the same outputs (1e-5 relative), the same weights to 1e-5 after 4 steps; a
    2-rank run stopped after step 4 resumes on 1 rank and ends the same."""
    from mda.data.corpus import read_heldout
    from mda.model.neox import load_model

    one, two = tmp_path / "one", tmp_path / "two"
    for repo in (one, two):
        shutil.copytree(trained_repo, repo, symlinks=True)
        shutil.rmtree(repo / "data/checkpoints")
    set_params(two, {"compute": {"procs": 2, "micro_batch": 1}})
    for repo in (one, two):
        res = launch(repo, "checkpoints")
        assert res.returncode == 0, res.stderr[-3000:]
    steps = sorted(int(p.name[4:]) for p in (one / "data/checkpoints").glob("step*"))
    assert steps == sorted(int(p.name[4:]) for p in (two / "data/checkpoints").glob("step*"))
    assert_same_weights(one, two, 4)
    # Stop the 2-rank run after step 4 (its later checkpoints gone), go on with one process.
    for step in steps:
        if step > 4:
            shutil.rmtree(two / f"data/checkpoints/step{step}")
    set_params(two, {"compute": {"procs": 1, "micro_batch": None}})
    res = launch(two, "checkpoints")
    assert res.returncode == 0 and "resuming at step 4" in res.stdout, res.stdout + res.stderr[-2000:]
    loss_one = pd.read_csv(one / "plots/pretrain_loss.csv")
    loss_two = pd.read_csv(two / "plots/pretrain_loss.csv")
    assert list(loss_one.step) == list(loss_two.step) == list(range(steps[-1]))
    np.testing.assert_allclose(loss_two.loss, loss_one.loss, rtol=1e-5)
    rows = torch.from_numpy(read_heldout(one / "data/corpus", 16))
    with torch.no_grad():
        logits = [load_model(r / f"data/checkpoints/step{steps[-1]}")(input_ids=rows).logits for r in (one, two)]
    print(f"\n[2 ranks] final logits: max |Δ| {(logits[0] - logits[1]).abs().max():.2e} "
          f"of max |logit| {logits[0].abs().max():.2f}")
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5 * logits[0].abs().max().item())


def assert_same_weights(one, two, step):
    """Every weight to 1e-5 — but the key biases, whose true gradient is exactly zero (a shift of
    every key of a query leaves its softmax unchanged): Adam turns their float noise, which
    depends on summation order, into ±lr steps that change nothing the model computes. (Later,
    the same normalisation lets summation-order noise grow in coordinates whose gradients are
    small, which is why the outputs, not every weight, are compared at the end.)"""
    from transformers import AutoConfig

    from mda.model.heads import qkv_rows

    a = load_file(one / f"data/checkpoints/step{step}/model.safetensors")
    b = load_file(two / f"data/checkpoints/step{step}/model.safetensors")
    config = AutoConfig.from_pretrained(one / "data/checkpoints/step0")
    keys = torch.cat([qkv_rows(config, h)["k"] for h in range(config.num_attention_heads)])
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("query_key_value.bias"):
            mask = torch.ones_like(x, dtype=torch.bool)
            mask[keys] = False
            x, y = x[mask], y[mask]
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5, msg=k)


@pytest.mark.slow
def test_two_rank_influence_equals_one_process(trained_repo, tmp_path):
    """factors → gradients → scores as 2 gloo ranks: scores within 1e-6 relative of one
    process's, and the same top-k set."""
    repos = {}
    for procs in (1, 2):
        repo = tmp_path / f"p{procs}"
        shutil.copytree(trained_repo, repo, symlinks=True)
        set_params(repo, {"compute": {"procs": procs}, "influence": {"factor_samples": 0, "batch_size": 3,
                                                                    "shard_samples": 8}})
        for stage in ("locate", "factors", "gradients", "scores"):
            res = launch(repo, stage)
            assert res.returncode == 0, (procs, stage, res.stderr[-3000:])
        repos[procs] = repo
    one = pd.read_parquet(repos[1] / "data/scores/scores.parquet")
    two = pd.read_parquet(repos[2] / "data/scores/scores.parquet")
    assert list(one.sample_id) == list(two.sample_id) and len(one) > 20
    np.testing.assert_allclose(two.score, one.score, rtol=1e-6, atol=1e-6 * one.score.abs().max())
    k = len(one) // 10
    assert set(one.nlargest(k, "score").sample_id) == set(two.nlargest(k, "score").sample_id)
    shards = sorted(p.name for p in (repos[2] / "data/gradients").glob("shard-*.parquet"))
    assert shards == sorted(p.name for p in (repos[1] / "data/gradients").glob("shard-*.parquet"))
    assert len(shards) > 1  # both ranks wrote shards, one manifest lists them
    manifest = json.loads((repos[2] / "data/gradients/manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == shards


# ----------------------------------------------------------------------------- bf16
@pytest.mark.slow
def test_bf16_autocast_scores_rank_like_float32(quick_repo, tmp_path):
    """factors → gradients → scores under bf16 autocast on CPU against the quick preset's float32
    scores. (On the 12-step tiny model, which has learnt almost nothing, scores are mostly noise
    and rank at Spearman ≈ 0.95; a trained model is what the comparison is about.)"""
    repo = tmp_path / "bf16"
    shutil.copytree(quick_repo, repo, symlinks=True)
    set_params(repo, {"compute": {"dtype": "bfloat16"}})
    for stage in ("factors", "gradients", "scores"):
        res = run_stage(repo, stage)
        assert res.returncode == 0, (stage, res.stderr[-2000:])
    fp32 = pd.read_parquet(quick_repo / "data/scores/scores.parquet")
    bf16 = pd.read_parquet(repo / "data/scores/scores.parquet")
    assert list(fp32.sample_id) == list(bf16.sample_id)
    rho = spearman(fp32.score, bf16.score)
    print(f"\n[bf16] Spearman(bf16, float32) over {len(fp32)} samples = {rho:.4f}")
    assert rho >= 0.99


@pytest.mark.slow
def test_a_dying_rank_fails_the_stage_and_the_rerun_resumes_from_complete_shards(trained_repo, tmp_path):
    """SIGKILL one of 2 gradient ranks mid-window: the stage fails naming the rank; the rerun
    keeps the complete shards and ends with the same bytes as one uninterrupted process."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from tests.test_resume import digest_tree

    repos = {}
    for name, procs in (("one", 1), ("two", 2)):
        repo = tmp_path / name
        shutil.copytree(trained_repo, repo, symlinks=True)
        set_params(repo, {"compute": {"procs": procs}, "influence": {"shard_samples": 4, "batch_size": 2},
                          "locate": {"window": [0, 12], "influence_step": 12}})
        for stage in ("locate",) if procs == 1 else ():
            assert launch(repo, stage).returncode == 0
        repos[name] = repo
    shutil.copytree(repos["one"] / "data/locate", repos["two"] / "data/locate", dirs_exist_ok=True)
    assert launch(repos["one"], "gradients").returncode == 0
    two = repos["two"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{two / 'mlflow.db'}"}
    proc = subprocess.Popen([sys.executable, "-m", "mda.core.launch", "2", "stages.gradients"], cwd=two, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    while proc.poll() is None and killed is None:
        if len(list((two / "data/gradients").glob("shard-*.parquet"))) >= 2:
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if child.environ().get("RANK") == "1":
                        child.send_signal(signal.SIGKILL)
                        killed = child.pid
                except psutil.Error:
                    pass
        time.sleep(0.005)
    out, err = proc.communicate(timeout=300)
    assert killed is not None, "the stage finished before a rank could be killed"
    assert proc.returncode != 0
    assert "error: stages.gradients failed on rank 1" in err, err[-2000:]
    assert not (two / "data/gradients/manifest.json").exists()
    res = launch(two, "gradients")
    assert res.returncode == 0, res.stderr[-2000:]
    assert digest_tree(two / "data/gradients") == digest_tree(repos["one"] / "data/gradients")
