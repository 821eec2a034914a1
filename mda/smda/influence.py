"""Per-example influence of SFT pairs on the ridge policy, split by pathway.

For each pair: one plain SGD step θ₁ = θ₀ − η∇L(pair) (L: mean cross-entropy over the pair's
response tokens; no momentum, no clipping) from the analysed weights θ₀, which are restored
bit for bit afterwards. On the policy's training prompts, recompute h and Y, and with the
SAE's own encoder gate at h₀ (`mda.smda.sae`):

    ΔY = Y₁ − Y₀                          ΔX = gate(h₀) ⊙ ((h₁ − h₀)·W_enc)   (kept latents)
    U = XᵀX + λI                          ΔU = ΔXᵀX + XᵀΔX
    ΔW_X = U⁻¹(ΔXᵀY − ΔU·W)               ΔW_Y = U⁻¹XᵀΔY

ΔW_X and ΔW_Y are the first-order changes of W = U⁻¹XᵀY along ΔX and ΔY. The pair's score is
(ΔW_X + ΔW_Y)·W — its alignment with the current policy — kept per pathway and per feature
(ΔW_j·W_j). Positive: the step moves the policy further in the direction it already points.

The step, h and Y are computed in float32 (at least) whatever `compute.dtype` says: a one-step
change of log p(refusal) at lr 1e-4 can be far below bf16's resolution of the logits (2⁻⁸ relative),
so under bf16 ΔY would be mostly rounding. Half-precision weights are upcast for the stage and cast
back afterwards (bf16 → float32 → bf16 is exact), autocast is off.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import chain

import numpy as np
import torch
from tqdm import tqdm

from mda.core.errors import MdaError
from mda.smda.lm import LM, hidden_and_logprob, response_batch
from mda.smda.sae import Sae
from mda.model.losses import token_losses


# ----------------------------------------------------------------------------- the ridge derivatives
def ridge_derivatives(X: np.ndarray, Y: np.ndarray, W: np.ndarray, lam: float, dX: np.ndarray,
                      dY: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ΔW_X, ΔW_Y): the directional derivatives of W(X, Y) = (XᵀX + λI)⁻¹XᵀY along (ΔX, 0)
    and (0, ΔY); float64 in, float64 out."""
    U = X.T @ X + lam * np.eye(X.shape[1])
    dU = dX.T @ X + X.T @ dX
    dW_x = np.linalg.solve(U, dX.T @ Y - dU @ W)
    dW_y = np.linalg.solve(U, X.T @ dY)
    return dW_x, dW_y


@dataclass
class PairInfluence:
    """One pair's effect on the policy: per-feature contributions ΔW_j·W_j of each pathway."""

    per_feature_x: np.ndarray
    per_feature_y: np.ndarray
    delta_y: np.ndarray
    loss: float

    @property
    def score_x(self) -> float:
        return float(self.per_feature_x.sum())

    @property
    def score_y(self) -> float:
        return float(self.per_feature_y.sum())

    @property
    def score(self) -> float:
        return self.score_x + self.score_y


def pair_influence(X, Y, W, lam, dX, dY, loss: float = float("nan")) -> PairInfluence:
    dW_x, dW_y = ridge_derivatives(X, Y, W, lam, dX, dY)
    return PairInfluence(dW_x * W, dW_y * W, dY, loss)


# ----------------------------------------------------------------------------- float32, restored
@contextmanager
def in_float32(lm: LM):
    """`lm` computing in float32: bf16 / float16 weights and buffers upcast in place (float32 and
    float64 ones kept), autocast off; every tensor's dtype is restored on exit, bit for bit."""
    tensors = [t for t in chain(lm.model.parameters(), lm.model.buffers())
               if t.is_floating_point() and t.element_size() < 4]
    dtypes = [t.dtype for t in tensors]
    for t in tensors:
        t.data = t.data.float()
    try:
        yield replace(lm, rt=replace(lm.rt, dtype=torch.float32))
    finally:
        for t, dtype in zip(tensors, dtypes):
            t.data = t.data.to(dtype)


# ----------------------------------------------------------------------------- one SGD step, restored
def response_loss(lm: LM, pair: tuple[list[int], list[int]]) -> torch.Tensor:
    """Mean next-token cross-entropy over the pair's response tokens."""
    ids, weights = response_batch([pair], lm.pad_id)
    with lm.rt.autocast():
        losses = token_losses(lm.model, ids.to(lm.rt.device))
    weights = weights.to(losses.device)
    return (losses * weights).sum() / weights.sum()


