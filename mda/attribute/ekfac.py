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
from typing import TYPE_CHECKING, Iterator

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mda.core.errors import MdaError
from mda.model.heads import Block
from mda.attribute.capture import Projector, capture_batch, per_sample_gradients

if TYPE_CHECKING:
    from mda.core.compute import Runtime


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


class TensorBatches:
    """Batches already in memory (tests, small fits), numbered 0, 1, … in order."""

    def __init__(self, batches):
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def tokens(self, index: int) -> int:
        ids = self.batches[index]
        return ids.shape[0] * (ids.shape[1] - 1)

    def read(self, part: range) -> Iterator[tuple[int, torch.Tensor]]:
        for i in part:
            yield i, self.batches[i]


def fit_ekfac(model, source, blocks: list[Block], *, fisher: str = "true", alpha: float = 0.1, seed: int = 0,
              projector: Projector | None = None, where: str = "", rt: Runtime | None = None) -> dict[str, BlockFactors]:
    """Two passes over the batches of `source` (a `TensorBatches`, a window's numbered batches, or
    a callable returning token-id tensors): covariances, then the eigenvalue correction in their
    eigenbases. `fisher`: "true" (sampled labels) or "empirical".

    Distributed (`rt` with several ranks): each rank takes its range of batch numbers; the label
    generator skips the draws of the batches before it, so every batch gets the labels a single
    process would draw; the float64 sums are reduced over ranks; rank 0 eigendecomposes and
    broadcasts. The result equals one process's up to the order of float summation."""
    from mda.core.compute import Runtime as _Runtime

    source = TensorBatches(source()) if callable(source) else source
    rt = rt or _Runtime(device=next(model.parameters()).device, dtype=torch.float32, micro_batch=None, threads=0)
    part = rt.shard(len(source))
    labels = "sampled" if fisher == "true" else "true"
    device = next(model.parameters()).device

    def passes(desc: str):
        gen = torch.Generator().manual_seed(seed)
        if labels == "sampled":  # the draws the earlier ranks' batches consume
            for i in range(part.start):
                torch.rand(source.tokens(i), 1, generator=gen, dtype=torch.float64)
        for i, ids in tqdm(source.read(part), total=len(part), desc=desc, unit="batch", disable=not rt.is_main):
            with rt.autocast():
                yield ids, capture_batch(model, ids, blocks, labels, gen, projector, where)

    cov_a, cov_s = ({b.name: 0 for b in blocks} for _ in range(2))
    tokens = 0
    for ids, captured in passes("factors: covariances"):
        for name, (a, g) in captured.items():
            a2, g2 = a.reshape(-1, a.shape[-1]).double(), g.reshape(-1, g.shape[-1]).double()
            cov_a[name] = cov_a[name] + a2.T @ a2
            cov_s[name] = cov_s[name] + g2.T @ g2
        tokens += ids.shape[0] * (ids.shape[1] - 1)
    tokens = int(rt.all_reduce_sum(torch.tensor(float(tokens), dtype=torch.float64)).item())
    bases = {}
    for b in blocks:
        for cov in (cov_a, cov_s):
            cov[b.name] = _as_sum(cov[b.name], b, model, projector, device, cov is cov_a)
            rt.all_reduce_sum(cov[b.name])
            cov[b.name] /= tokens
        if rt.is_main:
            pair = (eigenbasis(cov_a[b.name], f"{b.name}{where}: activation covariance"),
                    eigenbasis(cov_s[b.name], f"{b.name}{where}: gradient covariance"))
        else:
            pair = (torch.empty_like(cov_a[b.name]), torch.empty_like(cov_s[b.name]))
        bases[b.name] = tuple(rt.broadcast(t) for t in pair)
    lam = {b.name: 0 for b in blocks}
    samples = 0
    for ids, captured in passes("factors: eigenvalue correction"):
        for name, (a, g) in captured.items():
            q_a, q_s = bases[name]
            rotated = q_s.T @ per_sample_gradients(a.double(), g.double()) @ q_a
            lam[name] = lam[name] + (rotated ** 2).sum(0)
        samples += ids.shape[0]
    samples = int(rt.all_reduce_sum(torch.tensor(float(samples), dtype=torch.float64)).item())
    out = {}
    for b in blocks:
        q_a, q_s = bases[b.name]
        if not torch.is_tensor(lam[b.name]):
            lam[b.name] = torch.zeros(q_s.shape[0], q_a.shape[0], dtype=torch.float64, device=q_a.device)
        eigenvalues = rt.all_reduce_sum(lam[b.name]) / samples
        check_finite(eigenvalues, f"{b.name}{where}: eigenvalues")
        mean = eigenvalues.mean().item()
        if mean <= 0:
            raise MdaError(f"{b.name}{where}: degenerate curvature (all eigenvalues zero)")
        out[b.name] = BlockFactors(cov_a[b.name].cpu(), cov_s[b.name].cpu(), q_a.cpu(), q_s.cpu(), eigenvalues.cpu(),
                                   damping=alpha * mean,
                                   meta={"alpha": alpha, "fisher": fisher, "samples": samples,
                                         "tokens": tokens, "block": b.name})
    return out


def _as_sum(value, block: Block, model, projector, device, activation: bool) -> torch.Tensor:
    """A covariance sum, or zeros of the block's (projected) side when this rank saw no batch."""
    if torch.is_tensor(value):
        return value
    out_dim, in_dim = block.shape(model)
    dim = in_dim if activation else out_dim
    if projector is not None and 0 < projector.rank < dim:
        dim = projector.rank
    return torch.zeros(dim, dim, dtype=torch.float64, device=device)
