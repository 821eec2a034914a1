"""End to end: `dvc repro` of the whole DAG on the `quick` preset in a fresh repo copy, then a
partial retrain matrix and a `dvc exp run` ablation on top of it."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mda.core.config import load_params
from mda.model.neox import load_model, load_trainer_state, saved_steps
from tests.conftest import run_stage


def mlflow_runs(repo, parents: bool = False):
    """The stage runs of the repo's store (the default store: the repo root); `parents`: the
    pipelines' parent runs instead."""
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    every = client.search_runs([client.get_experiment_by_name("mda").experiment_id], max_results=5000)
    return [r for r in every if (r.data.tags.get("mda.role") == "pipeline") == parents]


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
                           "retrain", "evaluate", "report", "lds", "smda-task", "smda-instruct", "smda-sae",
                           "smda-policy", "smda-influence", "smda-curate", "smda-sft", "smda-evaluate", "smda-report"}
    assert len(set(stages.values())) == 1, "stages of one dvc repro share a pipeline id"
    assert sum(r.data.tags["stage"] == "retrain" for r in runs) == 8 * 3  # every arm × seed
    assert json.loads((quick_repo / "data/retrain/baseline/meta.json").read_text())["reproduces_original"]
    for arm in ("augment-top", "augment-random-0", "augment-synthetic-2"):  # the placement is on record
        edit = json.loads((quick_repo / f"data/retrain/{arm}/meta.json").read_text())["edit"]
        assert edit["placement"] == edit["augment_placement"] == "in_place"
    effects = pd.read_parquet(quick_repo / "data/evaluate/effects.parquet")
    assert len(effects) == 8 * 3 and set(effects.arm) == {"baseline", "remove-top", "augment-top", "remove-random",
                                                          "remove-matched", "augment-random", "augment-matched",
                                                          "augment-synthetic"}
    tests = pd.read_parquet(quick_repo / "data/evaluate/tests.parquet")
    assert set(tests.arm) == {"remove-top", "augment-top", "augment-synthetic"} and set(tests.test) == {"t"}
    assert set(pd.read_parquet(quick_repo / "data/evaluate/unit_effects.parquet").level) == {"head", "layer", "model"}
    assert (effects[effects.arm == "baseline"].delta_score == 0).all()
    metrics = json.loads((quick_repo / "metrics/evaluate.json").read_text())
    window_samples = json.loads((quick_repo / "data/select/meta.json").read_text())["window_samples"]
    assert metrics["missing_runs"] == 0 and metrics["k"] == round(params.select.fraction * window_samples)
    page = (quick_repo / "reports/report.html").read_text()
    assert page.count("data:image/png;base64,") == 7 and "Answer" in page
    markdown = (quick_repo / "reports/report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(links) == 7 and all((quick_repo / "reports" / link).is_file() for link in links)
    assert sorted(p.name for p in (quick_repo / "reports").iterdir()) == ["figures", "report.html", "report.md", "smda"]
    lds = json.loads((quick_repo / "metrics/lds.json").read_text())  # on in the quick preset, tiny
    assert lds["enabled"] and lds["subsets"] == params.lds.subsets
    assert set(next(iter(lds["lds"].values()))) == {"ekfac", "kfac", "identity"}
    assert sum(r.data.tags["stage"] == "smda-sft" for r in runs) == 4 * 3  # every SMDA set × seed
    smda_page = (quick_repo / "reports/smda/report.html").read_text()
    assert smda_page.count("data:image/png;base64,") == 5
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
def test_mlflow_store_is_one_experiment_of_nested_pipeline_runs(quick_repo):
    """Through MLflow's client: the experiment opens on its runs (its kind tag), one parent run per
    `dvc repro` holding every stage's run and the evaluation's headline numbers and verdicts, and
    each retrain run open for its whole training."""
    client = MlflowClient(f"sqlite:///{quick_repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mda")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # MLflow 3.17's UI ignores that tag: the launcher's address opens the runs as model training
    res = subprocess.run([sys.executable, "-m", "mda.core.mlflow_ui", "--print-url", "--port", "5055"],
                         cwd=quick_repo, capture_output=True, text=True,
                         env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{quick_repo / 'mlflow.db'}"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (f"http://127.0.0.1:5055/#/experiments/{experiment.experiment_id}/runs"
                                  "?workflowType=machine_learning")
    (parent,) = mlflow_runs(quick_repo, parents=True)
    runs = mlflow_runs(quick_repo)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
    assert parent.info.status == "FINISHED" and parent.data.tags["pipeline_id"] == runs[0].data.tags["pipeline_id"]
    assert parent.info.start_time <= min(r.info.start_time for r in runs)
    assert parent.info.end_time >= max(r.info.end_time for r in runs)
    evaluate_run = next(r for r in runs if r.data.tags["stage"] == "evaluate")
    assert parent.data.metrics["k"] == evaluate_run.data.metrics["k"]
    assert {"verdict.remove-top.vs.remove-random", "verdict.remove-top.vs.remove-matched",
            "verdict.icl"} <= set(parent.data.tags)
    assert parent.data.params["select.fraction"] == "0.1"  # the experiment's params, to compare by
    for r in (r for r in runs if r.data.tags["stage"] == "retrain"):
        duration = (r.info.end_time - r.info.start_time) / 1000
        assert duration >= r.data.metrics["train_seconds"] > 0, r.info.run_name
        assert len(client.get_metric_history(r.info.run_id, "target_score")) > 2  # per step: one chart per metric


@pytest.mark.slow
def test_report_names_a_missing_arm_and_evaluates_the_rest(quick_repo, tmp_path):
    repo = tmp_path / "partial"
    shutil.copytree(quick_repo, repo, symlinks=True)
    shutil.rmtree(repo / "data/retrain/augment-random-1")
    for stage in ("evaluate", "report"):
        res = run_stage(repo, stage)
        assert res.returncode == 0, res.stderr
    params = load_params(repo / "params.yaml")
    runs = (len(params.retrain.fixed_arms) + len(params.retrain.random_arms)) * len(params.retrain.seeds)  # baseline incl.
    effects = pd.read_parquet(repo / "data/evaluate/effects.parquet")
    assert len(effects) == runs - 1 and not ((effects.arm == "augment-random") & (effects.seed == 1)).any()
    assert json.loads((repo / "metrics/evaluate.json").read_text())["missing_runs"] == 1
    assert "Missing runs (not evaluated, not filled in): augment-random seed 1" in (repo / "reports/report.md").read_text()
    shutil.rmtree(repo / "data/retrain/baseline")
    res = run_stage(repo, "evaluate")
    assert res.returncode == 1 and res.stderr.strip() == (
        "error: data/retrain/baseline: missing; every effect is measured against the baseline run")


def baseline_emergence(repo, threshold: float) -> float:
    """Mean over probe seeds of the first step at which the baseline's target score reaches
    `threshold` × its window-end value, linearly interpolated — by an explicit loop over
    `data/retrain/baseline/trajectory.parquet`."""
    targets = json.loads((repo / "data/locate/targets.json").read_text())
    heads = {(h["layer"], h["head"]) for h in targets["heads"]}
    end = targets["window"]["end"]
    traj = pd.read_parquet(repo / "data/retrain/baseline/trajectory.parquet")
    traj = traj[[(l, h) in heads for l, h in zip(traj.layer, traj["head"])]]
    steps_of_seeds = []
    for _, g in traj.groupby("seed"):
        curve = g.groupby("step")[targets["metric"]].mean().sort_index()
        steps, scores = curve.index.to_list(), curve.to_list()
        level = threshold * float(np.interp(end, steps, scores))
        crossing = float("nan")
        for i, (step, score) in enumerate(zip(steps, scores)):
            if score >= level:
                crossing = step if i == 0 else \
                    steps[i - 1] + (level - scores[i - 1]) / (score - scores[i - 1]) * (step - steps[i - 1])
                break
        steps_of_seeds.append(crossing)
    return float(np.mean(steps_of_seeds))


@pytest.mark.slow
def test_dvc_exp_run_gives_a_comparable_row_and_mlflow_group(quick_repo, tmp_path):
    repo = tmp_path / "exp"
    shutil.copytree(quick_repo, repo, symlinks=True)
    git = lambda *a: subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *a], cwd=repo,
                                    check=True, capture_output=True)
    git("add", "-A")
    git("commit", "-qm", "quick run")
    # On the quick preset the baseline starts the window above 60 % of its end score (no head forms
    # in 200 steps), so only a threshold near 1 moves its emergence step: 95 % does, 64 → ~105.
    res = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-n", "thr95", "-S", "evaluate.threshold=0.95"],
                         cwd=repo, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=repo, capture_output=True,
                           text=True)
    assert shown.returncode == 0, shown.stderr
    table = json.loads(shown.stdout)
    (commit,) = [row for row in table if row.get("experiments")]
    exps = commit["experiments"]
    assert [e["name"] for e in exps] == ["thr95"]
    exp = exps[0]["revs"][0]["data"]
    assert exp["params"]["params.yaml"]["data"]["evaluate"]["threshold"] == 0.95
    exp_metrics = exp["metrics"]["metrics/evaluate.json"]["data"]
    workspace_metrics = json.loads((quick_repo / "metrics/evaluate.json").read_text())  # the run before the change
    committed = commit["data"]["metrics"]["metrics/evaluate.json"]["data"]  # the row to compare with
    assert committed["baseline"] == workspace_metrics["baseline"] and committed["arms"] == workspace_metrics["arms"]
    # The threshold moves the baseline's emergence step: recomputed here from the baseline's own
    # trajectory (the experiment's, unchanged by it), for both thresholds.
    assert workspace_metrics["baseline"]["emergence_step"] == pytest.approx(baseline_emergence(quick_repo, 0.5))
    assert exp_metrics["baseline"]["emergence_step"] == pytest.approx(baseline_emergence(repo, 0.95))
    assert exp_metrics["baseline"]["emergence_step"] > workspace_metrics["baseline"]["emergence_step"] + 10, \
        "the experiment must change the metric it is compared on"
    assert exp_metrics["k"] == workspace_metrics["k"]  # what the threshold does not touch stays
    tagged = [r for r in mlflow_runs(repo) if r.data.tags.get("dvc_exp") == "thr95"]
    assert {r.data.tags["stage"] for r in tagged} == {"evaluate", "report"}  # only what the change reran
    assert len({r.data.tags["pipeline_id"] for r in tagged}) == 1


