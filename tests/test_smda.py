"""SMDA's pieces against independent references: finite differences of the ridge solution,
scikit-learn's ridge, an explicit SAELens-style TopK loop, explicit per-token losses, a naive
one-forward-per-sequence Y, hand-built curation and metric examples."""

import numpy as np
import pandas as pd
import pytest
import torch

from mda.core.config import SmdaSae, SmdaTask
from mda.core.errors import ConfigError, MdaError
from mda.smda import curate, policy
from mda.smda.evaluate import refusal_metrics
from mda.smda.influence import ridge_derivatives
from mda.smda.sae import Sae, check_fits, load_sae, quality, save_sae, train_topk

LAM = 5.0


# ----------------------------------------------------------------------------- ridge and its derivatives
def random_problem(seed=0, n=40, m=7):
    rng = np.random.default_rng(seed)
    X = np.abs(rng.normal(size=(n, m))) * (rng.random((n, m)) < 0.5)  # sparse, non-negative like SAE features
    Y = rng.normal(size=n) - 2.0
    return X, Y, rng.normal(size=(n, m)) * (X > 0), rng.normal(size=n)


def test_ridge_matches_scikit_learn():
    from sklearn.linear_model import Ridge

    X, Y, _, _ = random_problem()
    reference = Ridge(alpha=LAM, fit_intercept=False, solver="cholesky").fit(X, Y).coef_
    np.testing.assert_allclose(policy.ridge(X, Y, LAM), reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ridge_derivatives_match_central_finite_differences(seed):
    X, Y, dX, dY = random_problem(seed)
    W = policy.ridge(X, Y, LAM)
    dW_x, dW_y = ridge_derivatives(X, Y, W, LAM, dX, dY)
    eps = 1e-5
    fd_x = (policy.ridge(X + eps * dX, Y, LAM) - policy.ridge(X - eps * dX, Y, LAM)) / (2 * eps)
    fd_y = (policy.ridge(X, Y + eps * dY, LAM) - policy.ridge(X, Y - eps * dY, LAM)) / (2 * eps)
    assert np.linalg.norm(dW_x - fd_x) / np.linalg.norm(fd_x) <= 1e-4
    assert np.linalg.norm(dW_y - fd_y) / np.linalg.norm(fd_y) <= 1e-4
    # ... and a wrong formula (ΔU without its symmetric half) fails the same check.
    U = X.T @ X + LAM * np.eye(X.shape[1])
    wrong = np.linalg.solve(U, dX.T @ Y - (dX.T @ X) @ W)
    assert np.linalg.norm(wrong - fd_x) / np.linalg.norm(fd_x) > 1e-2


# ----------------------------------------------------------------------------- the SAE
def random_sae(d_in=6, d_sae=10, k=3, seed=0, arch="topk"):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    return Sae(t(d_in, d_sae), t(d_sae) * 0.1, t(d_sae, d_in), t(d_in) * 0.1, arch, k,
               t(d_sae).abs() * 0.2 if arch == "jumprelu" else None)


def explicit_topk(sae: Sae, h: torch.Tensor) -> torch.Tensor:
    """SAELens's TopK encoder, one vector at a time: top k of the pre-activations, then ReLU."""
    out = torch.zeros(h.shape[0], sae.d_sae, dtype=h.dtype)
    for i, x in enumerate(h):
        pre = [float(v) for v in (x - sae.b_dec) @ sae.W_enc + sae.b_enc]
        for j in sorted(range(len(pre)), key=lambda j: -pre[j])[:sae.k]:
            out[i, j] = max(pre[j], 0.0)
    return out


def test_topk_encoder_matches_explicit_loop_and_its_gate_is_its_jacobian():
    sae = random_sae()
    h = torch.randn(20, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sae.encode(h), explicit_topk(sae, h), rtol=0, atol=1e-12)
    assert (sae.gate(h) == (sae.encode(h) > 0)).all()
    # ΔX = gate(h) ⊙ (Δh·W_enc) is the first-order change of the encoder: central differences agree.
    dh = torch.randn(20, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    eps = 1e-7
    fd = (sae.encode(h + eps * dh) - sae.encode(h - eps * dh)) / (2 * eps)
    first_order = torch.where(sae.gate(h), dh @ sae.W_enc, torch.zeros(()))
    torch.testing.assert_close(fd, first_order, rtol=1e-6, atol=1e-6)


def test_jumprelu_and_standard_gates():
    for arch in ("standard", "jumprelu"):
        sae = random_sae(arch=arch)
        h = torch.randn(8, 6, dtype=torch.float64)
        pre = (h - sae.b_dec) @ sae.W_enc + sae.b_enc
        expected = torch.relu(pre) * (pre > (sae.threshold if arch == "jumprelu" else 0))
        torch.testing.assert_close(sae.encode(h), expected)


def test_sae_files_use_saelens_names_and_load_back(tmp_path):
    from safetensors.torch import load_file

    sae = random_sae().to(torch.float32)
    save_sae(sae, tmp_path, hook_layer=1, model_name="m")
    assert set(load_file(tmp_path / "sae_weights.safetensors")) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    back = load_sae(tmp_path)
    assert back.architecture == "topk" and back.k == 3 and back.cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    torch.testing.assert_close(back.W_enc, sae.W_enc.double())
    check_fits(back, hidden_size=6, layer=1, directory=tmp_path)
    with pytest.raises(MdaError, match=r"cfg.json: d_in 6 does not match the hidden size 8 of the model's block 1"):
        check_fits(back, hidden_size=8, layer=1, directory=tmp_path)
    with pytest.raises(MdaError, match=r"hook_name is block 1's residual stream, but params smda.sae.layer is 2"):
        check_fits(back, hidden_size=6, layer=2, directory=tmp_path)


def test_bad_sae_files_are_named(tmp_path):
    import json

    save_sae(random_sae().to(torch.float32), tmp_path, hook_layer=0, model_name="m")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(MdaError, match="cfg.json: architecture 'gated' is not supported"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 11}))
    with pytest.raises(MdaError, match=r"W_enc has shape \(6, 10\), cfg.json says \(6, 11\)"):
        load_sae(tmp_path)


