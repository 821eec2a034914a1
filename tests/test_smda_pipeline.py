"""The SMDA stages end to end on a tiny config: the whole chain (in-process, seconds), the same
bytes on rerun, the encoder the attribution uses, and bad inputs (one line, exit ≠ 0, nothing
partial left behind) through the real stage entry points."""

import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mda.core.config import load_params
from tests.conftest import deep_update, run_stage

SMDA_TINY = {"smda": {
    "task": {"prompt_words": 4, "instruct_pairs": 32, "sft_pairs": 16, "sae_prompts": 24, "policy_prompts": 20,
             "eval_prompts": 8},
    "instruct": {"epochs": 1, "batch_size": 8},
    "sae": {"width": 32, "k": 4, "steps": 30, "batch_size": 64, "aux_k": 4},
    "policy": {"feature_threshold": 0.0, "generate_tokens": 2},
    "curate": {"rule": "oriented", "random_draws": 20},  # the median rule removes a whole class here
    "sft": {"epochs": 1, "batch_size": 8, "sets": ["full", "curated", "random", "oracle", "curated-within_class", "random-within_class"]},
    # within_class removes fewer than half of each class, so both classes stay on any CPU; sign can remove a
    # whole class of 8 (it did on one CI machine)
    "evaluate": {"generate_tokens": 2},
}}
CHAIN = ["smda_task", "smda_instruct", "smda_sae", "smda_policy", "smda_influence", "smda_curate"]


def set_params(repo: Path, override: dict) -> None:
    path = repo / "params.yaml"
    path.write_text(yaml.safe_dump(deep_update(yaml.safe_load(path.read_text()), override)))


