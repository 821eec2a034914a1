"""Our EK-FAC influence scores agree with kronfluence's EK-FAC `compute_pairwise_scores`.

Peer check of `mda.attribute` (covariances → eigenbases → corrected eigenvalues Λ → damped
inverse-curvature product → score) against kronfluence 1.0.1 (Grosse et al. 2023's
reference implementation), on the same work: a tiny float64 GPT-NeoX (2 layers, hidden 16,
vocab 40, no attention biases, eager attention), one layer's whole attention weights
(`query_key_value` + `dense`, `mda.model.heads.module_blocks`: what kronfluence tracks as two
modules), EK-FAC fitted with the true Fisher on 256 training sequences, 96 training
sequences scored against the induction probe on 8 repeated-random-token sequences.
Measured: Spearman 1.0000000 (Pearson 1.000000000000000, max |Δ| / max |score| ≈ 3e-15): the
two implementations compute the same numbers, to float64 rounding. The assertions: every score
equals kronfluence's within 1e-9 of the largest |score| (values, so sign and scale too), and
Spearman ≥ 0.99; ~5 s of work (plus ~6 s of imports) on 2 CPU cores.

A rank check alone misses anything that rescales every score alike — Λ normalised per token
instead of per sequence (Λ and λ = α·mean(Λ) scale together), a factor in the probe or the
loss; the value check catches those. What the 0.99 rank bar would catch (measured on this setup,
kronfluence side changed, ours fixed): independent true-Fisher label draws 0.98–0.99
(Monte-Carlo noise alone at 256 sequences — hence the shared labels below); empirical Fisher on
one side 0.965; an absolute damping of 0.1 instead of 0.1·mean(Λ) 0.936; kronfluence's default
damping 1e-8 0.866.

How the kronfluence side is set up (fully offline, in a tmp dir; CI installs kronfluence with
`--no-deps`, requirements-test-nodeps.txt, and its light import deps via the [test] extra):
- `Task.compute_train_loss`: next-token cross-entropy summed over tokens and over the batch
  (inputs ids[:, :-1], targets ids[:, 1:]), as our `sequence_losses(...).sum()`.
  With `sample=True` (kronfluence's true-Fisher passes: covariances, then Lambda) the targets
  are labels drawn from the model's softmax — here, the very labels `fit_ekfac` drew, in the
  same order: a spy standing in for `torch.nn.functional` inside `mda.model.losses` records
  the targets of each `cross_entropy` call of our two passes, and the task hands them out one
  per call. Both sides then see the same sampled labels, whatever sampler `sequence_losses`
  uses, and the check is exact rather than Monte-Carlo close. The test also asserts the draw is
  not the data's next tokens and that kronfluence consumed exactly our batches.
- `compute_measurement`: −f, with f the induction probe (summed log-probability of the
  induction target) — written here independently of `mda.units.metrics` and checked equal to it.
- `get_influence_tracked_modules`: the layer's `attention.query_key_value`, `attention.dense`.
- `FactorArguments(strategy="ekfac", use_empirical_fisher=False)` with every dtype float64
  (covariance, eigendecomposition, per-sample gradient, Lambda), no example caps in play.
- `ScoreArguments(damping_factor=None, aggregate_query_gradients=True)`, float64 throughout.
  `damping_factor=None` is kronfluence's heuristic `0.1 · mean(Λ)` per module
  (`factor/config.py`: `HEURISTIC_DAMPING_SCALE * torch.mean(lambda_matrix)`), which is exactly
  our α·mean(Λ) per block with α = 0.1; a number there would be an *absolute* λ.
  `aggregate_query_gradients` scores against the probe gradient summed over the probe
  sequences (our ∇f); without it kronfluence scores each probe sequence separately.

Semantics compared (the two agree on each):
- A and S are per-token averages (kronfluence divides by the token count, ours too); they only
  enter through their eigenvectors, so their normalisation would not matter anyway.
- Λ = mean over *sequences* of (Q_Sᵀ G Q_A)² with G the sequence's summed-over-tokens gradient
  (kronfluence: `lambda_matrix / num_lambda_processed`, counted in examples). A per-token
  normalisation would only rescale Λ and, with λ relative to mean(Λ), every score alike.
- Damping: λ = 0.1 · mean(Λ) per module on both sides (see above), added to every Λ entry.
- Biases: kronfluence appends a constant-1 input column to a Linear with a bias (so the bias is
  part of its block and of A); ours covers weights only. The model has `attention_bias=False`
  so both have the same parameter set; with biases the two would differ.
- Sign: kronfluence's pairwise score is ∇m(q)ᵀ (G + λ)⁻¹ ∇L(z), no minus sign
  (`compute_pairwise_score`: preconditioned query gradient · training gradient). Upweighting
  z moves θ by −ε (G + λ)⁻¹ ∇L(z), so m changes by −ε · score: with a loss-like measurement a
  *positive* score means z is helpful (lowers m). Ours is −∇L(z)ᵀ (G + λ)⁻¹ ∇f, positive when
  a gradient step on z raises f. With m = −f the two are the same number, no flip needed
  (and the measured max |Δ| confirms it: a flipped sign would give Spearman −1).
"""