def test_topk_training_reconstructs_sparse_data_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(24, 8, generator=g)
    codes = torch.rand(3000, 24, generator=g) * (torch.rand(3000, 24, generator=g) < 0.1)
    acts = codes @ atoms + 0.5
    params = SmdaSae(width=32, k=4, steps=400, batch_size=128, lr=3e-3, aux_k=8)
    sae, log = train_topk(acts[:2700], params, progress=False)
    q = quality(sae.to(torch.float64), acts[2700:])
    assert q["explained_variance"] > 0.8 and q["l0"] <= 4
    again, _ = train_topk(acts[:2700], params, progress=False)
    assert torch.equal(sae.W_enc, again.W_enc) and torch.equal(sae.b_dec, again.b_dec)


def test_quality_on_hand_built_sae():
    # An identity-like SAE with k = d reconstructs exactly; a latent that never fires is dead.
    eye = torch.eye(3, dtype=torch.float64)
    sae = Sae(torch.cat([eye, -eye, torch.zeros(3, 1)], 1), torch.tensor([0.0] * 6 + [-1.0]),
              torch.cat([eye, -eye, torch.zeros(1, 3)], 0), torch.zeros(3), "standard")
    acts = torch.randn(50, 3, dtype=torch.float64)
    q = quality(sae, acts)
    assert q["explained_variance"] == pytest.approx(1.0) and q["dead_share"] == pytest.approx(1 / 7)


# ----------------------------------------------------------------------------- features and policy
def test_feature_threshold_that_keeps_nothing_names_the_key():
    diff = np.array([0.05, -0.02, 0.01])
    assert policy.select_features(diff, 0.03).tolist() == [0]
    with pytest.raises(ConfigError, match=r"params: smda.policy.feature_threshold: 0.5 keeps no SAE latent "
                                          r"\(largest \|mean difference\| is 0.05\)"):
        policy.select_features(diff, 0.5)


def test_threshold_accuracy_and_majority_baseline():
    scores = np.array([-3.0, -2.0, -1.0, 0.5, 1.0, 2.0])
    labels = np.array([False, False, True, False, True, True])
    t, acc = policy.best_threshold(scores, labels)
    assert -2.0 < t < -1.0 or 0.5 < t < 1.0
    assert acc == pytest.approx(5 / 6)
    assert policy.majority_baseline(np.array([True, True, False]), np.array([True, False, False, False])) == 0.25
    test = policy.stratified_split(np.array([True] * 10 + [False] * 5), 0.2, seed=0)
    assert test[:10].sum() == 2 and test[10:].sum() == 1


