import os
import signal
import subprocess
import sys
import textwrap

from mlflow.tracking import MlflowClient

from mda.core import tracking
from tests.conftest import REPO


def test_stage_run_logs_params_tags_metrics(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MDA_PIPELINE_ID", "pipe-123")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    monkeypatch.chdir(tmp_path)
    with tracking.stage_run("corpus", {"corpus": {"seed": 3, "synthetic": {"repeat_rate": 0.1}}}) as run:
        run.log_metric("rows", 12)
        for step in range(3):
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    client = MlflowClient(uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params == {"corpus.seed": "3", "corpus.synthetic.repeat_rate": "0.1"}
    peak = got.data.metrics.pop("peak_rss_gib")  # every stage run records its process's peak RSS
    assert 0 < peak < 64
    assert got.data.metrics == {"rows": 12.0, "loss": 1 / 3}
    assert [m.step for m in client.get_metric_history(run.run_id, "loss")] == [0, 1, 2]
    assert got.data.tags["stage"] == "corpus"
    assert got.data.tags["pipeline_id"] == "pipe-123"
    assert got.data.tags["dvc_exp"] == "exp-a"
    assert "git_commit" in got.data.tags
    assert (tmp_path / "mlflow.db").is_file()


def test_a_failing_stage_ends_its_run_failed(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        with tracking.stage_run("select", {}) as run:
            raise ValueError("boom")
    except ValueError:
        pass
    assert MlflowClient(uri).get_run(run.run_id).info.status == "FAILED"


def test_default_store_is_sqlite_at_dvc_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    from mda.core.provenance import tracking_uri

    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"


WRITER = textwrap.dedent("""
    import sys, time
    from mda.core import tracking
    start = float(sys.argv[2])
    while time.time() < start:  # all writers open the store at the same moment
        time.sleep(0.001)
    for i in range(int(sys.argv[3])):
        with tracking.stage_run("retrain", {"retrain": {"writer": sys.argv[1], "i": i}},
                                run_name=f"w{sys.argv[1]}-{i}") as run:
            for step in range(20):
                run.log_metrics({"loss": step}, step=step)
            run.set_tag("writer", sys.argv[1])
""")


def test_parallel_stages_on_a_new_store_lose_no_run(tmp_path):
    """Four processes open a store that does not exist yet at the same moment (MLflow's schema
    migration races without the lock) and each logs 15 runs: all 60 land and the store reads."""
    import time

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    start = time.time() + 8  # after the imports of all four
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(w), str(start), "15"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(4)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), [err[-2000:] for _, err in results]
    client = MlflowClient(uri)
    every = client.search_runs([client.get_experiment_by_name("mda").experiment_id], max_results=1000)
    parents = [r for r in every if r.data.tags.get("mda.role") == "pipeline"]
    runs = [r for r in every if r.data.tags.get("mda.role") != "pipeline"]
    assert len(runs) == 60 and all(r.info.status == "FINISHED" for r in runs)
    # outside DVC each process is its own pipeline: one parent each, its 15 runs nested under it
    assert len(parents) == 4 and all(p.info.status == "FINISHED" for p in parents)
    children = {p.info.run_id: sum(r.data.tags["mlflow.parentRunId"] == p.info.run_id for r in runs) for p in parents}
    assert sorted(children.values()) == [15] * 4
    assert sorted(r.data.tags["writer"] for r in runs) == sorted(str(w) for w in range(4) for _ in range(15))
    assert all(len(client.get_metric_history(r.info.run_id, "loss")) == 20 for r in runs[:8])


def test_a_killed_stage_run_is_marked_failed_by_the_next(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    hang = textwrap.dedent("""
        import time
        from mda.core import tracking
        with tracking.stage_run("checkpoints", {}) as run:
            print(run.run_id, flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", hang], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody could close it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with tracking.stage_run("checkpoints", {}) as rerun:
        pass
    killed = client.get_run(run_id)
    assert killed.info.status == "FAILED" and killed.data.tags["mda.killed"] == "true"
    assert client.get_run(rerun.run_id).info.status == "FINISHED"


def test_ui_launcher_names_a_missing_store_in_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mda.core.mlflow_ui", "--print-url"], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'none.db'}"})
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip() == f"error: {tmp_path / 'none.db'}: no MLflow store yet; run a stage first (e.g. dvc repro)"
    assert not (tmp_path / "none.db").exists()


def test_ui_launcher_prints_the_runs_table_of_the_mda_experiment(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = tracking.Store(uri)
    experiment_id = store.experiment_id()
    res = subprocess.run([sys.executable, "-m", "mda.core.mlflow_ui", "--print-url", "--port", "5123"], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"http://127.0.0.1:5123/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
