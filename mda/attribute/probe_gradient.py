"""∇θₕ f: the gradient of a unit's probe f (`mda.units.probes.PROBES`) w.r.t. the target head's own
parameter blocks only — what `score(z) = −⟨∇θₕ L(z), H⁻¹ ∇θₕ f⟩` needs, at the influence checkpoint."""

from __future__ import annotations

import torch

from mda.attribute.capture import Projector
from mda.model.heads import Block, Head
from mda.units.probes import PROBES


def probe_gradient(model, name: str, tokens: torch.Tensor, head: Head, blocks: list[Block],
                   projector: Projector | None = None) -> dict[str, torch.Tensor]:
    """∇ of the probe w.r.t. each of the head's blocks (out, in), projected like the training
    gradients. Other parameters only carry the forward; their gradients are never used."""
    modules = {(b.layer, b.module): b.linear(model) for b in blocks}
    keys = list(modules)
    value = PROBES[name](model, tokens, head)
    weights = [modules[k].weight for k in keys]
    # allow_unused: an attention-pattern probe does not depend on the head's V or O.
    grads = torch.autograd.grad(value, weights, allow_unused=True)
    by_module = {k: torch.zeros_like(w) if g is None else g for k, w, g in zip(keys, weights, grads)}
    out = {}
    for b in blocks:
        g = b.slice_grad(by_module[(b.layer, b.module)])
        out[b.name] = projector.project_grad(b, g) if projector else g
    return out