# ----------------------------------------------------------------------------- curation
def test_median_rule_and_truth_on_a_hand_built_set():
    scores = pd.DataFrame({"harmful": [True] * 4 + [False] * 4,
                           "score": [5.0, 4.0, 0.5, -1.0, 0.0, 1.0, 2.0, 6.0]})
    # harmless median 1.5: harmful 0.5 and -1.0 go; harmful median 2.25: harmless 6.0 goes.
    removed = curate.removal_rule(scores, "median")
    assert removed.tolist() == [False, False, True, True, False, False, False, True]
    assert curate.removal_rule(scores, "oriented").tolist() == removed.tolist()  # classes ordered as assumed
    flipped = scores.assign(score=-scores.score)
    assert curate.removal_rule(flipped, "oriented").tolist() == removed.tolist()
    mislabelled = np.array([False, False, True, False, False, False, False, True])
    assert curate.precision_recall(removed, mislabelled) == (2 / 3, 1.0)
    harmful = scores.harmful.to_numpy()
    for draw in range(5):
        rand = curate.random_removal(harmful, {True: 2, False: 1}, draw)
        assert rand[harmful].sum() == 2 and rand[~harmful].sum() == 1
    summary = curate.against_truth(harmful, removed, mislabelled, draws=200)
    assert summary["precision"] == pytest.approx(2 / 3) and summary["random_precision_mean"] < 2 / 3


def test_each_rule_on_a_hand_built_score_table():
    """Every rule of `smda.curate.rules` on one table whose answers are worked out by hand."""
    t = pd.DataFrame({
        "harmful": [True] * 5 + [False] * 5,
        #            h0    h1    h2    h3    h4    s0    s1    s2    s3    s4
        "score":   [3.0,  2.0,  1.0, -1.0,  2.5, -0.5,  0.5,  0.0,  4.0, -3.0],
        "score_y": [1.0, -1.0,  0.5, -2.0,  0.2,  0.1, -0.3,  0.4,  1.0,  0.2],
        "score_x": [2.0,  3.0,  0.5,  1.0,  2.3, -0.6,  0.8, -0.4,  3.0, -3.2],
        "loss":    [0.2,  0.3,  0.4,  3.0,  0.1,  0.5,  0.6,  0.2,  0.4,  2.0]})
    rule = lambda name: np.flatnonzero(curate.removal_rule(t, name)).tolist()
    # median: harmless median 0.0 → harmful below it: h3; harmful median 2.0 → harmless above it: s3
    assert rule("median") == [3, 8]
    assert rule("median_harmful") == [3]                 # its harmful-side flags only
    assert rule("oriented") == rule("median")            # harmful scores higher, as `median` assumes
    assert rule("sign") == [3, 5, 9]                     # negative scores
    # within_class on score: harmful median 2.0, MAD median(|1, 0, 1, 3, .5|) = 1 → below 1.0: h3;
    # harmless median 0.0, MAD median(|.5, .5, 0, 4, 3|) = .5 → below −0.5: s4
    assert rule("within_class") == [3, 9]
    assert rule("sign_dy") == [1, 3, 6]                  # the ΔY pathway alone
    # within_class_dy: harmful median 0.2, MAD median(|.8, 1.2, .3, 2.2, 0|) = .8 → below −0.6: h1, h3;
    # harmless median 0.2, MAD median(|.1, .5, .2, .8, 0|) = .2 → below 0.0: s1
    assert rule("within_class_dy") == [1, 3, 6]
    # sign_loss: −loss centred at its median over all pairs (median loss 0.4): loss above 0.4 goes
    assert rule("sign_loss") == [3, 5, 6, 9]
    # within_class_loss on −loss: harmful −loss median −0.3, MAD .1 → below −0.4: h3 (loss 3.0);
    # harmless median −0.5, MAD .1 → below −0.6: s4 (loss 2.0)
    assert rule("within_class_loss") == [3, 9]
    assert set(curate.RULES) == {"median", "median_harmful", "oriented", "sign", "within_class", "sign_dy",
                                 "within_class_dy", "sign_loss", "within_class_loss"}
    with pytest.raises(ValueError, match="unknown curation rule"):
        curate.removal_rule(t, "mystery")
    # the pathways' shares of the removed pairs' |score|: sign removes h3, s0, s4
    shares = curate.pathway_shares(t, curate.removal_rule(t, "sign"))
    assert shares["removed"]["x_share"] == pytest.approx((1.0 + 0.6 + 3.2) / (1.0 + 0.6 + 3.2 + 2.0 + 0.1 + 0.2))
    assert shares["removed"]["pairs"] == 3 and shares["kept"]["pairs"] == 7


