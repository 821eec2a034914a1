"""The LDS stage (`mda.evaluate.lds`, `stages/lds.py`) and the preconditioners it compares
(`mda.attribute.preconditioners`): each piece against an independent computation, then the stage
end to end on the tiny pipeline (resumable, identity-checked, off by default)."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from mda.attribute.ekfac import BlockFactors
from mda.attribute.preconditioners import Identity, kfac, preconditioners
from mda.evaluate.lds import bootstrap_indices, lds, predicted_change, spearman_rows, subset_ids
from tests.conftest import run_stage, set_params


# ----------------------------------------------------------------------------- predictions
def test_predicted_change_is_minus_the_sum_of_the_removed_samples_scores():
    scores = pd.Series({10: 0.5, 11: -2.0, 12: 3.25, 13: 0.125, 14: -0.75}).sample(frac=1, random_state=0)
    subsets = {0: np.array([10, 12]), 1: np.array([11, 13, 14]), 2: np.array([14])}
    # By hand: removing a sample undoes its step, so f moves by minus its score.
    expected = {0: -(0.5 + 3.25), 1: -(-2.0 + 0.125 - 0.75), 2: 0.75}
    got = predicted_change(scores, subsets)
    assert got.to_dict() == pytest.approx(expected, rel=0, abs=1e-15)


def test_a_subset_with_an_unscored_sample_is_an_error():
    from mda.core.errors import MdaError

    with pytest.raises(MdaError, match="subset 0 holds samples without a score"):
        predicted_change(pd.Series({1: 1.0, 2: 2.0}), {0: np.array([1, 3])})


def test_subsets_are_seeded_halves_that_do_not_depend_on_how_many_are_drawn():
    ids = np.arange(100, 300)
    first = [subset_ids(ids, 0.5, 7, m) for m in range(3)]
    assert all(len(s) == 100 and len(set(s)) == 100 and set(s) <= set(ids) and (np.diff(s) > 0).all() for s in first)
    assert not np.array_equal(first[0], first[1])
    assert all(np.array_equal(a, subset_ids(ids, 0.5, 7, m)) for m, a in enumerate(first))
    assert not np.array_equal(first[0], subset_ids(ids, 0.5, 8, 0))


# ----------------------------------------------------------------------------- preconditioners
def spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    return x @ x.T / (3 * n) + 0.05 * torch.eye(n, dtype=torch.float64)


def tiny_block(eigenvalues=None):
    a, s = spd(4, 0), spd(3, 1)  # activation (in × in), gradient (out × out) covariances
    q_a, q_s = torch.linalg.eigh(a).eigenvectors, torch.linalg.eigh(s).eigenvectors
    lam = eigenvalues if eigenvalues is not None else torch.rand(3, 4, dtype=torch.float64) + 0.1
    return BlockFactors(a, s, q_a, q_s, lam, damping=0.1 * lam.mean().item(), meta={"alpha": 0.1})


def test_kfac_preconditioner_is_the_damped_inverse_of_the_explicit_kronecker_product():
    factors = tiny_block()
    a, s = factors.activation_covariance, factors.gradient_covariance
    explicit = torch.kron(s, a)  # acts on row-major vec(G) of an (out, in) block: S G A
    damping = 0.1 * torch.linalg.eigvalsh(explicit).mean().item()  # α · mean of the product's eigenvalues
    v = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = torch.linalg.solve(explicit + damping * torch.eye(12, dtype=torch.float64), v.flatten())
    k = kfac(factors)
    assert k.damping == pytest.approx(damping, rel=1e-12)
    assert torch.allclose(k.precondition(v).flatten(), expected, rtol=1e-10, atol=1e-12)
    # Only the eigenvalues change: EK-FAC's corrected ones are left behind, nothing else moves.
    assert torch.equal(k.activation_eigenvectors, factors.activation_eigenvectors)
    assert not torch.allclose(factors.precondition(v), k.precondition(v))


def test_identity_preconditioner_is_the_gradient_and_estimators_cover_every_block():
    g = torch.randn(3, 4)
    assert torch.equal(Identity().precondition(g), g.double())
    factors = {"L1H0/qk": tiny_block(), "L1H0/v": tiny_block()}
    for name in ("ekfac", "kfac", "identity"):
        assert set(preconditioners(factors, name)) == set(factors)
    assert preconditioners(factors, "ekfac")["L1H0/v"] is factors["L1H0/v"]


# ----------------------------------------------------------------------------- the score
def test_lds_is_scipys_spearman_with_a_bootstrap_over_subsets():
    rng = np.random.default_rng(0)
    predicted = rng.normal(size=40)
    measured = 0.6 * predicted + rng.normal(size=40)
    measured[[3, 9]] = measured[5]  # ties
    out = lds(predicted, measured, resamples=300, confidence=0.9, seed=4)
    assert out["lds"] == pytest.approx(spearmanr(predicted, measured).statistic, abs=1e-12)
    # The interval: percentiles of scipy's rho over the same resamples of the subsets.
    idx = bootstrap_indices(40, 300, 4)
    boot = np.array([spearmanr(predicted[i], measured[i]).statistic for i in idx])
    assert np.allclose(spearman_rows(predicted[idx], measured[idx]), boot, atol=1e-12)
    assert [out["low"], out["high"]] == pytest.approx(list(np.percentile(boot, [5, 95])), abs=1e-12)
    assert out["low"] < out["lds"] < out["high"] and out["subsets"] == 40 and out["resamples"] == 300
    # Monotone data: 1 with a degenerate interval; reversed: −1 (the sign convention matters).
    assert lds(predicted, np.exp(predicted), 200, 0.95)["lds"] == pytest.approx(1.0)
    assert lds(predicted, -predicted, 200, 0.95)["low"] == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def influence_repo(trained_repo):
    """The tiny pipeline through scores (the LDS stage's inputs, and the scores to compare with)."""
    for stage in ("locate", "factors", "gradients", "scores"):
        res = run_stage(trained_repo, stage)
        assert res.returncode == 0, res.stderr
    return trained_repo


def retrain_by_hand(repo, targets, removed: set[int], params):
    """An independent replay: resume the window start, zero the removed rows' loss weights,
    step through the window with the Trainer (no mda.intervene.retrain, no mda.intervene.edits)."""
    from mda.data.stream import Stream
    from mda.model.neox import step_dir
    from mda.train.loop import resume

    start, end = targets["window"]["start"], targets["window"]["end"]
    threads = torch.get_num_threads()
    torch.set_num_threads(params.compute.threads)  # the stage's: bit-exact only for the same count
    try:
        trainer, _ = resume(step_dir(repo / "data/checkpoints", start), params.pretrain)
        for step, ids, table in Stream(repo / "data/corpus/stream").batches(start, end - 1):
            weights = [0.0 if int(i) in removed else 1.0 for i in table.column("sample_id").to_numpy()]
            trainer.step(torch.as_tensor(ids), torch.tensor(weights))
    finally:
        torch.set_num_threads(threads)
    return trainer.model.eval()


@pytest.mark.slow
def test_lds_stage_end_to_end_resumes_and_is_off_by_default(influence_repo):
    from mda.core.config import load_params
    from mda.model.heads import Head
    from mda.units.probes import PROBES
    from mda.units.probes import influence_probe

    repo = influence_repo
    # Off (the default): one small summary, nothing retrained.
    res = run_stage(repo, "lds")
    assert res.returncode == 0, res.stderr
    assert [p.name for p in (repo / "data/lds").iterdir()] == ["summary.json"]
    assert json.loads((repo / "metrics/lds.json").read_text())["enabled"] is False
    assert not (repo / "data/.work/lds").exists()

    set_params(repo, {"lds": {"enabled": True, "subsets": 4, "bootstrap": 100}})
    res = run_stage(repo, "lds")
    assert res.returncode == 0, res.stderr
    assert "lds: 0 of 4 subsets finished earlier and reused; 4 to retrain" in res.stdout
    targets = json.loads((repo / "data/locate/targets.json").read_text())
    heads = [h["name"] for h in targets["heads"]]
    out = repo / "data/lds"
    subsets = pd.read_parquet(out / "subsets.parquet")
    table = pd.read_parquet(out / "per_subset.parquet")
    scores = pd.read_parquet(out / "scores.parquet")
    summary = json.loads((out / "summary.json").read_text())
    window = (targets["window"]["end"] - targets["window"]["start"]) * 4
    assert subsets.groupby("subset").size().tolist() == [window // 2] * 4
    assert len(table) == 4 * len(heads) * 3 and set(table.estimator) == {"ekfac", "kfac", "identity"}
    assert (out / "lds.png").stat().st_size > 0
    # EK-FAC here is the scores stage's score; K-FAC and the identity differ from it.
    stage_scores = pd.read_parquet(repo / "data/scores/scores.parquet")
    merged = scores.merge(stage_scores, on=["sample_id", "head"])
    assert len(merged) == len(stage_scores) == window * len(heads)
    assert np.allclose(merged.ekfac, merged.score, rtol=1e-12, atol=0)
    assert not np.allclose(merged.kfac, merged.score) and not np.allclose(merged.identity, merged.score)
    # Predicted = −Σ of the removed samples' scores, from the written tables.
    head = heads[0]
    for m, removed in subsets.groupby("subset").sample_id:
        for name in ("ekfac", "kfac", "identity"):
            got = table[(table.subset == m) & (table["head"] == head) & (table.estimator == name)].predicted_change
            expected = -scores[(scores["head"] == head) & scores.sample_id.isin(removed)][name].sum()
            assert got.item() == pytest.approx(expected, rel=1e-12)
    # Measured: subset 1's probe value equals an independent replay without its samples.
    params = load_params(repo / "params.yaml")
    model = retrain_by_hand(repo, targets, set(subsets[subsets.subset == 1].sample_id.tolist()), params)
    inf = params.influence
    tokens = influence_probe(inf, model.config)
    h = targets["heads"][0]
    with torch.no_grad():
        f = PROBES[summary["probe"]](model, tokens, Head(h["layer"], h["head"])).item()
    row = table[(table.subset == 1) & (table["head"] == head) & (table.estimator == "ekfac")]
    assert row.probe.item() == f
    assert row.probe_change.item() == pytest.approx(f - summary["unedited"][head]["probe"], abs=1e-12)
    # Proponents: each estimator's top `fraction` (here a half) removed, measured like a subset.
    proponents = pd.read_parquet(out / "proponents.parquet")
    assert len(proponents) == 3 * len(heads) * 2 and set(proponents.output) == {"probe", "target_score"}
    assert "lds: 0 of 3 top sets finished earlier and reused; 3 to retrain" in res.stdout
    top = scores[scores["head"] == head].sort_values(["ekfac", "sample_id"], ascending=[False, True]).head(window // 2)
    by_hand = retrain_by_hand(repo, targets, set(top.sample_id.tolist()), params)
    with torch.no_grad():
        f_top = PROBES[summary["probe"]](by_hand, tokens, Head(h["layer"], h["head"])).item()
    row = proponents[(proponents["head"] == head) & (proponents.estimator == "ekfac") & (proponents.output == "probe")]
    assert row.top_change.item() == pytest.approx(f_top - summary["unedited"][head]["probe"], abs=1e-12)
    random_mean = table[(table["head"] == head) & (table.estimator == "ekfac")].probe_change.mean()
    assert row.random_mean_change.item() == pytest.approx(random_mean, rel=1e-12)
    assert row.ratio.item() == pytest.approx(row.top_change.item() / random_mean, rel=1e-12)
    assert summary["proponent_ratio"][head]["ekfac"]["probe"]["ratio"] == pytest.approx(row.ratio.item(), rel=1e-12)
    lds_metrics = json.loads((repo / "metrics/lds.json").read_text())
    assert lds_metrics["enabled"] and lds_metrics["subsets"] == 4
    r = lds_metrics["lds"][head]["ekfac"]["probe"]
    sub = table[(table["head"] == head) & (table.estimator == "ekfac")]
    assert r["lds"] == pytest.approx(spearmanr(sub.predicted_change, sub.probe_change).statistic, abs=1e-12)

    # A killed run keeps its finished subsets: drop one file, tamper with another's identity.
    first = (out / "per_subset.parquet").read_bytes()
    work = repo / "data/.work/lds"
    (work / "subset-00001.json").unlink()
    tampered = json.loads((work / "subset-00002.json").read_text())
    tampered["identity"]["train"] = "0000"
    (work / "subset-00002.json").write_text(json.dumps(tampered))
    shutil.rmtree(out)
    res = run_stage(repo, "lds")
    assert res.returncode == 0, res.stderr
    assert "lds: 2 of 4 subsets finished earlier and reused; 2 to retrain (files from other inputs: train differ)" \
        in res.stdout
    assert (out / "per_subset.parquet").read_bytes() == first  # same inputs, same bytes
