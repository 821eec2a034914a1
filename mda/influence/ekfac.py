"""EK-FAC curvature of parameter blocks (George et al. 2018; Grosse et al. 2023).

Per block with input a and output gradient g (per token):
  A = E[a aᵀ], S = E[g gᵀ] (labels sampled from the model: the true Fisher; or the data's),
  A = Q_A diag(·) Q_Aᵀ, S = Q_S diag(·) Q_Sᵀ (eigh in float64),
  Λ = E_samples[(Q_Sᵀ G Q_A)²] (the eigenvalue correction, from per-sample gradients G),
  H⁻¹v ≈ Q_S [(Q_Sᵀ V Q_A) / (Λ + λ)] Q_Aᵀ with damping λ = α · mean(Λ).
Blocks are independent (block-diagonal curvature across blocks).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mda.errors import MdaError
from mda.heads import Block
from mda.influence.grads import Projector, capture_batch, per_sample_gradients


@dataclass
class BlockFactors:
    activation_covariance: torch.Tensor  # A (in, in)
    gradient_covariance: torch.Tensor    # S (out, out)
    activation_eigenvectors: torch.Tensor
    gradient_eigenvectors: torch.Tensor
    eigenvalues: torch.Tensor            # Λ (out, in), corrected
    damping: float                       # λ = α · mean(Λ)
    meta: dict

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        """(H + λI)⁻¹ grad for a block gradient (…, out, in), in float64."""
        q_a, q_s = self.activation_eigenvectors, self.gradient_eigenvectors
        rotated = q_s.T @ grad.double() @ q_a
        return q_s @ (rotated / (self.eigenvalues + self.damping)) @ q_a.T

    def save(self, path: str | os.PathLike) -> None:
        tensors = {k: getattr(self, k).contiguous() for k in (
            "activation_covariance", "gradient_covariance", "activation_eigenvectors",
            "gradient_eigenvectors", "eigenvalues")}
        # One JSON entry: safetensors writes a multi-key metadata map in hash order, not stable bytes.
        meta = json.dumps({k: str(v) for k, v in {**self.meta, "damping": self.damping}.items()}, sort_keys=True)
        save_file(tensors, str(path), metadata={"mda": meta})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BlockFactors":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MdaError(f"{path}: missing factor file; run the factors stage")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as err:
            raise MdaError(f"{path}: cannot read factors ({str(err).splitlines()[0]})") from None
        if "mda" not in meta:
            raise MdaError(f"{path}: no mda metadata (written by another tool or an older mda); rerun the factors stage")
        meta = json.loads(meta["mda"])
        damping = float(meta.pop("damping"))
        factors = cls(**tensors, damping=damping, meta=meta)
        check_finite(factors.eigenvalues, f"{path}: eigenvalues")
        return factors


def check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise MdaError(f"{what}: non-finite values (NaN/Inf)")


def eigenbasis(cov: torch.Tensor, what: str) -> torch.Tensor:
    check_finite(cov, what)
    if cov.diagonal().sum() <= 0:
        raise MdaError(f"{what}: degenerate (all-zero) covariance")
    return torch.linalg.eigh(cov.double()).eigenvectors


def fit_ekfac(model, batches: Callable[[], Iterable[torch.Tensor]], blocks: list[Block], *,
              fisher: str = "true", alpha: float = 0.1, seed: int = 0,
              projector: Projector | None = None, total: int | None = None,
              where: str = "") -> dict[str, BlockFactors]:
    """Two passes over `batches()` (token-id tensors): covariances, then the eigenvalue
    correction in their eigenbases. `fisher`: "true" (sampled labels) or "empirical"."""
    labels = "sampled" if fisher == "true" else "true"
    cov_a, cov_s, tokens = {}, {}, 0
    gen = torch.Generator().manual_seed(seed)
    for ids in tqdm(batches(), total=total, desc="factors: covariances", unit="batch"):
        captured = capture_batch(model, ids, blocks, labels, gen, projector, where)
        for name, (a, g) in captured.items():
            a2, g2 = a.reshape(-1, a.shape[-1]).double(), g.reshape(-1, g.shape[-1]).double()
            cov_a[name] = cov_a.get(name, 0) + a2.T @ a2
            cov_s[name] = cov_s.get(name, 0) + g2.T @ g2
        tokens += ids.shape[0] * (ids.shape[1] - 1)
    bases = {}
    for b in blocks:
        cov_a[b.name] /= tokens
        cov_s[b.name] /= tokens
        bases[b.name] = (eigenbasis(cov_a[b.name], f"{b.name}{where}: activation covariance"),
                         eigenbasis(cov_s[b.name], f"{b.name}{where}: gradient covariance"))
    lam, samples = {}, 0
    gen = torch.Generator().manual_seed(seed)
    for ids in tqdm(batches(), total=total, desc="factors: eigenvalue correction", unit="batch"):
        captured = capture_batch(model, ids, blocks, labels, gen, projector, where)
        for name, (a, g) in captured.items():
            q_a, q_s = bases[name]
            rotated = q_s.T @ per_sample_gradients(a.double(), g.double()) @ q_a
            lam[name] = lam.get(name, 0) + (rotated ** 2).sum(0)
        samples += ids.shape[0]
    out = {}
    for b in blocks:
        eigenvalues = lam[b.name] / samples
        check_finite(eigenvalues, f"{b.name}{where}: eigenvalues")
        mean = eigenvalues.mean().item()
        if mean <= 0:
            raise MdaError(f"{b.name}{where}: degenerate curvature (all eigenvalues zero)")
        out[b.name] = BlockFactors(cov_a[b.name], cov_s[b.name], *bases[b.name], eigenvalues,
                                   damping=alpha * mean,
                                   meta={"alpha": alpha, "fisher": fisher, "samples": samples,
                                         "tokens": tokens, "block": b.name})
    return out