def test_comparisons_cover_every_rule_trained_and_the_oracle():
    from mda.smda.evaluate import comparisons, set_order

    sets = {"full", "oracle", "curated-sign", "random-sign", "curated-median", "random-median", "curated"}
    assert comparisons(sets) == [("curated", "full", "≥"), ("curated-median", "full", "≥"), ("full", "random-median", ">"),
                                 ("curated-sign", "full", "≥"), ("full", "random-sign", ">"), ("oracle", "full", "≥")]
    assert set_order(sets) == ["full", "curated", "curated-median", "random-median", "curated-sign", "random-sign",
                               "oracle"]


def test_auc_matches_mann_whitney():
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=40), 1)  # ties included
    pos = rng.random(40) < 0.3
    expected = mannwhitneyu(s[pos], s[~pos]).statistic / (pos.sum() * (~pos).sum())
    assert curate.auc(s, pos) == pytest.approx(expected)


# ----------------------------------------------------------------------------- metrics
def test_soft_and_hard_refusal_metrics_by_hand():
    p = np.array([0.9, 0.6, 0.2, 0.1])
    harmful = np.array([True, True, False, False])
    m = refusal_metrics(p, harmful, "soft")
    assert m["soft_recall"] == pytest.approx(0.75)
    assert m["soft_precision"] == pytest.approx(1.5 / 1.8)
    assert m["soft_correctness"] == pytest.approx((0.9 + 0.6 + 0.8 + 0.9) / 4)
    assert m["soft_f1"] == pytest.approx(2 * 0.75 * (1.5 / 1.8) / (0.75 + 1.5 / 1.8))
    hard = refusal_metrics(np.array([1.0, 0.0, 1.0, 0.0]), harmful, "greedy")
    assert hard == {"greedy_accuracy": 0.5, "greedy_precision": 0.5, "greedy_recall": 0.5, "greedy_f1": 0.5}


# ----------------------------------------------------------------------------- the task
def test_synthetic_task_ground_truth():
    from mda.smda.task import COMPLY, build_task, topic_words

    task = SmdaTask(instruct_pairs=40, sft_pairs=50, sae_prompts=10, policy_prompts=12, eval_prompts=8)
    pairs, truth, prompts, meta = build_task(task)
    topic = set(topic_words(task)[0])
    has_topic = lambda text: bool(set(text.split()) & topic)
    assert (pairs.prompt.map(has_topic) == pairs.harmful).all()
    assert (prompts.prompt.map(has_topic) == prompts.harmful).all()
    sft = pairs[pairs.set == "sft"].merge(truth, on="pair_id")
    refused = sft.response.str.startswith("raise")
    assert (refused == (sft.harmful ^ sft.mislabelled)).all()
    assert sft.response[~refused].str.startswith(COMPLY).all()
    assert meta["mislabelled_sft"] == 10 and sft.groupby("harmful").mislabelled.sum().tolist() == [5, 5]
    assert not truth[pairs.set == "instruct"].mislabelled.any()
    every = pd.concat([pairs.prompt, prompts.prompt])
    assert every.is_unique
    again = build_task(task)
    pd.testing.assert_frame_equal(pairs, again[0])


def test_sft_file_with_one_class_is_rejected(tmp_path):
    from mda.smda.task import build_task

    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "response": "b", "harmful": true}\n' * 3)
    (tmp_path / "prompts.jsonl").write_text("".join(f'{{"prompt": "p{i}", "harmful": {str(i % 2 == 0).lower()}}}\n'
                                                    for i in range(10)))
    task = SmdaTask(source="files", policy_prompts=4, eval_prompts=2,
                    files={"sft": str(tmp_path / "sft.jsonl"), "prompts": str(tmp_path / "prompts.jsonl")})
    with pytest.raises(MdaError, match=r"sft.jsonl: the SFT set has no harmless pair \(column harmful\)"):
        build_task(task)


# ----------------------------------------------------------------------------- the LM side
@pytest.fixture(scope="module")
def tiny_lm():
    from mda.core.compute import runtime
    from mda.core.config import Compute, Model, SmdaModel
    from mda.data.synthetic import build_vocabulary
    from mda.data.tokenizer import word_level_tokenizer
    from mda.model.neox import neox_config, new_model
    from mda.smda.lm import LM

    tokenizer = word_level_tokenizer(build_vocabulary())
    model = new_model(neox_config(Model(layers=2, hidden_size=32, heads=2, intermediate_size=64,
                                        max_position_embeddings=64), len(tokenizer)), seed=0).eval()
    return LM(model, tokenizer, False, SmdaModel().batch_size, runtime(Compute(threads=1)))