@pytest.mark.slow
def test_queued_experiments_run_two_at_a_time_into_one_mlflow_store(quick_repo, tmp_path):
    """`dvc exp run --queue` twice, `dvc queue start -j 2`: both complete, both rows in `dvc exp
    show`, both groups of runs in the repository's one sqlite store, none failed."""
    import time

    repo = tmp_path / "queue"
    shutil.copytree(quick_repo, repo, symlinks=True)
    git = lambda *a: subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *a], cwd=repo,
                                    check=True, capture_output=True)
    git("add", "-A")
    git("commit", "-qm", "quick run")
    dvc = lambda *a: subprocess.run([sys.executable, "-m", "dvc", *a], cwd=repo, capture_output=True, text=True)
    names = {"q70": "0.7", "q80": "0.8"}
    for name, value in names.items():
        res = dvc("exp", "run", "--queue", "-n", name, "-S", f"evaluate.threshold={value}")
        assert res.returncode == 0, res.stderr[-2000:]
    res = dvc("queue", "start", "-j", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    deadline = time.time() + 1800
    while time.time() < deadline:
        status = dvc("queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert status.count("Success") == 2, status
    table = json.loads(dvc("exp", "show", "--json").stdout)
    assert sorted(e["name"] for row in table for e in (row.get("experiments") or [])) == sorted(names)
    runs = mlflow_runs(repo)
    for name in names:
        tagged = [r for r in runs if r.data.tags.get("dvc_exp") == name]
        assert {r.data.tags["stage"] for r in tagged} == {"evaluate", "report"}, name
        assert all(r.info.status == "FINISHED" for r in tagged)
    dvc("queue", "stop", "--kill")


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
    from mda.core.errors import MdaError
    from mda.model.neox import neox_config, new_model, save_model

    save_model(new_model(neox_config(tiny_params.model, 50), 0), tmp_path / "step0")
    with pytest.raises(MdaError, match="trainer_state.pt: missing checkpoint file"):
        load_trainer_state(tmp_path / "step0")
    (tmp_path / "step0" / "config.json").unlink()
    with pytest.raises(MdaError, match="step0/config.json: missing checkpoint file"):
        load_model(tmp_path / "step0")
