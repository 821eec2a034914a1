"""End to end: `dvc repro` of the whole DAG on the `quick` preset in a fresh repo copy, then a
partial retrain matrix and a `dvc exp run` ablation on top of it."""

import json
import shutil
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

import pandas as pd
import yaml

from mda.config import load_params
from mda.model import load_model, load_trainer_state, saved_steps
from tests.conftest import REPO, make_pipeline_repo, run_stage


@pytest.fixture(scope="module")
def quick_repo(tmp_path_factory):
    """A repo on the `quick` preset after one whole `dvc repro` (the DAG CI runs once)."""
    repo = make_pipeline_repo(tmp_path_factory.mktemp("quick") / "repo",
                              yaml.safe_load((REPO / "presets/quick.yaml").read_text()))
    res = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return repo


def mlflow_runs(repo):
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")  # the default store: the repo root
    return client.search_runs([client.get_experiment_by_name("mda").experiment_id])


@pytest.mark.slow
def test_dvc_repro_quick_preset_runs_every_stage(quick_repo):
    params = load_params(quick_repo / "params.yaml")
    meta = json.loads((quick_repo / "data/corpus/meta.json").read_text())
    assert meta["rows"] == params.corpus.steps * params.corpus.batch_size and meta["source"] == "synthetic"
    ckpts = quick_repo / "data/checkpoints"
    assert saved_steps(ckpts)[:3] == [0, 1, 2] and saved_steps(ckpts)[-1] == params.corpus.steps
    middle = saved_steps(ckpts)[-2]
    assert load_trainer_state(ckpts / f"step{middle}")["next_step"] == middle
    runs = mlflow_runs(quick_repo)
    stages = {r.data.tags["stage"]: r.data.tags["pipeline_id"] for r in runs}
    assert set(stages) == {"corpus", "checkpoints", "locate", "factors", "gradients", "scores", "select",
                           "retrain", "evaluate", "report", "smda-task", "smda-instruct", "smda-sae", "smda-policy",
                           "smda-influence", "smda-curate", "smda-sft", "smda-evaluate", "smda-report"}
    assert len(set(stages.values())) == 1, "stages of one dvc repro share a pipeline id"
    assert sum(r.data.tags["stage"] == "retrain" for r in runs) == 5 * 3  # every arm × seed
    assert json.loads((quick_repo / "data/retrain/baseline/meta.json").read_text())["reproduces_original"]
    effects = pd.read_parquet(quick_repo / "data/evaluate/effects.parquet")
    assert len(effects) == 5 * 3 and set(effects.arm) == {"baseline", "remove-top", "augment-top",
                                                          "remove-random", "augment-random"}
    assert (effects[effects.arm == "baseline"].delta_score == 0).all()
    metrics = json.loads((quick_repo / "metrics/evaluate.json").read_text())
    window_samples = json.loads((quick_repo / "data/select/meta.json").read_text())["window_samples"]
    assert metrics["missing_runs"] == 0 and metrics["k"] == round(params.select.fraction * window_samples)
    page = (quick_repo / "reports/report.html").read_text()
    assert page.count("data:image/png;base64,") == 6 and "Answer" in page
    assert sum(r.data.tags["stage"] == "smda-sft" for r in runs) == 4 * 3  # every SMDA set × seed
    smda_page = (quick_repo / "reports/smda/report.html").read_text()
    assert smda_page.count("data:image/png;base64,") == 5 and (quick_repo / "reports/figures").is_dir()
    evaluate_run = next(r for r in runs if r.data.tags["stage"] == "evaluate")
    assert "k" in evaluate_run.data.metrics
    # The per-arm trajectories render through the repo's plot template, without field errors.
    shown = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=quick_repo,
                           capture_output=True, text=True)
    plots = json.loads(shown.stdout)
    assert not plots.get("errors") and plots["data"]["retrain_target_score"]
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=quick_repo, capture_output=True, text=True)
    assert "up to date" in status.stdout


@pytest.mark.slow
def test_report_names_a_missing_arm_and_evaluates_the_rest(quick_repo, tmp_path):
    repo = tmp_path / "partial"
    shutil.copytree(quick_repo, repo, symlinks=True)
    shutil.rmtree(repo / "data/retrain/augment-random-1")
    for stage in ("evaluate", "report"):
        res = run_stage(repo, stage)
        assert res.returncode == 0, res.stderr
    effects = pd.read_parquet(repo / "data/evaluate/effects.parquet")
    assert len(effects) == 14 and not ((effects.arm == "augment-random") & (effects.seed == 1)).any()
    assert json.loads((repo / "metrics/evaluate.json").read_text())["missing_runs"] == 1
    assert "Missing runs (not evaluated, not filled in): augment-random seed 1" in (repo / "reports/report.md").read_text()
    shutil.rmtree(repo / "data/retrain/baseline")
    res = run_stage(repo, "evaluate")
    assert res.returncode == 1 and res.stderr.strip() == (
        "error: data/retrain/baseline: missing; every effect is measured against the baseline run")


@pytest.mark.slow
def test_dvc_exp_run_gives_a_comparable_row_and_mlflow_group(quick_repo, tmp_path):
    repo = tmp_path / "exp"
    shutil.copytree(quick_repo, repo, symlinks=True)
    git = lambda *a: subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *a], cwd=repo,
                                    check=True, capture_output=True)
    git("add", "-A")
    git("commit", "-qm", "quick run")
    res = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-n", "thr60", "-S", "evaluate.threshold=0.6"],
                         cwd=repo, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=repo, capture_output=True,
                           text=True)
    assert res.returncode == 0, shown.stderr
    table = json.loads(shown.stdout)
    exps = [e for row in table for e in (row.get("experiments") or [])]
    names = [e["name"] for e in exps]
    assert names == ["thr60"]
    exp_metrics = exps[0]["revs"][0]["data"]["metrics"]["metrics/evaluate.json"]["data"]
    assert exp_metrics["k"] == json.loads((repo / "metrics/evaluate.json").read_text())["k"]
    tagged = [r for r in mlflow_runs(repo) if r.data.tags.get("dvc_exp") == "thr60"]
    assert {r.data.tags["stage"] for r in tagged} == {"evaluate", "report"}  # only what the change reran
    assert len({r.data.tags["pipeline_id"] for r in tagged}) == 1


def test_corrupt_stream_fails_cleanly(pipeline_repo):
    assert run_stage(pipeline_repo, "corpus").returncode == 0
    part = next((pipeline_repo / "data/corpus/stream").glob("part-*.parquet"))
    part.write_bytes(part.read_bytes()[:100])
    res = run_stage(pipeline_repo, "checkpoints")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [f"error: data/corpus/stream/{part.name}: unreadable "
                                               + res.stderr.split("unreadable ", 1)[1].strip()]
    assert not (pipeline_repo / "data/checkpoints").exists()


def test_missing_checkpoint_file_is_named(tmp_path, tiny_params):
    from mda.errors import MdaError
    from mda.model import neox_config, new_model, save_model

    save_model(new_model(neox_config(tiny_params.model, 50), 0), tmp_path / "step0")
    with pytest.raises(MdaError, match="trainer_state.pt: missing checkpoint file"):
        load_trainer_state(tmp_path / "step0")
    (tmp_path / "step0" / "config.json").unlink()
    with pytest.raises(MdaError, match="step0/config.json: missing checkpoint file"):
        load_model(tmp_path / "step0")
