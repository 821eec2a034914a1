"""End to end: `dvc repro` of the implemented stages on tiny params, in a fresh repo copy."""

import json
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from mda.model import load_model, load_trainer_state, saved_steps
from tests.conftest import run_stage


@pytest.mark.slow
def test_dvc_repro_tiny(pipeline_repo):
    env_uri = f"sqlite:///{pipeline_repo / 'mlflow.db'}"  # the default store: the repo root
    res = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=pipeline_repo,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    meta = json.loads((pipeline_repo / "data/corpus/meta.json").read_text())
    assert meta["rows"] == 48 and meta["source"] == "synthetic"
    ckpts = pipeline_repo / "data/checkpoints"
    assert saved_steps(ckpts) == [0, 1, 2, 4, 8, 12]
    load_model(ckpts / "step8")
    assert load_trainer_state(ckpts / "step8")["next_step"] == 8
    metrics = json.loads((pipeline_repo / "metrics/checkpoints.json").read_text())
    assert metrics["checkpoints"] == 6
    runs = MlflowClient(env_uri).search_runs(
        [MlflowClient(env_uri).get_experiment_by_name("mda").experiment_id])
    stages = {r.data.tags["stage"]: r.data.tags["pipeline_id"] for r in runs}
    assert sum(r.data.tags["stage"] == "retrain" for r in runs) == 5 * 3  # every arm × seed
    assert set(stages) == {"corpus", "checkpoints", "locate", "factors", "gradients", "scores",
                           "select", "retrain"}
    arms = sorted(p.name for p in (pipeline_repo / "data/retrain").iterdir())
    assert arms == ["augment-random-0", "augment-random-1", "augment-random-2", "augment-top", "baseline",
                    "remove-random-0", "remove-random-1", "remove-random-2", "remove-top"]
    assert json.loads((pipeline_repo / "data/retrain/baseline/meta.json").read_text())["reproduces_original"]
    targets = json.loads((pipeline_repo / "data/locate/targets.json").read_text())
    assert targets["influence_step"] in [0, 1, 2, 4, 8, 12]
    assert len(set(stages.values())) == 1, "stages of one dvc repro share a pipeline id"
    # Nothing left to do: outputs are tracked and up to date.
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=pipeline_repo,
                            capture_output=True, text=True)
    assert "up to date" in status.stdout


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