def run_in_process(repo: Path, stage: str, *args: str) -> None:
    """A stage's `main` in this process (as `python -m stages.<stage>` would run it in `repo`)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(repo)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
        mp.setattr(sys, "argv", [stage, *args])
        importlib.import_module(f"stages.{stage}").main(load_params(repo / "params.yaml"))


@pytest.fixture(scope="module")
def smda_repo(trained_repo):
    """The tiny repo after every SMDA stage (6 SFT sets × 3 seeds)."""
    set_params(trained_repo, SMDA_TINY)
    params = load_params(trained_repo / "params.yaml")
    for stage in CHAIN:
        run_in_process(trained_repo, stage)
    for set_name in params.smda.sft.sets:
        for seed in params.smda.sft.seeds:
            run_in_process(trained_repo, "smda_sft", set_name, str(seed))
    for stage in ("smda_evaluate", "smda_report"):
        run_in_process(trained_repo, stage)
    return trained_repo


@pytest.fixture
def copy_of(smda_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(smda_repo, repo, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db*", "mlartifacts"))
    return repo


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_the_chain_runs_and_checks_itself(smda_repo):
    data = smda_repo / "data/smda"
    influence = json.loads((data / "influence/meta.json").read_text())
    assert influence["restored_bit_for_bit"] is True
    assert influence["x0_max_abs_diff"] == 0.0 and influence["y0_max_abs_diff"] == 0.0
    sae = json.loads((data / "sae/metrics.json").read_text())
    for where in ("heldout_every_position", "heldout_last_token"):
        assert 0.0 <= sae[where]["dead_share"] <= 1.0 and sae[where]["explained_variance"] <= 1.0
    curate = json.loads((data / "curate/summary.json").read_text())
    from mda.smda.curate import RULES, removal_rule

    assert curate["has_truth"] and set(curate["truth"]) == set(RULES) == set(curate["per_rule"])
    import pandas as pd

    runs = pd.read_parquet(data / "evaluate/runs.parquet")
    sets = ("full", "curated", "random", "oracle", "curated-within_class", "random-within_class")
    assert sorted(zip(runs.set, runs.seed)) == sorted((s, k) for s in sets for k in (0, 1, 2))
    # a rule's own sets: exactly the pairs its rule removes, and random ones of the same size per class
    scores = pd.read_parquet(data / "influence/scores.parquet")
    removed = pd.read_parquet(data / "curate/removed.parquet")
    within = set(scores.pair_id[removal_rule(scores, "within_class")])
    assert set(removed[removed.set == "curated-within_class"].pair_id) == within
    assert (runs[runs.set == "curated-within_class"].pairs == 16 - len(within)).all()
    assert (runs[runs.set == "random-within_class"].pairs == 16 - len(within)).all()
    hyp = pd.read_parquet(data / "evaluate/hypothesis.parquet")
    assert {"curated-within_class ≥ full", "full > random-within_class", "curated ≥ full", "oracle ≥ full"} <= set(hyp.comparison)
    assert (runs[runs.set == "full"].pairs == 16).all() and (runs[runs.set == "oracle"].pairs < 16).all()
    assert runs[runs.set == "curated"].pairs.iloc[0] == 16 - curate["removed"]
    page = (smda_repo / "reports/smda/report.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and "Curation vs ground truth" in page
    for name in ("smda_sae", "smda_policy", "smda_curate", "smda_evaluate"):
        assert json.loads((smda_repo / f"metrics/{name}.json").read_text())


@pytest.mark.slow
def test_policy_features_come_from_the_trained_encoder(smda_repo):
    """X = TopK encoder of the stored weights (read here with safetensors, encoded by an explicit
    numpy loop) applied to the instruct model's residual stream."""
    from safetensors.numpy import load_file

    from mda.smda import pipeline
    from mda.smda.lm import encode_prompt, hidden_and_logprob
    from mda.smda.task import read_task

    params = load_params(smda_repo / "params.yaml")
    w = load_file(smda_repo / "data/smda/sae/sae_weights.safetensors")
    k = json.loads((smda_repo / "data/smda/sae/cfg.json").read_text())["k"]
    arrays = load_file(smda_repo / "data/smda/policy/arrays.safetensors")
    lm = pipeline.load_lm(params, smda_repo / "data/smda/instruct")
    _, prompts = read_task(smda_repo / "data/smda/task")
    text = prompts.set_index("prompt_id").prompt
    ids = [encode_prompt(lm, text[i]) for i in arrays["train_prompt_ids"]]
    h, _ = hidden_and_logprob(lm, ids, pipeline.prefixes(params, lm), params.smda.sae.layer)
    x = []
    for vec in h.numpy():
        pre = (vec - w["b_dec"].astype(np.float64)) @ w["W_enc"].astype(np.float64) + w["b_enc"].astype(np.float64)
        z = np.zeros_like(pre)
        top = np.argsort(-pre, kind="stable")[:k]
        z[top] = np.maximum(pre[top], 0)
        x.append(z[arrays["features"]])
    np.testing.assert_allclose(np.array(x), arrays["X_train"], rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_rerun_writes_the_same_bytes(copy_of):
    for stage in ("smda_sae", "smda_influence"):
        out = copy_of / "data/smda" / stage.removeprefix("smda_")
        before = files_of(out)
        res = run_stage(copy_of, stage)
        assert res.returncode == 0, res.stderr
        assert files_of(out) == before, stage


def assert_clean_failure(res, code: int, line: str, absent: Path) -> None:
    assert res.returncode == code, res.stderr
    assert res.stderr.strip().splitlines()[-1:] == [line]
    assert len([l for l in res.stderr.splitlines() if l.startswith("error:")]) == 1
    assert not absent.exists()


@pytest.mark.slow
def test_sae_width_mismatch_is_one_line(copy_of):
    from mda.smda.sae import Sae, save_sae

    shutil.rmtree(copy_of / "data/smda/sae")
    (copy_of / "data/smda/sae").mkdir()
    z = lambda *s: torch.zeros(*s)
    save_sae(Sae(z(16, 8), z(8), z(8, 16), z(16), "topk", 2), copy_of / "data/smda/sae", hook_layer=1, model_name="x")
    shutil.rmtree(copy_of / "data/smda/policy")
    res = run_stage(copy_of, "smda_policy")
    assert_clean_failure(res, 1, "error: data/smda/sae/cfg.json: d_in 16 does not match the hidden size 32 of the "
                                 "model's block 1 (params smda.sae.layer)", copy_of / "data/smda/policy")


@pytest.mark.slow
def test_feature_threshold_keeping_nothing_is_one_line(copy_of):
    set_params(copy_of, {"smda": {"policy": {"feature_threshold": 1e9}}})
    shutil.rmtree(copy_of / "data/smda/policy")
    res = run_stage(copy_of, "smda_policy")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith(
        "error: params: smda.policy.feature_threshold: 1000000000.0 keeps no SAE latent (largest |mean difference| is ")
    assert not (copy_of / "data/smda/policy").exists()


@pytest.mark.slow
def test_refusal_prefix_the_tokenizer_cannot_encode_is_one_line(copy_of):
    set_params(copy_of, {"smda": {"task": {"refusal_prefixes": ["raise False", "I cannot"]}}})
    shutil.rmtree(copy_of / "data/smda/task")
    res = run_stage(copy_of, "smda_task")
    assert_clean_failure(res, 2, "error: params: smda.task.refusal_prefixes: 'I cannot' cannot be encoded by the "
                                 "tokenizer (unknown token)", copy_of / "data/smda/task")


@pytest.mark.slow
def test_sft_set_without_one_class_is_one_line(copy_of):
    sft = copy_of / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"head : kroth {i} ? \u21b5", "response": "raise False .",
                                       "harmful": True}) + "\n" for i in range(4)))
    prompts = copy_of / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"head : sais {i} ? \u21b5", "harmful": i % 2 == 0}) + "\n"
                               for i in range(40)))
    set_params(copy_of, {"smda": {"task": {"source": "files", "files": {"sft": "sft.jsonl", "prompts": "prompts.jsonl"}},
                                  "instruct": {"epochs": 0}}})
    shutil.rmtree(copy_of / "data/smda/task")
    res = run_stage(copy_of, "smda_task")
    assert_clean_failure(res, 1, "error: sft.jsonl: the SFT set has no harmless pair (column harmful); SMDA needs "
                                 "both classes", copy_of / "data/smda/task")


