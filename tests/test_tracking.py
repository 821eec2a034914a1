import mlflow
from mlflow.tracking import MlflowClient

from mda import tracking


def test_stage_run_logs_params_tags_metrics(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MDA_PIPELINE_ID", "pipe-123")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    monkeypatch.chdir(tmp_path)
    with tracking.stage_run("corpus", {"corpus": {"seed": 3, "synthetic": {"repeat_rate": 0.1}}}) as run:
        mlflow.log_metric("rows", 12)
    client = MlflowClient(uri)
    got = client.get_run(run.info.run_id)
    assert got.data.params == {"corpus.seed": "3", "corpus.synthetic.repeat_rate": "0.1"}
    assert got.data.metrics == {"rows": 12.0}
    assert got.data.tags["stage"] == "corpus"
    assert got.data.tags["pipeline_id"] == "pipe-123"
    assert got.data.tags["dvc_exp"] == "exp-a"
    assert "git_commit" in got.data.tags
    assert (tmp_path / "mlflow.db").is_file()


def test_default_store_is_sqlite_at_dvc_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