class SgdProbe:
    """Take one plain SGD step on a pair, measure (h, Y) on the probe prompts, restore θ₀.

    θ₀ is kept as a copy and copied back after every pair, so the analysed weights are the
    same bits before and after each step (`restored()` checks it against a second copy). The
    probe never autocasts; its weights must be float32 or wider (`in_float32`)."""

    def __init__(self, lm: LM, lr: float):
        self.lm, self.lr = replace(lm, rt=replace(lm.rt, dtype=torch.float32)), lr
        self.params = [p for p in lm.model.parameters() if p.requires_grad]
        if any(p.element_size() < 4 for p in self.params):
            raise MdaError("smda-influence: the one-step probe needs float32 weights (use influence.in_float32)")
        self.theta0 = [p.detach().clone() for p in self.params]

    def step(self, pair, prompts, prefixes, layer) -> tuple[torch.Tensor, torch.Tensor, float]:
        model = self.lm.model
        model.eval()  # no dropout: the step is the gradient of the model as analysed
        model.zero_grad(set_to_none=True)
        loss = response_loss(self.lm, pair)
        loss.backward()
        try:
            with torch.no_grad():
                for p in self.params:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-self.lr)
            h1, y1 = hidden_and_logprob(self.lm, prompts, prefixes, layer)
        finally:
            self.restore()
        return h1, y1, float(loss.detach())

    def restore(self) -> None:
        with torch.no_grad():
            for p, p0 in zip(self.params, self.theta0):
                p.copy_(p0)
                p.grad = None

    def restored(self, reference: list[torch.Tensor]) -> bool:
        """Whether the weights now equal `reference` bit for bit, in the same dtype."""
        return all(p.dtype == r.dtype and torch.equal(p.detach(), r) for p, r in zip(self.params, reference))


def influence_scores(lm: LM, sae: Sae, kept: np.ndarray, X: np.ndarray, Y: np.ndarray, W: np.ndarray,
                     lam: float, prompts: list[list[int]], prefixes: list[list[int]], layer: int,
                     pairs: list[tuple[list[int], list[int]]], lr: float,
                     progress: bool = True) -> tuple[list[PairInfluence], dict]:
    """Every pair's `PairInfluence` (step, h and Y in float32: `in_float32`), and checks: weights
    restored bit for bit (dtype included); the recomputed features X₀ = encode(h₀) against the
    policy's X (same encoder, same model; they differ by rounding where the policy ran in bf16)."""
    reference = [p.detach().clone() for p in lm.model.parameters() if p.requires_grad]
    cols = torch.as_tensor(kept)
    w_enc = sae.W_enc[:, cols]
    out = []
    with in_float32(lm) as lm32:
        h0, y0 = hidden_and_logprob(lm32, prompts, prefixes, layer)
        x0 = sae.encode(h0)[:, cols].numpy()
        gate = sae.gate(h0)[:, cols]
        probe = SgdProbe(lm32, lr)
        for pair in tqdm(pairs, desc="influence", unit="pair", disable=not progress):
            h1, y1, loss = probe.step(pair, prompts, prefixes, layer)
            dX = torch.where(gate, (h1 - h0) @ w_enc, torch.zeros(())).numpy()
            dY = (y1 - y0).numpy()
            out.append(pair_influence(X, Y, W, lam, dX, dY, loss))
    restored = probe.restored(reference)
    if not restored:
        raise MdaError("smda-influence: the analysed weights were not restored bit for bit")
    checks = {"restored_bit_for_bit": restored,
              "x0_max_abs_diff": float(np.abs(x0 - X).max()),
              "y0_max_abs_diff": float(np.abs(y0.numpy() - Y).max())}
    return out, checks


# ----------------------------------------------------------------------------- the scores against a refit
def refit_check(lm: LM, sae: Sae, kept: np.ndarray, X: np.ndarray, Y: np.ndarray, W: np.ndarray, lam: float,
                prompts: list[list[int]], prefixes: list[list[int]], layer: int,
                pairs: list[tuple[list[int], list[int]]], lr: float) -> list[dict]:
    """Per pair, the policy actually refitted after its one-step update against the score:
    `score` (ΔW_X + ΔW_Y)·W, first order, as `influence_scores` gives it; `refit` (W₁ − W)·W with
    W₁ the ridge refitted on X₁ = encode(h₁) (the SAE's TopK gate recomputed at h₁) and Y₁;
    `refit_gate_held` the same with X₁ = X + ΔX (the gate held at h₀, as the score linearises it).
    `refit` − `refit_gate_held` is what ignoring latents that enter or leave the top k costs;
    `refit_gate_held` − `score` is the second-order remainder of the ridge in (ΔX, ΔY)."""
    from mda.smda.policy import ridge

    scores, _ = influence_scores(lm, sae, kept, X, Y, W, lam, prompts, prefixes, layer, pairs, lr, progress=False)
    cols = torch.as_tensor(kept)
    out = []
    with in_float32(lm) as lm32:
        h0, y0 = hidden_and_logprob(lm32, prompts, prefixes, layer)
        gate = sae.gate(h0)[:, cols]
        probe = SgdProbe(lm32, lr)
        for pair, s in zip(pairs, scores):
            h1, y1, _ = probe.step(pair, prompts, prefixes, layer)
            Y1 = Y + (y1 - y0).numpy().astype(np.float64)
            X1 = X + (sae.encode(h1)[:, cols] - sae.encode(h0)[:, cols]).numpy().astype(np.float64)
            X1_held = X + torch.where(gate, (h1 - h0) @ sae.W_enc[:, cols], torch.zeros(())).numpy().astype(np.float64)
            out.append({"score": s.score, "refit": float((ridge(X1, Y1, lam) - W) @ W),
                        "refit_gate_held": float((ridge(X1_held, Y1, lam) - W) @ W),
                        "gate_changes": int((sae.gate(h1)[:, cols] != gate).sum())})
    return out