@pytest.mark.slow
def test_curated_set_without_one_class_stops_the_sft_run(copy_of):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = copy_of / "data/smda/curate/removed.parquet"
    pairs = pd.read_parquet(copy_of / "data/smda/task/pairs.parquet")
    harmless = pairs[(pairs.set == "sft") & ~pairs.harmful].pair_id
    rule = json.loads(path.with_name("summary.json").read_text())["rule"]  # `curated` is that rule's set
    pq.write_table(pa.Table.from_pandas(pd.DataFrame({"set": f"curated-{rule}", "seed": -1, "pair_id": harmless}),
                                        preserve_index=False), path)
    shutil.rmtree(copy_of / "data/smda/sft/curated-0")
    res = run_stage(copy_of, "smda_sft", args=["curated", "0"])
    assert_clean_failure(res, 1, "error: data/smda/curate/removed.parquet: the curated set (seed 0) has no harmless "
                                 "pair (column harmful); SMDA needs both classes", copy_of / "data/smda/sft/curated-0")


@pytest.mark.slow
def test_rules_table_reads_the_stages_metrics(smda_repo, tmp_path):
    """`python -m mda.smda.rules_table` on a results folder holding what the stages wrote."""
    from mda.smda.rules_table import main

    folder = tmp_path / "task-seed-0"
    (folder / "metrics").mkdir(parents=True)
    shutil.copy(smda_repo / "params.yaml", folder / "params.yaml")
    for name in ("smda_curate", "smda_evaluate"):
        shutil.copy(smda_repo / f"metrics/{name}.json", folder / f"metrics/{name}.json")
    out = tmp_path / "table.md"
    main(["--dirs", str(folder), "--out", str(out), "--json", str(tmp_path / "rows.json")])
    rows = {r["rule"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    curate = json.loads((smda_repo / "data/smda/curate/summary.json").read_text())
    assert set(rows) == set(curate["per_rule"])
    assert rows["within_class"]["trained"] and not rows["sign"]["trained"]  # only within_class's sets were trained
    # the configured rule (`oriented` here) was trained as the plain `curated` / `random` sets
    hyp = __import__("pandas").read_parquet(smda_repo / "data/smda/evaluate/hypothesis.parquet")
    plain = hyp[(hyp.comparison == "curated ≥ full") & (hyp.metric == "soft_f1")].iloc[0]
    assert rows["oriented"]["trained"]
    assert rows["oriented"]["curated_minus_full_soft_f1"]["mean"] == pytest.approx(plain.mean_difference)
    assert rows["within_class"]["precision"] == curate["truth"]["within_class"]["precision"]
    soft = hyp[(hyp.comparison == "curated-within_class ≥ full") & (hyp.metric == "soft_f1")].iloc[0]
    assert rows["within_class"]["curated_minus_full_soft_f1"]["mean"] == pytest.approx(soft.mean_difference)
    text = out.read_text()
    assert "| 0 | `within_class` † |" in text and "`median`:" in text
