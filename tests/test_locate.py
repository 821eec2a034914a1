"""Stage `locate`: trajectories, target choice, window detection, outputs and bad input."""

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from mda.core.config import Locate, parse_params
from mda.core.errors import MdaError
from mda.units.locate import choose_targets, formation_window, scan_checkpoints
from tests.conftest import REPO, TINY, deep_update, run_stage, set_params

STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 1500, 2000, 2500, 3000]


def sigmoid_curve(mid, width, lo=0.02, hi=0.9):
    return lo + (hi - lo) / (1 + np.exp(-(np.array(STEPS) - mid) / width))


def facts(layers=2, heads=2):
    return {"steps": STEPS, "layers": layers, "heads_per_layer": heads,
            "probe": {"uniform_baseline": {"prefix_matching": 0.05, "previous_token": 0.1}}}


def heads_table(curves: dict) -> pd.DataFrame:
    """Long table from {(layer, head): prefix-matching curve}; previous-token flat."""
    rows = []
    for (layer, head), curve in curves.items():
        for step, score in zip(STEPS, curve):
            rows.append({"step": step, "layer": layer, "head": head,
                         "prefix_matching": score, "previous_token": 0.1})
    return pd.DataFrame(rows)


def test_window_brackets_the_rise_with_saved_steps():
    curve = sigmoid_curve(mid=1500, width=200)
    w = formation_window(STEPS, curve, 0.1, 0.9)
    rise = curve.max() - curve[0]
    low, high = curve[0] + 0.1 * rise, curve[0] + 0.9 * rise
    i_lo = next(i for i, s in enumerate(curve) if s >= low)
    i_hi = next(i for i, s in enumerate(curve) if s >= high)
    assert (w["start"], w["end"]) == (STEPS[i_lo - 1], STEPS[i_hi])
    assert STEPS[i_lo - 1] < w["low_step"] <= STEPS[i_lo]
    assert STEPS[i_hi - 1] < w["high_step"] <= STEPS[i_hi]
    assert w["rise"] == pytest.approx(rise)


def test_flat_trajectory_spans_all_steps():
    w = formation_window(STEPS, np.full(len(STEPS), 0.03), 0.1, 0.9)
    assert (w["start"], w["end"], w["rise"]) == (0, 3000, 0.0)


def test_auto_targets_pick_the_largest_rise():
    table = heads_table({(0, 0): sigmoid_curve(500, 100, hi=0.3), (0, 1): np.full(len(STEPS), 0.9),
                         (1, 0): sigmoid_curve(1500, 200), (1, 1): sigmoid_curve(2000, 200, hi=0.5)})
    targets = choose_targets(table, Locate(), facts())
    assert [h["name"] for h in targets["heads"]] == ["L1H0"]  # L0H1 is high but never rose
    assert targets["influence_step"] == targets["window"]["end"]
    assert targets["window"]["start"] < 1500 < targets["window"]["end"]
    assert targets["formed"] is True and "auto" in targets["head_rule"]
    two = choose_targets(table, Locate(auto_count=2, influence_step="start"), facts())
    assert [h["name"] for h in two["heads"]] == ["L1H0", "L1H1"]
    assert two["influence_step"] == two["window"]["start"]


def test_explicit_targets_and_window():
    table = heads_table({(0, 0): sigmoid_curve(500, 100), (0, 1): sigmoid_curve(1000, 100),
                         (1, 0): sigmoid_curve(1500, 200), (1, 1): sigmoid_curve(2000, 200)})
    targets = choose_targets(table, Locate(heads=[[0, 1]], window=[512, 2000], influence_step=1500), facts())
    assert [h["name"] for h in targets["heads"]] == ["L0H1"]
    assert (targets["window"]["start"], targets["window"]["end"], targets["influence_step"]) == (512, 2000, 1500)
    assert "explicit" in targets["window"]["rule"] and "explicit" in targets["head_rule"]


@pytest.mark.parametrize("locate, message", [
    (Locate(heads=[[2, 0]]), r"locate.heads: L2H0 does not exist in the model \(2 layers × 2 heads\)"),
    (Locate(heads=[[0, 5]]), r"L0H5 does not exist"),
    (Locate(window=[100, 1000]), r"locate.window: step 100 is not a saved checkpoint"),
    (Locate(influence_step=7), r"locate.influence_step: step 7 is not a saved checkpoint"),
])
def test_bad_targets_are_named(locate, message):
    table = heads_table({(l, h): sigmoid_curve(1000, 100) for l in range(2) for h in range(2)})
    with pytest.raises(MdaError, match=message):
        choose_targets(table, locate, facts())


def test_window_order_is_checked_by_the_schema():
    from mda.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"locate: window start 1000 must be before its end 500"):
        parse_params({"locate": {"window": [1000, 500]}})


