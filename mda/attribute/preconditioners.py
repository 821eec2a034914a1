"""The three preconditioners the LDS stage compares, all from one fit of the factors
(`mda.attribute.ekfac`), so a table shows what each step of the estimator buys:

- `ekfac`: (Λ + λ)⁻¹ in the Kronecker eigenbasis Q_S ⊗ Q_A with Λ the corrected eigenvalues
  (the per-sample Fisher's diagonal in that basis) — what the `scores` stage uses;
- `kfac`: the same basis without the correction: Λ = s aᵀ, the outer product of the two
  Kronecker factors' eigenvalues (S's and A's), i.e. (S ⊗ A + λ)⁻¹ (George et al. 2018 call
  the step from this to EK-FAC the eigenvalue correction);
- `identity`: no curvature, plain gradient dot products ⟨∇L(z), ∇f⟩.

Damping follows the same rule for both Kronecker estimators: λ = α · mean(Λ) with the α the
factors were fitted with (`influence.damping`). K-FAC's factors are per-token covariances while
EK-FAC's Λ is per sample; the ratio is a common factor of every block (tokens per sequence), and
a relative damping keeps every block's preconditioner in the same proportion, so the ranking of
the summed scores does not depend on it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from mda.attribute.ekfac import BlockFactors


def kfac(factors: BlockFactors) -> BlockFactors:
    """The block's K-FAC preconditioner: EK-FAC's eigenbases, eigenvalues s aᵀ (no correction)."""
    q_a, q_s = factors.activation_eigenvectors, factors.gradient_eigenvectors
    a = (q_a.T @ factors.activation_covariance.double() @ q_a).diagonal()  # A's eigenvalues, in q_a's order
    s = (q_s.T @ factors.gradient_covariance.double() @ q_s).diagonal()
    eigenvalues = torch.outer(s, a).clamp(min=0)  # round-off can leave −1e-20 for a zero eigenvalue
    alpha = float(factors.meta["alpha"])
    return replace(factors, eigenvalues=eigenvalues, damping=alpha * eigenvalues.mean().item(),
                   meta={**factors.meta, "estimator": "kfac"})


class Identity:
    """No preconditioning: the score is the plain gradient dot product."""

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.double()


ESTIMATORS: dict[str, Callable[[BlockFactors], object]] = {
    "ekfac": lambda factors: factors,
    "kfac": kfac,
    "identity": lambda factors: Identity(),
}
"""name → per-block preconditioner (anything with `precondition(grad)`) from the fitted factors."""


def preconditioners(factors: dict[str, BlockFactors], estimator: str) -> dict[str, object]:
    """Every block's preconditioner for `estimator` (a key of ESTIMATORS)."""
    return {name: ESTIMATORS[estimator](f) for name, f in factors.items()}