from __future__ import annotations

import logging
import time

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task

from mda.model.heads import Head, module_blocks
from mda.model import losses as lm
from mda.attribute.ekfac import fit_ekfac
from mda.attribute.capture import capture_batch, per_sample_gradients
from mda.attribute.probe_gradient import probe_gradient
from mda.units.probes import PROBES
from mda.units.probes import repeated_random_tokens

VOCAB, HIDDEN, LAYERS, HEADS = 40, 16, 2, 2
SEQ_LEN = 16             # tokens per training sequence fed to the model (ids are SEQ_LEN + 1)
FIT, SCORED = 256, 96    # training sequences for the factors / scored
BATCH = 32
PROBES_N, HALF = 8, 8    # probe sequences, half length
LAYER = 1
ALPHA, SEED = 0.1, 0
MIN_SPEARMAN = 0.99
MAX_RELATIVE_ERROR = 1e-9  # of the largest |score|; measured ≈ 3e-15 (float64 throughout)


def tiny_model() -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=2 * HIDDEN, max_position_embeddings=32, rotary_pct=0.25,
        use_parallel_residual=True, tie_word_embeddings=False, attention_dropout=0.0,
        hidden_dropout=0.0, attention_bias=False, initializer_range=(2.0 / (5.0 * HIDDEN)) ** 0.5,
        bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(SEED)
    model = GPTNeoXForCausalLM(config).double().eval()
    model.config._attn_implementation = "eager"
    return model


def training_ids(n: int, seed: int) -> torch.Tensor:
    """(n, SEQ_LEN + 1): half random tokens, half a random segment repeated (so some samples
    teach copying and the scores spread out)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ_LEN + 1), generator=gen)
    seg = SEQ_LEN // 2
    for i in range(0, n, 2):
        half = torch.randint(1, VOCAB, (seg,), generator=gen)
        ids[i, 1:1 + 2 * seg] = torch.cat([half, half])
    return ids


class TargetSpy:
    """Stands in for `torch.nn.functional` inside `mda.model.losses` (where the losses are taken) and records the
    targets of every `cross_entropy` call: the labels `fit_ekfac` actually trained its
    curvature on, whatever sampler `sequence_losses` uses."""

    def __init__(self):
        self.targets: list[torch.Tensor] = []

    def cross_entropy(self, input, target, *args, **kwargs):
        self.targets.append(target.detach().clone())
        return F.cross_entropy(input, target, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(F, name)


def induction_logprob(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the induction target: on [x, x] with |x| = h, position
    t ∈ [h, 2h) has its token's earlier copy at t − h, so its target is tokens[t − h + 1]."""
    h = tokens.shape[1] // 2
    logp = torch.log_softmax(logits[:, h:], dim=-1)
    return logp.gather(-1, tokens[:, 1:h + 1, None]).sum()


class Rows(Dataset):
    def __init__(self, **columns: torch.Tensor):
        self.columns = columns

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.columns.items()}


class LanguageModelling(Task):
    def __init__(self, modules: list[str], sampled: list[torch.Tensor]):
        self.modules = modules
        self.sampled = list(sampled)  # one label draw per call with sample=True, in call order

    def compute_train_loss(self, batch, model, sample=False):
        ids = batch["input_ids"]
        logits = model(input_ids=ids[:, :-1]).logits.flatten(0, 1)
        if sample:
            targets = self.sampled.pop(0)
            assert targets.shape == (logits.shape[0],), "kronfluence batches differ from ours"
        else:
            targets = ids[:, 1:].flatten()
        return F.cross_entropy(logits, targets, reduction="sum")

    def compute_measurement(self, batch, model):
        tokens = batch["input_ids"]
        return -induction_logprob(model(input_ids=tokens).logits, tokens)

    def get_influence_tracked_modules(self):
        return self.modules


def our_scores(model, fit_ids, scored_ids, probe_tokens, monkeypatch) -> tuple[torch.Tensor, list]:
    """Our scores, and the labels `fit_ekfac` sampled (one tensor per batch and pass)."""
    blocks = module_blocks(LAYER)
    spy = TargetSpy()
    with monkeypatch.context() as m:
        m.setattr(lm, "F", spy)
        factors = fit_ekfac(model, lambda: fit_ids.split(BATCH), blocks, fisher="true", alpha=ALPHA, seed=SEED)
    probe = probe_gradient(model, "induction", probe_tokens, Head(LAYER, 0), blocks)
    scores = torch.zeros(len(scored_ids), dtype=torch.float64)
    captured = capture_batch(model, scored_ids, blocks, labels="true")
    for b in blocks:
        g = per_sample_gradients(*(t.double() for t in captured[b.name]))
        scores -= (g * factors[b.name].precondition(probe[b.name])).sum((-2, -1))
    return scores, spy.targets


