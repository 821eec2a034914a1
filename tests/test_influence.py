"""Head-restricted EK-FAC influence: per-sample gradients, EK-FAC against the exact damped
Fisher, cache vs streaming, invariance to batching/sharding, and bad input."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from mda.core.config import Influence
from mda.core.errors import MdaError
from mda.core.errors import MdaError
from mda.model.heads import Head, head_blocks, module_blocks
from mda.attribute.ekfac import fit_ekfac
from mda.attribute.capture import Projector, capture_batch, per_sample_gradients, sequence_losses
from mda.attribute.probe_gradient import probe_gradient
from mda.units.probes import PROBES
from mda.units.probes import repeated_random_tokens
from tests.conftest import run_stage, set_params

VOCAB = 40


def spearman(x, y) -> float:
    return pd.Series(np.asarray(x)).corr(pd.Series(np.asarray(y)), method="spearman")


def tiny_model(seed=0, hidden=16, heads=2, layers=2):
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=2 * hidden, rotary_pct=0.25,
                           max_position_embeddings=64, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    model = GPTNeoXForCausalLM(config).double().eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():  # peaked, head-specific attention rather than near-uniform init
        for block in model.gpt_neox.layers:
            block.attention.query_key_value.weight.add_(0.3 * torch.randn_like(block.attention.query_key_value.weight))
    return model


def flat(grads: dict, blocks) -> torch.Tensor:
    return torch.cat([grads[b.name].flatten(1) for b in blocks], 1)


# ----------------------------------------------------------------------------- per-sample gradients
@pytest.mark.parametrize("blocks_of", [lambda c: head_blocks(c, Head(1, 1)), lambda c: module_blocks(0)])
def test_per_sample_gradients_equal_single_backward_calls(blocks_of):
    model = tiny_model()
    blocks = blocks_of(model.config)
    ids = torch.randint(1, VOCAB, (5, 12))
    captured = capture_batch(model, ids, blocks)
    for i in range(len(ids)):
        model.zero_grad()
        sequence_losses(model, ids[i:i + 1]).sum().backward()
        for b in blocks:
            expected = b.slice_grad(b.linear(model).weight.grad)
            assert torch.allclose(per_sample_gradients(*captured[b.name])[i], expected, atol=1e-8, rtol=0), b.name


def test_projection_is_p_out_g_p_in_transposed():
    model = tiny_model()
    blocks = head_blocks(model.config, Head(0, 0))
    ids = torch.randint(1, VOCAB, (3, 10))
    projector = Projector(rank=4, seed=0)
    full = capture_batch(model, ids, blocks)
    projected = capture_batch(model, ids, blocks, projector=projector)
    for b in blocks:
        g_full = per_sample_gradients(*full[b.name])
        expected = torch.stack([projector.project_grad(b, g) for g in g_full])
        assert torch.allclose(per_sample_gradients(*projected[b.name]), expected, atol=1e-10)


def test_probe_gradient_is_the_probe_derivative_on_the_head_rows():
    model = tiny_model()
    head = Head(1, 0)
    blocks = head_blocks(model.config, head)
    tokens = repeated_random_tokens(VOCAB, 3, 6, seed=0, exclude=(0,))
    for name in PROBES:
        grads = probe_gradient(model, name, tokens, head, blocks)
        model.zero_grad()
        PROBES[name](model, tokens, head).backward()
        for b in blocks:
            weight = b.linear(model).weight
            full = torch.zeros_like(weight) if weight.grad is None else weight.grad
            assert torch.allclose(grads[b.name], b.slice_grad(full), atol=1e-12)
        # A central difference along the qk block agrees with the gradient (HF's eager
        # attention takes its softmax in float32 even in a float64 model: hence 1e-4 steps).
        b = blocks[0]
        direction = torch.randn(b.shape(model), dtype=torch.float64)
        with torch.no_grad():
            w = b.linear(model).weight
            rows = list(b.out_index)
            w[rows] += 1e-4 * direction
            up = PROBES[name](model, tokens, head).item()
            w[rows] -= 2e-4 * direction
            down = PROBES[name](model, tokens, head).item()
            w[rows] += 1e-4 * direction
        assert (up - down) / 2e-4 == pytest.approx((grads[b.name] * direction).sum().item(), rel=1e-2)
    # The previous-token probe reads the attention pattern only: nothing flows into V or O.
    grads = probe_gradient(model, "prev_token", tokens, head, blocks)
    assert grads[f"{head.name}/v"].abs().max() == 0 and grads[f"{head.name}/o"].abs().max() == 0


# ----------------------------------------------------------------------------- EK-FAC
def mc_fisher(model, data, blocks, seed):
    """The sampled-label Fisher of the blocks, built explicitly: E_n[vec G_n vec G_nᵀ]."""
    gen = torch.Generator().manual_seed(seed)
    rows = [flat({n: per_sample_gradients(a, g) for n, (a, g) in
                  capture_batch(model, ids, blocks, "sampled", gen).items()}, blocks)
            for ids in data.split(32)]
    grads = torch.cat(rows)
    return grads.T @ grads / len(grads)


def test_eigenvalue_correction_is_the_fisher_diagonal_in_the_eigenbasis():
    """EK-FAC's Λ must equal diag(Q_S⊗Q_A)ᵀ F (Q_S⊗Q_A) of the explicit Fisher with the same
    label draws, and its preconditioner must be the exact inverse of that reconstructed F."""
    model = tiny_model(seed=1)
    head = Head(1, 0)
    blocks = head_blocks(model.config, head, "qk")
    data = torch.randint(1, VOCAB, (96, 10))
    factors = fit_ekfac(model, lambda: iter(data.split(32)), blocks, seed=3)
    f = factors[blocks[0].name]
    fisher = mc_fisher(model, data, blocks, seed=3)
    basis = torch.kron(f.gradient_eigenvectors, f.activation_eigenvectors)  # vec(row-major G)
    assert torch.allclose((basis.T @ fisher @ basis).diagonal().view_as(f.eigenvalues), f.eigenvalues,
                          rtol=1e-8, atol=1e-12)
    reconstructed = basis @ torch.diag(f.eigenvalues.flatten() + f.damping) @ basis.T
    v = torch.randn(f.eigenvalues.shape, dtype=torch.float64)
    assert torch.allclose(f.precondition(v).flatten(), torch.linalg.solve(reconstructed, v.flatten()), atol=1e-9)
    assert f.damping == pytest.approx(0.1 * f.eigenvalues.mean().item())


def top_overlap(x, y, fraction: float = 0.1) -> float:
    """Share of the top `fraction` of samples by x that are also in the top `fraction` by y."""
    k = max(1, int(round(fraction * len(x))))
    top = lambda v: set(np.argsort(-np.asarray(v), kind="stable")[:k].tolist())
    return len(top(x) & top(y)) / k


def agreement(estimate, exact) -> dict:
    """Spearman, Pearson and the top-10 % overlap of an estimator's scores with the exact ones."""
    return {"spearman": spearman(estimate, exact),
            "pearson": float(np.corrcoef(np.asarray(estimate), np.asarray(exact))[0, 1]),
            "top10": top_overlap(estimate, exact)}


