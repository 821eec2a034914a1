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
"""

from __future__ import annotations

from dataclasses import dataclass

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
    same bits before and after each step (`restored()` checks it against a second copy)."""

    def __init__(self, lm: LM, lr: float):
        self.lm, self.lr = lm, lr
        self.params = [p for p in lm.model.parameters() if p.requires_grad]
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
        """Whether the weights now equal `reference` bit for bit."""
        return all(torch.equal(p.detach(), r) for p, r in zip(self.params, reference))


def influence_scores(lm: LM, sae: Sae, kept: np.ndarray, X: np.ndarray, Y: np.ndarray, W: np.ndarray,
                     lam: float, prompts: list[list[int]], prefixes: list[list[int]], layer: int,
                     pairs: list[tuple[list[int], list[int]]], lr: float,
                     progress: bool = True) -> tuple[list[PairInfluence], dict]:
    """Every pair's `PairInfluence`, and checks: weights restored bit for bit; the recomputed
    features X₀ = encode(h₀) against the policy's X (same encoder, same model)."""
    reference = [p.detach().clone() for p in lm.model.parameters() if p.requires_grad]
    h0, y0 = hidden_and_logprob(lm, prompts, prefixes, layer)
    cols = torch.as_tensor(kept)
    x0 = sae.encode(h0)[:, cols].numpy()
    gate = sae.gate(h0)[:, cols]
    w_enc = sae.W_enc[:, cols]
    probe = SgdProbe(lm, lr)
    out = []
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