def kronfluence_scores(model, fit_ids, scored_ids, probe_tokens, sampled, tmp_path) -> torch.Tensor:
    prefix = f"gpt_neox.layers.{LAYER}.attention."
    task = LanguageModelling([prefix + "query_key_value", prefix + "dense"], sampled)
    model = prepare_model(model, task)
    # log_level=None: a level there would also be set on the root logger (kronfluence's
    # get_logger); quieten only kronfluence's own loggers instead.
    analyzer = Analyzer("agreement", model, task, cpu=True, log_level=None, profile=False,
                        disable_tqdm=True, output_dir=str(tmp_path), disable_model_save=True)
    f64 = torch.float64
    factor_args = FactorArguments(
        strategy="ekfac", use_empirical_fisher=False,
        covariance_max_examples=None, lambda_max_examples=None,
        activation_covariance_dtype=f64, gradient_covariance_dtype=f64,
        eigendecomposition_dtype=f64, per_sample_gradient_dtype=f64, lambda_dtype=f64)
    analyzer.fit_all_factors("ekfac", Rows(input_ids=fit_ids), per_device_batch_size=BATCH,
                             factor_args=factor_args)
    assert not task.sampled, "kronfluence drew fewer label batches than fit_ekfac"
    score_args = ScoreArguments(
        damping_factor=None, aggregate_query_gradients=True,
        per_sample_gradient_dtype=f64, precondition_dtype=f64, score_dtype=f64)
    analyzer.compute_pairwise_scores(
        "pairwise", "ekfac", query_dataset=Rows(input_ids=probe_tokens),
        train_dataset=Rows(input_ids=scored_ids), per_device_query_batch_size=len(probe_tokens),
        per_device_train_batch_size=BATCH, score_args=score_args)
    matrix = analyzer.load_pairwise_scores("pairwise")["all_modules"]
    assert matrix.shape == (1, len(scored_ids))
    return matrix[0].double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of the ranks (no scipy needed)."""
    return float(pd.Series(a.numpy()).rank().corr(pd.Series(b.numpy()).rank()))


@pytest.fixture
def quiet_kronfluence():
    logger = logging.getLogger("kronfluence")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


def test_ekfac_scores_agree_with_kronfluence(tmp_path, quiet_kronfluence, monkeypatch):
    start = time.perf_counter()
    model = tiny_model()
    fit_ids, scored_ids = training_ids(FIT, seed=1), training_ids(SCORED, seed=2)
    probe_tokens = repeated_random_tokens(VOCAB, PROBES_N, HALF, seed=3, exclude=(0,))

    # The kronfluence measurement is our probe (negated): same value on the same model.
    with torch.no_grad():
        ours_f = PROBES["induction"](model, probe_tokens, Head(LAYER, 0))
        theirs_f = induction_logprob(model(input_ids=probe_tokens).logits, probe_tokens)
    torch.testing.assert_close(theirs_f, ours_f, rtol=1e-12, atol=1e-12)

    ours, sampled = our_scores(model, fit_ids, scored_ids, probe_tokens, monkeypatch)
    # Two passes (covariances, eigenvalue correction) of FIT / BATCH batches, with labels
    # sampled from the model, not the data's next tokens (true Fisher).
    assert len(sampled) == 2 * FIT // BATCH, "sequence_losses no longer calls F.cross_entropy once per batch?"
    assert (torch.cat(sampled[:FIT // BATCH]) != fit_ids[:, 1:].flatten()).float().mean() > 0.5

    # kronfluence wraps modules in place and freezes parameters: give it its own copy.
    theirs = kronfluence_scores(tiny_model(), fit_ids, scored_ids, probe_tokens, sampled, tmp_path)

    rho = spearman(ours, theirs)
    pearson = float(torch.corrcoef(torch.stack([ours, theirs]))[0, 1])
    rel = float((ours - theirs).abs().max() / ours.abs().max())
    print(f"\nkronfluence agreement: Spearman {rho:.7f}, Pearson {pearson:.15f}, "
          f"max |Δ|/max|score| {rel:.2e}, {time.perf_counter() - start:.1f}s")
    assert ours.std() > 0 and theirs.std() > 0
    assert (ours > 0).any() and (ours < 0).any()  # both signs present: a flipped sign cannot pass
    assert rel <= MAX_RELATIVE_ERROR, f"max |Δ| / max |score| = {rel:.2e} > {MAX_RELATIVE_ERROR}"
    assert rho >= MIN_SPEARMAN, f"Spearman {rho:.4f} < {MIN_SPEARMAN}"