def exact_check() -> tuple[dict, float]:
    """({estimator: agreement with the exact damped-Fisher-inverse scores}, EK-FAC's Spearman with
    the exact block-diagonal inverse) on a model small enough for the explicit Fisher of the head's
    blocks (512 parameters, qk + v + o). The exact side uses the same label draws and per-block
    damping; K-FAC (the same factors without the eigenvalue correction) shows what the correction
    adds, the identity (plain gradient dot products) what any curvature adds. Also run by
    `benchmarks/ekfac_exact.py`, which commits the numbers the README quotes."""
    from mda.attribute.preconditioners import preconditioners

    model = tiny_model()
    head = Head(1, 0)
    blocks = head_blocks(model.config, head)
    data = torch.randint(1, VOCAB, (8192, 9), generator=torch.Generator().manual_seed(0))
    factors = fit_ekfac(model, lambda: iter(data.split(256)), blocks, seed=0)
    fisher = mc_fisher(model, data, blocks, seed=0)
    damping = torch.cat([torch.full((factors[b.name].eigenvalues.numel(),), factors[b.name].damping,
                                    dtype=torch.float64) for b in blocks])
    tokens = repeated_random_tokens(VOCAB, 8, 8, seed=0, exclude=(0,))
    probe = probe_gradient(model, "induction", tokens, head, blocks)
    train = torch.randint(1, VOCAB, (200, 9), generator=torch.Generator().manual_seed(1))
    grads = {n: per_sample_gradients(a, g) for n, (a, g) in capture_batch(model, train, blocks).items()}
    g_train, g_probe = flat(grads, blocks), flat({n: v[None] for n, v in probe.items()}, blocks)[0]
    exact = -(g_train @ torch.linalg.solve(fisher + torch.diag(damping), g_probe))

    def scores(estimator):
        inverse = preconditioners(factors, estimator)
        return -sum((grads[b.name] * inverse[b.name].precondition(probe[b.name])).sum((1, 2)) for b in blocks)

    ekfac, kfac, identity = scores("ekfac"), scores("kfac"), scores("identity")
    assert torch.allclose(identity, -(g_train @ g_probe), rtol=1e-12, atol=0)
    # The same without cross-block curvature: what is left is EK-FAC's within-block error.
    blockwise, start = torch.zeros(len(train), dtype=torch.float64), 0
    for b in blocks:
        n = factors[b.name].eigenvalues.numel()
        part = slice(start, start + n)
        start += n
        blockwise -= g_train[:, part] @ torch.linalg.solve(
            fisher[part, part] + factors[b.name].damping * torch.eye(n, dtype=torch.float64), g_probe[part])
    vs = {name: agreement(v, exact) for name, v in (("EK-FAC", ekfac), ("K-FAC", kfac), ("identity", identity))}
    return vs, spearman(ekfac, blockwise)


