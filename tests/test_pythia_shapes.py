"""The Pythia presets are complete params files, and the stages run at Pythia-14M's true shapes:
a randomly initialised model with its exact config (6 layers, d = 128, 4 heads, vocabulary
50,304, rotary 25 %, 2,048 context) on a Megatron `.bin/.idx` fixture of 2,049-token rows,
through corpus → checkpoints → locate → factors → gradients → scores → select → a few
retrain steps (the full-vocabulary logits of a batch exceed `mda.model.losses.LOGIT_BUDGET`, so every
loss runs chunked)."""

import json
import resource
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from mda.core.config import parse_params
from tests.conftest import REPO, deep_update, make_pipeline_repo, run_stage

PRESETS = ["pythia-14m-prevtoken", "pythia-160m-induction", "pythia-14m-pretrain"]


def preset(name: str) -> dict:
    return yaml.safe_load((REPO / "presets" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", PRESETS)
def test_pythia_presets_are_complete_and_need_a_data_path(name, tmp_path):
    params = preset(name)
    header = (REPO / "presets" / f"{name}.yaml").read_text().split("\n\n")[0]
    for word in ("Reproduces" if name != "pythia-14m-pretrain" else "faithful", "Needs:", "streaming", "GPU"):
        assert word in header, word
    assert params["corpus"]["source"] == "pythia" and params["compute"]["dtype"] == "bfloat16"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = subprocess.run([sys.executable, "-m", "stages.corpus"], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: params.yaml: corpus: corpus.pythia.path is required when source is 'pythia'"]
    assert not (tmp_path / "data").exists()
    params["corpus"]["pythia"]["path"] = "/data/pile"
    parse_params(params)


@pytest.mark.slow
def test_stages_run_at_pythia_14m_shapes(tmp_path):
    from mda.data.pythia import write_megatron

    p14 = preset("pythia-14m-pretrain")
    rng = np.random.default_rng(0)
    write_megatron(tmp_path / "pile", rng.integers(2, 50277, size=(24, 2049)), dtype=np.uint16)
    params = deep_update(p14, {
        "compute": {"device": "cpu", "dtype": "float32", "micro_batch": 1, "threads": 2},
        "corpus": {"steps": 6, "batch_size": 2, "heldout_rows": 2, "pythia": {"path": str(tmp_path / "pile")}},
        "model": {"source": "pretrain", "hub": {"local_files_only": True}},
        "pretrain": {"init": "scratch", "warmup_steps": 2, "total_steps": None, "save_every": 2,
                     "probe": {"sequences": 2, "half_len": 32}},
        "locate": {"heads": [[2, 2]], "window": [2, 4], "influence_step": 4, "heldout_rows": 2, "max_sequences": 2,
                   "probe": {"sequences": 2, "half_len": 32}},
        "influence": {"probe_sequences": 2, "factor_samples": 2, "batch_size": 1, "mode": "cached",
                      "shard_samples": 2},
        "select": {"fraction": 0.5, "count": None},
        "retrain": {"fixed_arms": ["baseline", "remove-top"], "random_arms": ["remove-random"], "seeds": [0],
                    "eval_every": 1, "fresh_optimizer": False},
    })
    repo = make_pipeline_repo(tmp_path / "repo", params)
    peak = {}
    for stage, args in [("corpus", []), ("checkpoints", []), ("locate", []), ("factors", []), ("gradients", []),
                        ("scores", []), ("select", []), ("retrain", ["baseline"]), ("retrain", ["remove-top"])]:
        res = run_stage(repo, stage, args=args)
        assert res.returncode == 0, (stage, res.stderr[-3000:])
        peak[stage] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    print("\n[pythia-14m shapes] peak RSS so far per stage (GiB):", {k: round(v, 2) for k, v in peak.items()})
    from transformers import AutoConfig

    from mda.model.neox import rotary_fraction

    config = AutoConfig.from_pretrained(repo / "data/checkpoints/step6")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size,
            config.vocab_size, rotary_fraction(config), config.max_position_embeddings) == (6, 128, 4, 512, 50304, 0.25, 2048)
    scores = pd.read_parquet(repo / "data/scores/scores.parquet")
    assert len(scores) == 4 and np.isfinite(scores.score).all() and scores.step.between(2, 3).all()
    manifest = json.loads((repo / "data/gradients/manifest.json").read_text())
    assert manifest["shapes"]["L2H2/qk"] == [64, 128]
    assert json.loads((repo / "data/retrain/baseline/meta.json").read_text())["reproduces_original"]
    trajectory = pd.read_parquet(repo / "data/retrain/remove-top/trajectory.parquet")
    assert sorted(trajectory.step.unique()) == [2, 3, 4] and len(trajectory[trajectory.step == 4]) == 24
