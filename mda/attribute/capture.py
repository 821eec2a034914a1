"""Per-sample gradients of parameter blocks from one backward pass per batch.

For a Linear y = W x, the gradient of a sequence's loss w.r.t. W is Σ_t g_t x_tᵀ over its
tokens (g = ∂loss/∂y). Hooks record x (the module input) and g (the output gradient) for
the whole batch; a block's rows/columns select its part; one einsum gives every sample's
block gradient. Samples are independent in a causal LM forward (no batch statistics), so
backpropagating the *sum* of per-sequence losses gives each sequence's own g.

Optional LoGra-style factored projection: x → P_in x (rank r_in), g → P_out g (rank r_out),
so the block gradient becomes P_out G P_inᵀ without ever forming G.
"""

from __future__ import annotations

import torch

from mda.core.errors import MdaError
from mda.model.heads import Block
from mda.model.losses import as_float, sampled_sequence_losses, token_losses


class Projector:
    """Seeded Gaussian projections per block side (shared by factors, gradients and probes)."""

    def __init__(self, rank: int, seed: int):
        self.rank, self.seed = rank, seed
        self._cache: dict[tuple[str, str, int], torch.Tensor] = {}

    def matrix(self, block: Block, side: str, dim: int, dtype, device=None) -> torch.Tensor | None:
        if not self.rank or self.rank >= dim:
            return None
        key = (block.name, side, dim)
        if key not in self._cache:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + hash_name(f"{block.name}/{side}"))
            self._cache[key] = torch.randn(self.rank, dim, generator=gen, dtype=torch.float64) / self.rank ** 0.5
        return self._cache[key].to(device=device, dtype=dtype)

    def project(self, block: Block, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p_in = self.matrix(block, "in", a.shape[-1], a.dtype, a.device)
        p_out = self.matrix(block, "out", g.shape[-1], g.dtype, g.device)
        return (a if p_in is None else a @ p_in.T), (g if p_out is None else g @ p_out.T)

    def project_grad(self, block: Block, grad: torch.Tensor) -> torch.Tensor:
        """P_out G P_inᵀ for a full block gradient (out, in)."""
        p_in = self.matrix(block, "in", grad.shape[-1], grad.dtype, grad.device)
        p_out = self.matrix(block, "out", grad.shape[-2], grad.dtype, grad.device)
        if p_out is not None:
            grad = p_out @ grad
        return grad if p_in is None else grad @ p_in.T


def hash_name(name: str) -> int:
    """A stable (not per-process salted) hash of a block name."""
    return int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little") % 1_000_003 + len(name)


class BlockCapture:
    """Context manager: hooks that keep each needed module's input and output gradient.

    Backpropagation is truncated: while active, no parameter requires grad, and the first
    target module's output becomes the leaf of the graph. Backward then runs only from the
    loss down to the lowest target block — no weight gradients, nothing below it.
    """

    def __init__(self, model, blocks: list[Block]):
        self.model, self.blocks = model, blocks
        self.inputs: dict[tuple[int, str], torch.Tensor] = {}
        self.grads: dict[tuple[int, str], torch.Tensor] = {}
        self._handles = []

    def __enter__(self):
        self._requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._requires_grad:
            p.requires_grad_(False)
        for key in {(b.layer, b.module) for b in self.blocks}:
            module = getattr(self.model.gpt_neox.layers[key[0]].attention, key[1])
            self._handles.append(module.register_forward_hook(self._hook(key)))
        return self

    def _hook(self, key):
        def hook(module, args, output):
            self.inputs[key] = args[0].detach()
            if not output.requires_grad:  # the lowest target: the graph starts here
                output = output.detach().requires_grad_(True)
            output.register_hook(lambda grad: self.grads.__setitem__(key, grad.detach()))
            return output
        return hook

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)

    def tensors(self, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        """(a (batch, tokens, in), g (batch, tokens, out)) of the block's slice."""
        key = (block.layer, block.module)
        if key not in self.grads:
            raise MdaError(f"{block.name}: no gradient reached this block (is it used by the loss?)")
        a, g = as_float(self.inputs[key]), as_float(self.grads[key])  # bf16 under autocast
        if block.in_index:
            a = a[..., list(block.in_index)]
        if block.out_index:
            g = g[..., list(block.out_index)]
        return a, g


def sequence_losses(model, ids: torch.Tensor, labels: str = "true",
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch,) next-token cross-entropy summed over each sequence's tokens; `labels="sampled"`
    draws targets from the model's own predictive distribution (true Fisher). The vocabulary
    projection is chunked at Pythia's shapes (`mda.model.losses`)."""
    if labels == "sampled":
        return sampled_sequence_losses(model, ids, generator)
    return token_losses(model, ids).sum(-1)


def capture_batch(model, ids: torch.Tensor, blocks: list[Block], labels: str = "true",
                  generator: torch.Generator | None = None, projector: Projector | None = None,
                  where: str = "") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One forward + backward of Σ per-sequence losses; per block its (a, g), projected if asked.
    Runs on the model's device, under the ambient autocast (bf16) if any."""
    ids = ids.to(next(model.parameters()).device)
    with BlockCapture(model, blocks) as capture:
        sequence_losses(model, ids, labels, generator).sum().backward()
    out = {}
    for block in blocks:
        a, g = capture.tensors(block)
        if not (torch.isfinite(a).all() and torch.isfinite(g).all()):
            bad = "activations" if not torch.isfinite(a).all() else "gradients"
            raise MdaError(f"{block.name}: non-finite {bad}{where}")
        out[block.name] = projector.project(block, a, g) if projector else (a, g)
    return out


def per_sample_gradients(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(batch, out, in) = Σ_t g_t a_tᵀ per sample."""
    return torch.einsum("bto,bti->boi", g, a)
