"""Next-token losses of a causal LM without materialising a whole batch of logits.

At Pythia's shapes a batch's full-vocabulary float32 logits are huge (one 2,048-token row ×
50,304 ids = 412 MB), so whenever a batch's logits would exceed `LOGIT_BUDGET` elements the
vocabulary projection runs in chunks of positions:
- `ChunkedCrossEntropy` computes per-token losses chunk by chunk in the forward pass, keeps only
  each position's log-sum-exp, and recomputes a chunk's logits in the backward pass to form the
  gradients of the hidden states and of the unembedding (softmax − one-hot, weighted);
- label sampling for the true Fisher draws each chunk's labels from its logits, with the same
  stream of uniforms a single draw over the batch would use.
Below the budget the model's own forward runs unchanged (same operations, same bits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOGIT_BUDGET = 2 ** 26
"""Largest number of logit elements held at once (256 MB in float32)."""


def as_float(t: torch.Tensor) -> torch.Tensor:
    """float32 or float64 as they are; lower precisions up to float32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype(t.device.type) if torch.is_autocast_enabled(t.device.type) else t.dtype


class ChunkedCrossEntropy(torch.autograd.Function):
    """Per-position CE of `hidden @ weightᵀ (+ bias)` against `targets`, `chunk` positions at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        dtype = _compute_dtype(hidden)
        acc = torch.float64 if dtype == torch.float64 else torch.float32  # losses: at least float32
        losses = torch.empty(len(hidden), dtype=acc, device=hidden.device)
        lse = torch.empty_like(losses)
        with torch.autocast(hidden.device.type, enabled=False):
            for i in range(0, len(hidden), chunk):
                logits = _logits(hidden[i:i + chunk], weight, bias, dtype).to(acc)
                lse[i:i + chunk] = torch.logsumexp(logits, -1)
                losses[i:i + chunk] = lse[i:i + chunk] - logits.gather(-1, targets[i:i + chunk, None])[:, 0]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = lse.dtype
        grad_weight = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=acc) if bias is not None and ctx.needs_input_grad[2] else None
        with torch.autocast(hidden.device.type, enabled=False):
            for i in range(0, len(hidden), chunk):
                h = hidden[i:i + chunk]
                probs = torch.exp(_logits(h, weight, bias, dtype).to(acc) - lse[i:i + chunk, None])
                probs[torch.arange(len(h), device=h.device), targets[i:i + chunk]] -= 1.0
                g = probs * grad_losses[i:i + chunk, None].to(acc)  # dL/dlogits
                if grad_hidden is not None:
                    grad_hidden[i:i + chunk] = (g.to(dtype) @ weight.to(dtype)).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (g.to(dtype).T @ h.to(dtype)).to(acc)
                if grad_bias is not None:
                    grad_bias += g.sum(0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None)


def _logits(h, weight, bias, dtype):
    out = h.to(dtype) @ weight.to(dtype).T
    return out if bias is None else out + bias.to(dtype)


def _chunk(vocab: int, budget: int) -> int:
    return max(1, budget // vocab)


def fits(model, positions: int, budget: int = LOGIT_BUDGET) -> bool:
    """Whether `positions` rows of full-vocabulary logits fit the budget."""
    return positions * model.get_output_embeddings().out_features <= budget


def final_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(batch·positions, d): the last hidden states (after the final LayerNorm), flattened."""
    return model.base_model(input_ids=input_ids).last_hidden_state.flatten(0, 1)


def token_losses(model, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                 budget: int = LOGIT_BUDGET) -> torch.Tensor:
    """(batch, positions) next-token cross-entropy of `model` on `input_ids` against `targets`
    (default: the next token, i.e. inputs row[:-1] predict row[1:] and `input_ids` holds whole
    rows). With explicit `targets` (batch, positions), `input_ids` are the inputs themselves."""
    if targets is None:
        input_ids, targets = input_ids[:, :-1], input_ids[:, 1:]
    batch = input_ids.shape[0]
    if fits(model, input_ids.numel(), budget):
        logits = model(input_ids=input_ids).logits
        return F.cross_entropy(as_float(logits.flatten(0, 1)), targets.flatten(), reduction="none").view(batch, -1)
    head = model.get_output_embeddings()
    return ChunkedCrossEntropy.apply(final_hidden(model, input_ids), head.weight, head.bias, targets.flatten(),
                                     _chunk(head.out_features, budget)).view(batch, -1)


def sampled_sequence_losses(model, ids: torch.Tensor, generator: torch.Generator | None,
                            budget: int = LOGIT_BUDGET) -> torch.Tensor:
    """(batch,) CE summed over each row's tokens, against labels drawn from the model's own
    predictive distribution (the true Fisher): inverse CDF, one float64 uniform per token from
    `generator` (CPU) in position order."""
    inputs, batch = ids[:, :-1], ids.shape[0]
    if fits(model, inputs.numel(), budget):
        flat = as_float(model(input_ids=inputs).logits.flatten(0, 1))
        targets = _sample(flat, generator)
        return F.cross_entropy(flat, targets, reduction="none").view(batch, -1).sum(-1)
    head = model.get_output_embeddings()
    hidden, chunk = final_hidden(model, inputs), _chunk(head.out_features, budget)
    with torch.no_grad():
        targets = torch.cat([_sample(as_float(head(hidden[i:i + chunk])), generator)
                             for i in range(0, len(hidden), chunk)])
    return ChunkedCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk).view(batch, -1).sum(-1)


def _sample(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One label per row of `logits` by inverse CDF (multinomial is ~20× slower)."""
    with torch.no_grad():
        cdf = torch.softmax(logits.detach().double(), -1).cumsum(-1)
        u = torch.rand(len(logits), 1, generator=generator, dtype=torch.float64).to(cdf.device) * cdf[:, -1:]
        return torch.searchsorted(cdf, u)[:, 0].clamp_(max=logits.shape[-1] - 1)