def test_y_and_h_match_one_forward_per_sequence(tiny_lm):
    from mda.smda.lm import hidden_and_logprob, refusal_prefix_ids, shared_inputs

    tok = tiny_lm.tokenizer
    prompts = [tok("head : kroth sais ? \u21b5").input_ids, tok("head : bior ? \u21b5").input_ids]
    prefixes = refusal_prefix_ids(tok, ["raise False", "raise None", "not", "raise None ."])
    assert shared_inputs(prefixes)[0] == [[tok.convert_tokens_to_ids("raise"), tok.convert_tokens_to_ids("None")]]
    h, y = hidden_and_logprob(tiny_lm, prompts, prefixes, layer=1)
    for i, p in enumerate(prompts):
        total = []
        for s in prefixes:
            with torch.no_grad():
                out = tiny_lm.model(torch.tensor([p + s]), output_hidden_states=True)
            logp = out.logits[0].double().log_softmax(-1)
            total.append(sum(logp[len(p) - 1 + j, t] for j, t in enumerate(s)))
            # float32 forwards of a padded batch vs one sequence: the same values up to float32
            # summation order (2.4e-7 absolute seen on an AMD EPYC), not the float64 default tolerance
            torch.testing.assert_close(h[i], out.hidden_states[2][0, len(p) - 1].double(), rtol=1e-5, atol=1e-6)
        assert float(y[i]) == pytest.approx(float(torch.logsumexp(torch.stack(total), 0)), abs=1e-5)


def test_refusal_prefix_the_tokenizer_cannot_encode(tiny_lm):
    from mda.smda.lm import refusal_prefix_ids

    with pytest.raises(ConfigError, match=r"params: smda.task.refusal_prefixes: 'I cannot' cannot be encoded "
                                          r"by the tokenizer \(unknown token\)"):
        refusal_prefix_ids(tiny_lm.tokenizer, ["raise False", "I cannot"])


def test_response_loss_and_token_weights_match_explicit_loops(tiny_lm):
    from mda.smda.influence import response_loss
    from mda.smda.lm import response_batch
    from mda.train.loop import batch_loss

    pairs = [([5, 6, 7], [8, 9]), ([5, 6], [10, 11, 12])]
    with torch.no_grad():
        logp = tiny_lm.model(torch.tensor([pairs[0][0] + pairs[0][1]])).logits[0].log_softmax(-1)
        explicit = -(logp[2, 8] + logp[3, 9]) / 2
        assert float(response_loss(tiny_lm, pairs[0])) == pytest.approx(float(explicit), rel=1e-5)
        ids, weights = response_batch(pairs, pad=1)
        assert weights.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
        total = 0.0
        for row, (p, r) in enumerate(pairs):
            lp = tiny_lm.model(ids[row:row + 1]).logits[0].log_softmax(-1)
            total += -sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(r))
        assert float(batch_loss(tiny_lm.model, ids, weights)) == pytest.approx(total / weights.numel(), rel=1e-5)


def test_sgd_step_restores_the_weights_bit_for_bit(tiny_lm):
    from mda.smda.influence import SgdProbe
    from mda.smda.lm import hidden_and_logprob

    model = tiny_lm.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts, prefixes = [[5, 6, 7, 8]], [[9, 10]]
    h0, y0 = hidden_and_logprob(tiny_lm, prompts, prefixes, layer=0)
    probe = SgdProbe(tiny_lm, lr=0.1)
    h1, y1, loss = probe.step(([5, 6, 7], [9, 10]), prompts, prefixes, layer=0)
    assert loss > 0 and float(y1[0]) > float(y0[0])  # a step on the prefix raises its probability
    assert not torch.equal(h0, h1)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())
    h2, y2 = hidden_and_logprob(tiny_lm, prompts, prefixes, layer=0)
    assert torch.equal(h2, h0) and torch.equal(y2, y0)


# ----------------------------------------------------------------------------- params
def test_every_smda_param_is_documented_and_unknown_keys_are_rejected(tmp_path):
    from mda.core.config import Smda, SmdaSection, load_params

    def undocumented(cls, prefix):
        for name, field in cls.model_fields.items():
            if not field.description:
                yield prefix + name
            if isinstance(field.annotation, type) and issubclass(field.annotation, SmdaSection):
                yield from undocumented(field.annotation, f"{prefix}{name}.")

    assert list(undocumented(Smda, "smda.")) == []
    path = tmp_path / "params.yaml"
    path.write_text("smda:\n  sae:\n    widht: 3\n")
    with pytest.raises(ConfigError, match=r"smda.sae.widht: unknown key"):
        load_params(path)
    path.write_text("smda:\n  sae: {k: 9, width: 8}\n")
    with pytest.raises(ConfigError, match=r"smda.sae: k 9 exceeds width 8"):
        load_params(path)