def test_ekfac_influence_tracks_the_exact_damped_fisher_inverse(capsys):
    """EK-FAC vs the exact damped-inverse influence (`exact_check`)."""
    vs, rho_blockwise = exact_check()
    with capsys.disabled():
        print("\n[exact check] against the exact damped Fisher inverse (200 samples; top 10 % = 20):")
        for name, m in vs.items():
            print(f"  {name:8s} Spearman {m['spearman']:.3f}  Pearson {m['pearson']:.3f}  "
                  f"top-10 % overlap {m['top10']:.2f}")
        print(f"  EK-FAC vs the exact block-diagonal inverse: Spearman {rho_blockwise:.3f}")
    rho, rho_identity = vs["EK-FAC"]["spearman"], vs["identity"]["spearman"]
    # Measured (torch 2.13 CPU): Spearman / Pearson / top-10 % overlap — EK-FAC 0.838 / 0.840 /
    # 0.60, K-FAC 0.834 / 0.820 / 0.55, identity 0.485 / 0.494 / 0.30; EK-FAC vs block-diagonal
    # 0.912. The goal of 0.95 against the full exact inverse is NOT met on this model (see
    # the README); this guards what we have. The eigenvalue correction buys little here (K-FAC is
    # within 0.01 Spearman), so no ordering between EK-FAC and K-FAC is asserted.
    assert rho > rho_identity + 0.3 and vs["EK-FAC"]["pearson"] > vs["identity"]["pearson"] + 0.3
    assert rho >= 0.8 and rho_blockwise >= 0.9
    assert vs["K-FAC"]["spearman"] > rho_identity + 0.3


