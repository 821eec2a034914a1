"""Probes: scalar functions of the model that measure a head's function (a registry).

`score(z) = −⟨∇θₕ L(z), H⁻¹ ∇θₕ f⟩` needs ∇θₕ f, the probe's gradient w.r.t. the target
head's own parameter blocks only (`probe_gradient`), computed at the influence checkpoint.
"""

from __future__ import annotations

from typing import Callable

import torch

from mda.model.heads import Block, Head
from mda.attribute.capture import Projector
from mda.model.losses import fits, token_losses
from mda.units.metrics import eager_attention, induction_target_logprob, induction_targets, previous_token_detection

PROBES: dict[str, Callable] = {}


def probe(name: str):
    def register(fn):
        PROBES[name] = fn
        return fn
    return register


@probe("induction")
def induction(model, tokens: torch.Tensor, head: Head) -> torch.Tensor:
    """Summed log-probability of the induction target (at t, the token that followed the
    previous occurrence of token t) over the repeated random-token sequences."""
    if fits(model, tokens.numel()):
        return induction_target_logprob(model(input_ids=tokens).logits, tokens, reduction="sum")
    # Pythia's vocabulary: the same sum, the vocabulary projection chunked (mda.model.losses)
    mask, targets = induction_targets(tokens.cpu())
    losses = token_losses(model, tokens, targets.to(tokens.device))
    return -(losses * mask.to(losses.device)).sum()


@probe("prev_token")
def prev_token(model, tokens: torch.Tensor, head: Head) -> torch.Tensor:
    """Summed attention of the head from each position t ≥ 1 to t − 1."""
    with eager_attention(model):
        attention = model(input_ids=tokens, output_attentions=True).attentions[head.layer][:, head.head]
    return (attention * previous_token_detection(tokens).to(attention.device, attention.dtype)).sum()


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