# ----------------------------------------------------------------------------- the stage
@pytest.mark.slow
def test_locate_stage_outputs(trained_repo):
    res = run_stage(trained_repo, "locate")
    assert res.returncode == 0, res.stderr
    out = trained_repo / "data/locate"
    heads = pd.read_parquet(out / "heads.parquet")
    steps = [0, 1, 2, 4, 8, 12]
    assert sorted(heads.step.unique()) == steps
    assert len(heads) == len(steps) * 2 * 2  # checkpoints × layers × heads
    assert {"prefix_matching", "previous_token", "duplicate_token", "copying",
            "induction_logprob_ablated", "induction_logprob_drop"} <= set(heads.columns)
    assert heads[["prefix_matching", "previous_token", "duplicate_token"]].stack().between(0, 1).all()
    assert heads.copying.between(-1, 1).all()
    meta = json.loads(pq.read_schema(out / "heads.parquet").metadata[b"mda.metric_versions"])
    assert meta["copying"] == "ov-eig-v1"
    model = pd.read_parquet(out / "model.parquet")
    assert list(model.step) == steps and np.isfinite(model[["heldout_loss", "icl_score"]]).all().all()
    targets = json.loads((out / "targets.json").read_text())
    assert targets["icl"] == {**targets["icl"], "context": 32, "late_index": 31, "early_index": 3}
    assert targets["window"]["start"] in steps and targets["influence_step"] == targets["window"]["end"]
    for png in ("head_trajectories.png", "heads_final.png", "icl_vs_target.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((trained_repo / "metrics/locate.json").read_text())
    assert metrics["targets"] == [h["name"] for h in targets["heads"]]
    curve = pd.read_csv(trained_repo / "plots/locate_target.csv")
    assert list(curve.columns) == ["step", "target_score", "icl_score", "heldout_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ({"locate": {"heads": [[7, 0]]}}, "error: locate.heads: L7H0 does not exist in the model (2 layers × 2 heads)"),
    ({"locate": {"window": [0, 5]}}, "error: locate.window: step 5 is not a saved checkpoint (saved: 0, 1, 2, 4, 8, 12)"),
])
def test_locate_bad_input_one_line_no_outputs(trained_repo, override, message):
    shutil.rmtree(trained_repo / "data/locate", ignore_errors=True)
    before = set_params(trained_repo, override)
    try:
        res = run_stage(trained_repo, "locate")
    finally:
        (trained_repo / "params.yaml").write_text(yaml.safe_dump(before))
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [message]
    assert not (trained_repo / "data/locate").exists()


@pytest.mark.slow
def test_locate_without_checkpoints_names_the_folder(trained_repo, tmp_path):
    empty = tmp_path / "ckpts"
    empty.mkdir()
    with pytest.raises(MdaError, match=r"ckpts: no step<N> checkpoint folders"):
        scan_checkpoints(parse_params(deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)),
                         empty, trained_repo / "data/corpus")


# ----------------------------------------------------------------------------- hub checkpoints
def loop_scores(attention: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    """Previous-token and prefix-matching scores of one head's (batch, q, k) attention, by
    explicit loops: per sequence, the attention mass on the targets over the mass of the query
    rows that have a target (t − 1; the position after each earlier copy of token t), averaged
    over sequences."""
    prev, prefix = [], []
    for a, row in zip(attention.double(), tokens.tolist()):
        hit = total = 0.0
        for t in range(1, len(row)):
            hit, total = hit + a[t, t - 1].item(), total + a[t, :t + 1].sum().item()
        prev.append(hit / total)
        hit = total = 0.0
        for t in range(len(row)):
            keys = {j + 1 for j in range(t) if row[j] == row[t]}
            if keys:
                hit, total = hit + sum(a[t, k].item() for k in keys), total + a[t, :t + 1].sum().item()
        prefix.append(hit / total)
    return {"previous_token": float(np.mean(prev)), "prefix_matching": float(np.mean(prefix))}


def test_locate_runs_on_hub_downloaded_checkpoints(tmp_path, cache, tiny_params):
    """Pythia revisions fetched from a (local, fake) hub cache are scanned like local ones: every
    row of the heads table holds the metrics of that head of that revision's hub model."""
    from mda.core.config import HubModel
    from mda.units.probes import probe_tokens
    from mda.model.neox import download_hub_checkpoints

    cache_dir, hub_models = cache
    download_hub_checkpoints(HubModel(revisions=[0, 1], cache_dir=str(cache_dir), local_files_only=True),
                             tmp_path / "ckpts")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = np.random.default_rng(0).integers(1, 50, (8, 17)).astype(np.int32)
    pq.write_table(pa.table({"domain": ["pile"] * 8, "input_ids": list(rows)}), corpus / "heldout.parquet")
    heads, models, facts_ = scan_checkpoints(tiny_params, tmp_path / "ckpts", corpus, vocab_size=50)
    assert sorted(heads.step.unique()) == [0, 1] and len(heads) == 2 * 2 * 2
    assert facts_["icl"]["context"] == 16 and list(models.step) == [0, 1]

    expected = {}
    for step, model in hub_models.items():
        model.config._attn_implementation = "eager"
        tokens = probe_tokens(tiny_params.locate.probe, model.config, 50)
        with torch.no_grad():
            attentions = model.eval()(input_ids=tokens, output_attentions=True).attentions
        for layer in range(2):
            for head in range(2):
                expected[step, layer, head] = loop_scores(attentions[layer][:, head], tokens)
    for row in heads.itertuples():
        want = expected[row.step, row.layer, row.head]
        assert (row.previous_token, row.prefix_matching) == pytest.approx(
            (want["previous_token"], want["prefix_matching"]), abs=1e-6), (row.step, row.layer, row.head)
    # The eight (step, head) pairs are far apart, so a wrong head or revision could not pass.
    values = sorted(v["prefix_matching"] for v in expected.values())
    assert min(np.diff(values)) > 1e-3
    # The target is the head whose prefix-matching score rose most from revision 0.
    rise = {(l, h): max(expected[0, l, h]["prefix_matching"], expected[1, l, h]["prefix_matching"])
            - expected[0, l, h]["prefix_matching"] for l in range(2) for h in range(2)}
    layer, head = max(rise, key=rise.get)
    assert rise[layer, head] > 0 and sorted(rise.values())[-2] < rise[layer, head] - 1e-3
    assert [h["name"] for h in choose_targets(heads, tiny_params.locate, facts_)["heads"]] == [f"L{layer}H{head}"]