# ----------------------------------------------------------------------------- sign and scale, end to end
def test_scores_from_cache_predict_what_a_preconditioned_step_on_the_sample_does_to_the_probe(tmp_path, tiny_params):
    """The scores stage's own path (factors → gradient shards → H⁻¹∇f → `scores_from_cache`)
    against the definition its sign convention states: one step −η H⁻¹∇L(z) on the head's blocks
    changes the probe by η · score(z). Checked by a central finite difference of the probe along
    that step, with ∇L(z) from a plain backward of the sample's summed cross-entropy: the highest-
    and lowest-scored samples' steps raise and lower the probe by their scores. H⁻¹ is the fitted
    factors' (checked against the explicit Fisher and kronfluence by the tests above and in
    test_kronfluence_agreement.py); what this pins is everything around it — sign, scale, the
    head's rows, the shards' storage and the block sum."""
    from mda.data.corpus import build_corpus
    from mda.data.stream import Stream
    from mda.core.compute import Runtime
    from mda.core.config import ProbeSettings
    from mda.attribute.factors import fit_factors, load_factors
    from mda.attribute.gradient_cache import cache_gradients
    from mda.attribute.scoring import preconditioned_probe, scores_from_cache
    from mda.attribute.window import setup
    from mda.units.probes import probe_tokens
    from mda.model.neox import load_model, neox_config, new_model, save_model, step_dir

    vocab = build_corpus(tiny_params.corpus, tmp_path / "corpus")["vocab_size"]
    stream = Stream(tmp_path / "corpus" / "stream")
    model = new_model(neox_config(tiny_params.model, vocab), seed=0)
    with torch.no_grad():  # peaked, head-specific attention rather than near-uniform init
        for block in model.gpt_neox.layers:
            block.attention.query_key_value.weight.add_(0.3 * torch.randn_like(block.attention.query_key_value.weight))
    save_model(model, step_dir(tmp_path / "ckpts", 12))
    head = Head(1, 0)
    targets = {"unit": "induction", "heads": [{"name": head.name, "layer": 1, "head": 0}],
               "window": {"start": 0, "end": 12}, "influence_step": 12}
    inf = Influence(factor_samples=0, batch_size=16, probe_sequences=4, probe_half_len=8)
    rt = Runtime(device=torch.device("cpu"), dtype=torch.float32, micro_batch=None, threads=1)
    s = setup(inf, tmp_path / "ckpts", targets, rt, dtype=torch.float64)
    fit_factors(inf, s, stream, tmp_path / "factors")
    factors = load_factors(tmp_path / "factors", s)
    # Factors are keyed by the checkpoint's content: other weights at the same step are refused.
    with torch.no_grad():
        model.gpt_neox.layers[0].mlp.dense_h_to_4h.bias.add_(1e-3)
    save_model(model, step_dir(tmp_path / "other", 12))
    other = setup(inf, tmp_path / "other", targets, rt, dtype=torch.float64)
    with pytest.raises(MdaError, match=r"factors/L1H0/.*fitted for other inputs \(checkpoint differ"):
        load_factors(tmp_path / "factors", other)
    cache_gradients(inf, s, stream, tmp_path / "gradients")
    scores = scores_from_cache(inf, s, stream, tmp_path / "gradients", preconditioned_probe(inf, s, factors))
    assert len(scores) == 48 and (scores.score > 0).any() and (scores.score < 0).any()

    fresh = load_model(step_dir(tmp_path / "ckpts", 12), dtype=torch.float64)
    tokens = probe_tokens(ProbeSettings(sequences=4, half_len=8, seed=inf.probe_seed), fresh.config, None)
    rows = stream.read(0, 11, columns=["sample_id", "input_ids"]).to_pandas().set_index("sample_id")
    blocks = head_blocks(fresh.config, head)
    for z in (scores.score.idxmax(), scores.score.idxmin()):
        sample, score = int(scores.sample_id[z]), float(scores.score[z])
        ids = torch.tensor(rows.input_ids[sample], dtype=torch.long)
        fresh.zero_grad()
        F.cross_entropy(fresh(input_ids=ids[None, :-1]).logits[0], ids[1:], reduction="sum").backward()
        step = {}  # −H⁻¹∇L(z), laid into each block's rows / columns of its module's weight
        for b in blocks:
            weight = b.linear(fresh).weight
            full = torch.zeros_like(weight)
            direction = -factors[b.name].precondition(b.slice_grad(weight.grad))
            if b.out_index:
                full[list(b.out_index)] = direction
            else:
                full[:, list(b.in_index)] = direction
            step[b.module] = step.get(b.module, 0) + full
        eta = 1e-3 / max(v.abs().max().item() for v in step.values())

        def probe_after(scale):
            with torch.no_grad():
                for module, delta in step.items():
                    getattr(fresh.gpt_neox.layers[head.layer].attention, module).weight.add_(scale * eta * delta)
                value = PROBES["induction"](fresh, tokens, head).item()
                for module, delta in step.items():
                    getattr(fresh.gpt_neox.layers[head.layer].attention, module).weight.sub_(scale * eta * delta)
            return value

        before, up, down = probe_after(0), probe_after(1), probe_after(-1)
        assert (up - down) / (2 * eta) == pytest.approx(score, rel=1e-4), sample  # measured: ≤ 1e-5
        assert np.sign(up - before) == np.sign(score) and np.sign(before - down) == np.sign(score)


# ----------------------------------------------------------------------------- the stages
@pytest.fixture(scope="module")
def located_repo(trained_repo):
    res = run_stage(trained_repo, "locate")
    assert res.returncode == 0, res.stderr
    return trained_repo


def influence_setup(repo, **overrides):
    from mda.core.compute import runtime
    from mda.core.config import Compute
    from mda.data.stream import Stream
    from mda.attribute.window import setup
    from mda.core.io import read_targets

    inf = Influence(**{"factor_samples": 0, **overrides})
    targets = read_targets(repo / "data/locate/targets.json")
    targets["window"] = {"start": 0, "end": 12}  # the whole tiny run: 48 samples
    targets["influence_step"] = 12
    rt = runtime(Compute(threads=1))
    return inf, setup(inf, repo / "data/checkpoints", targets, rt), Stream(repo / "data/corpus/stream")


@pytest.mark.slow
def test_cached_and_streaming_scores_agree_and_ignore_batching(located_repo, tmp_path):
    from mda.attribute.factors import fit_factors, load_factors
    from mda.attribute.gradient_cache import cache_gradients
    from mda.attribute.scoring import preconditioned_probe, scores_from_cache, scores_streaming

    inf, s, stream = influence_setup(located_repo, batch_size=7, probe_sequences=4, probe_half_len=8)
    fit_factors(inf, s, stream, tmp_path / "factors")
    vectors = preconditioned_probe(inf, s, load_factors(tmp_path / "factors", s))
    manifest, _ = cache_gradients(inf, s, stream, tmp_path / "g1")
    assert manifest["samples"] == 48 and len(manifest["shards"]) == 1
    cached = scores_from_cache(inf, s, stream, tmp_path / "g1", vectors)
    streamed = scores_streaming(inf, s, stream, vectors)
    assert list(cached.sample_id) == list(range(48))
    np.testing.assert_allclose(cached.score, streamed.score, rtol=1e-6, atol=1e-6 * cached.score.abs().max())
    # Other batch size and 6 shards of 2 steps: the same scores (rows are independent).
    inf2 = inf.model_copy(update={"batch_size": 16, "shard_samples": 8})
    manifest2, _ = cache_gradients(inf2, s, stream, tmp_path / "g2")
    assert len(manifest2["shards"]) == 6
    resharded = scores_from_cache(inf2, s, stream, tmp_path / "g2", vectors, read_rows=5)
    np.testing.assert_allclose(resharded.score, cached.score, rtol=1e-5, atol=1e-6 * cached.score.abs().max())
    # A float16 cache scores within half-precision rounding of the float32 one.
    inf16 = inf.model_copy(update={"dtype": "float16"})
    cache_gradients(inf16, s, stream, tmp_path / "g16")
    half = scores_from_cache(inf16, s, stream, tmp_path / "g16", vectors)
    np.testing.assert_allclose(half.score, cached.score, rtol=0, atol=2e-3 * cached.score.abs().max())
    # A rerun keeps complete shards; a damaged one is recomputed.
    shard = tmp_path / "g2/shard-00003.parquet"
    shard.write_bytes(shard.read_bytes()[:200])
    _, reused = cache_gradients(inf2, s, stream, tmp_path / "g2")
    assert reused == 5
    np.testing.assert_array_equal(scores_from_cache(inf2, s, stream, tmp_path / "g2", vectors, read_rows=5).score,
                                  resharded.score)


@pytest.mark.slow
def test_nan_weights_stop_with_the_block_and_step(located_repo, tmp_path):
    from mda.attribute.gradient_cache import batch_gradients

    inf, s, stream = influence_setup(located_repo)
    head = s.heads[0]
    with torch.no_grad():  # a NaN in the head's own value rows poisons its activations downstream
        s.model.gpt_neox.layers[head.layer].attention.query_key_value.weight.fill_(float("nan"))
    ids = torch.from_numpy(next(stream.batches(0, 0))[1])
    with pytest.raises(MdaError, match=rf"{head.name}/(qk|v|o): non-finite (activations|gradients) at step 12"):
        batch_gradients(s, ids)


def test_non_finite_or_degenerate_covariance_is_named():
    from mda.attribute.ekfac import eigenbasis

    with pytest.raises(MdaError, match="L1H0/qk: activation covariance: non-finite values"):
        eigenbasis(torch.full((3, 3), float("nan")), "L1H0/qk: activation covariance")
    with pytest.raises(MdaError, match="L1H0/v: gradient covariance: degenerate"):
        eigenbasis(torch.zeros(3, 3), "L1H0/v: gradient covariance")


@pytest.mark.slow
def test_influence_stages_end_to_end_and_bad_targets(located_repo):
    for stage in ("factors", "gradients", "scores"):
        res = run_stage(located_repo, stage)
        assert res.returncode == 0, res.stderr
    # Same inputs, another process: the factor files are the same bytes (metadata included).
    first = {p.name: p.read_bytes() for p in (located_repo / "data/factors").rglob("*.safetensors")}
    assert first and run_stage(located_repo, "factors").returncode == 0
    assert {p.name: p.read_bytes() for p in (located_repo / "data/factors").rglob("*.safetensors")} == first
    scores = pd.read_parquet(located_repo / "data/scores/scores.parquet")
    targets = json.loads((located_repo / "data/locate/targets.json").read_text())
    n = (targets["window"]["end"] - targets["window"]["start"]) * 4
    assert len(scores) == n and list(scores.columns) == ["sample_id", "step", "domain", "head", "probe", "score"]
    assert scores.score.dtype == np.float64 and np.isfinite(scores.score).all()
    assert scores.step.between(targets["window"]["start"], targets["window"]["end"] - 1).all()
    metrics = json.loads((located_repo / "metrics/scores.json").read_text())
    assert 0 < metrics["heads"][targets["heads"][0]["name"]]["top10pct_positive_share"] <= 1
    # Other probe draws (influence.overlap_seeds) and the token split of the top and random samples.
    head = targets["heads"][0]["name"]
    draws = metrics["probe_draws"][head]
    assert draws["draws"] == ["seed 2", "seed 3", "seed 4", "seed 5"] and len(draws["pairs"]) == 6
    assert draws["k"] == round(0.1 * n) and 0 <= draws["overlap_min"] <= draws["overlap_mean"] <= 1
    by_draw = pd.read_parquet(located_repo / "data/scores/draws.parquet")
    np.testing.assert_array_equal(by_draw.score, scores.score)
    assert not np.allclose(by_draw.score, by_draw.score_seed3)  # another draw, other scores
    tokens = pd.read_parquet(located_repo / "data/scores/tokens.parquet")
    assert set(tokens.set) == {f"top:{head}", "random"} and metrics["tokens"]["sum_check_max_rel"] < 1e-5
    # A targets file naming a head the model lacks: one line, no scores written.
    bad = {**targets, "heads": [{"name": "L9H0", "layer": 9, "head": 0}]}
    (located_repo / "data/locate/targets.json").write_text(json.dumps(bad))
    shutil.rmtree(located_repo / "data/scores")
    try:
        res = run_stage(located_repo, "scores")
    finally:
        (located_repo / "data/locate/targets.json").write_text(json.dumps(targets))
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == \
        "error: targets.json: head L9H0 does not exist in the model (2 layers × 2 heads)"
    assert not (located_repo / "data/scores").exists()
