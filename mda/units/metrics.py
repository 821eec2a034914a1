"""Head and model metrics: small pure functions of attention patterns, tokens and weights.

Every stage that scores a unit (pretraining's progress log, locate, retrain, evaluate,
the influence probes) calls these functions; none keeps its own copy.

Attention metrics follow TransformerLens's `detect_head` in `mul` mode: a *detection
pattern* D (query × key, 1 where the unit should attend) is multiplied with the head's
attention A, and the score is Σ(A·D) / ΣA per sequence, averaged over the batch.
TransformerLens sums over every query row. Rows that have no target at all (position 0
for previous-token; the whole first half of a repeated sequence for induction) only
dilute that ratio — a perfect induction head scores ≈ ½ — so the headline scores use
`target_rows_only=True`: the same ratio over the query rows where D has a target. Then a
perfect head scores 1.0, and the induction score is exactly Olsson et al.'s
prefix-matching score. `target_rows_only=False` reproduces TransformerLens (tested).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from mda.model.heads import Head, block_weight

COPYING_VERSION = "ov-eig-v1"
"""Copying score definition: Σλ / Σ|λ| over the eigenvalues λ of the head's full OV circuit
W_U·diag(γ_final)·W_O^h·W_V^h·diag(γ_ln1)·W_Eᵀ (Elhage et al. 2021), LayerNorm centring/scale
and biases ignored. +1: the head raises the logit of the token it attends to; −1: lowers it."""

ICL_LATE_INDEX, ICL_EARLY_INDEX, ICL_CONTEXT = 500, 50, 501
"""Olsson et al. (2022): "the loss of the 500th token in the context minus the average loss of the
50th token", averaged over examples — two single positions. (The MDA paper subtracts the mean loss
over the first 50 tokens instead; mda uses Olsson's definition, see README.)"""


@contextmanager
def eager_attention(model):
    """Attention patterns need the eager kernel (fused kernels never form them): switch to it for
    the block if the model runs another one."""
    current = getattr(model.config, "_attn_implementation", "eager")
    if current == "eager":
        yield model
        return
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(current)


@torch.no_grad()
def attention_patterns(model, tokens: torch.Tensor) -> torch.Tensor:
    """(layers, batch, heads, query, key) attention probabilities of every head, one forward."""
    with eager_attention(model):
        out = model(input_ids=tokens.to(next(model.parameters()).device), output_attentions=True)
    patterns = torch.stack(out.attentions)
    return (patterns if patterns.dtype == torch.float64 else patterns.float()).cpu()


# ----------------------------------------------------------------------------- detection patterns
def previous_token_detection(tokens: torch.Tensor) -> torch.Tensor:
    """(batch, seq, seq): query t → key t−1."""
    batch, n = tokens.shape
    return torch.diag(torch.ones(n - 1), -1).expand(batch, n, n)


def duplicate_token_detection(tokens: torch.Tensor) -> torch.Tensor:
    """(batch, seq, seq): query t → every earlier position holding the same token."""
    same = (tokens[:, :, None] == tokens[:, None, :]).float()
    return torch.tril(same, diagonal=-1)


def induction_detection(tokens: torch.Tensor) -> torch.Tensor:
    """(batch, seq, seq): query t → the position after each earlier occurrence of token t."""
    dup = duplicate_token_detection(tokens)
    shifted = torch.zeros_like(dup)
    shifted[..., 1:] = dup[..., :-1]
    return torch.tril(shifted)


def detection_score(patterns: torch.Tensor, detection: torch.Tensor, *, exclude_bos: bool = False,
                    exclude_current_token: bool = False, target_rows_only: bool = False) -> torch.Tensor:
    """Σ(A·D)/ΣA per sequence, averaged over the batch: shape `patterns.shape[:-4] + (heads,)`.

    `patterns` (..., batch, heads, q, k); `detection` (batch, q, k). `exclude_bos` zeroes
    attention to key 0 and `exclude_current_token` the diagonal before the ratio, as in
    TransformerLens; `target_rows_only` restricts both sums to query rows with a target.
    """
    q, k = patterns.shape[-2:]
    keep = torch.ones(q, k, dtype=patterns.dtype)
    if exclude_bos:
        keep[:, 0] = 0
    if exclude_current_token:
        keep.fill_diagonal_(0)
    attn = patterns * keep
    det = detection[:, None].to(patterns.dtype)  # (batch, 1, q, k)
    if target_rows_only:
        attn = attn * det.amax(dim=-1, keepdim=True)
    return ((attn * det).sum(dim=(-2, -1)) / attn.sum(dim=(-2, -1))).mean(dim=-2)


# ----------------------------------------------------------------------------- head scores
def prefix_matching_score(patterns: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Induction score per head: attention from each repeated token to the token after its
    earlier occurrence. On [x_0…x_{h-1}, x_0…x_{h-1}] it is the mean attention from query
    h+i to key i+1: 1.0 for a perfect induction head, `uniform_baseline` for uniform attention."""
    return detection_score(patterns, induction_detection(tokens), target_rows_only=True)


def previous_token_score(patterns: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean attention from query t to key t−1 over t ≥ 1: 1.0 for a perfect previous-token head."""
    return detection_score(patterns, previous_token_detection(tokens), target_rows_only=True)


def duplicate_token_score(patterns: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Attention mass from a repeated token to its earlier occurrences, over queries that have one."""
    return detection_score(patterns, duplicate_token_detection(tokens), target_rows_only=True)


ATTENTION_METRICS = {
    "prefix_matching": prefix_matching_score,
    "previous_token": previous_token_score,
    "duplicate_token": duplicate_token_score,
}


def uniform_baseline(metric: str, tokens: torch.Tensor) -> float:
    """What `metric` gives a head attending uniformly over the causal prefix: the chance level.
    For previous-token on n tokens: mean over t=1…n−1 of 1/(t+1). For prefix matching on
    [half, half]: mean over i<h of 1/(h+i+1)."""
    n = tokens.shape[1]
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    patterns = uniform.expand(tokens.shape[0], 1, n, n)
    return ATTENTION_METRICS[metric](patterns, tokens).item()


@torch.no_grad()
def copying_score(model) -> torch.Tensor:
    """(layers, heads) copying score, definition `COPYING_VERSION`."""
    inner = model.gpt_neox
    embed, unembed = inner.embed_in.weight.double(), model.get_output_embeddings().weight.double()
    gamma_final = inner.final_layer_norm.weight.double()
    read_write = embed.T @ unembed  # (d, d): token embedding space → unembedding space
    circuits = []
    for layer, block in enumerate(inner.layers):
        gamma = block.input_layernorm.weight.double()
        for h in range(model.config.num_attention_heads):
            w_v = block_weight(model, Head(layer, h), "v").double() * gamma      # (hs, d)
            w_o = block_weight(model, Head(layer, h), "o").double()              # (d, hs)
            circuits.append(w_v @ read_write @ (gamma_final[:, None] * w_o))     # (hs, hs)
    eig = torch.linalg.eigvals(torch.stack(circuits))
    score = eig.sum(-1).real / eig.abs().sum(-1)
    return score.float().view(model.config.num_hidden_layers, model.config.num_attention_heads)


# ----------------------------------------------------------------------------- induction-target probe
def induction_targets(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions, target_ids) of the induction target: at position t with an earlier
    occurrence of token t, the token that followed that occurrence (the latest one if several).
    Returns a boolean mask (batch, seq) of positions that have a target and the target ids."""
    det = induction_detection(tokens)
    has_target = det.amax(dim=-1) > 0
    n = tokens.shape[1]
    latest = (det * torch.arange(1, n + 1)).argmax(dim=-1)  # last key with a target
    return has_target, torch.gather(tokens, 1, latest)


def induction_target_logprob(logits: torch.Tensor, tokens: torch.Tensor, reduction: str = "mean",
                             positions: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probability of the induction target over positions that have one: per sequence
    mean, (batch,) — or `reduction="sum"`, one scalar summed over all sequences and positions
    (the influence probe). `positions` (bool, seq): `logits` cover only these positions."""
    mask, targets = (t.to(logits.device) for t in induction_targets(tokens.cpu()))
    if positions is not None:
        positions = positions.to(logits.device)
        mask, targets = mask[:, positions], targets[:, positions]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0] * mask
    return logp.sum() if reduction == "sum" else logp.sum(-1) / mask.sum(-1)


@torch.no_grad()
def head_ablation_logprobs(model, tokens: torch.Tensor, max_sequences: int = 4096) -> tuple[float, torch.Tensor]:
    """Mean induction-target log-probability of the intact model, and (layers, heads) of the
    same with each head's output zero-ablated (its slice of the input of `attention.dense`).

    All ablations run as copies of the batch in one forward (chunked to `max_sequences`
    sequences), copy 0 intact and copy 1 + layer·heads + head with that head removed.
    """
    config = model.config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    hs = config.hidden_size // heads
    copies = 1 + layers * heads
    mask = torch.ones(copies, layers, heads)
    for c in range(1, copies):
        mask[c, (c - 1) // heads, (c - 1) % heads] = 0
    per_chunk = max(1, max_sequences // tokens.shape[0])
    tokens = tokens.cpu()
    positions = induction_targets(tokens)[0].any(0)  # unembed only where a target exists
    device = next(model.parameters()).device
    means = []
    for start in range(0, copies, per_chunk):
        chunk_mask = mask[start:start + per_chunk]
        n_copies = len(chunk_mask)
        current = {}
        hooks = [block.attention.dense.register_forward_pre_hook(
            lambda mod, args, layer=layer: (args[0] * current["m"][:, layer].repeat_interleave(hs, -1)
                                            .repeat_interleave(tokens.shape[0], 0)[:, None, :]
                                            .to(args[0].device, args[0].dtype),))
            for layer, block in enumerate(model.gpt_neox.layers)]
        current["m"] = chunk_mask
        try:
            hidden = model.gpt_neox(input_ids=tokens.repeat(n_copies, 1).to(device)).last_hidden_state
        finally:
            for hook in hooks:
                hook.remove()
        logits = model.get_output_embeddings()(hidden[:, positions.to(device)])
        means.append(induction_target_logprob(logits, tokens.repeat(n_copies, 1), positions=positions)
                     .view(n_copies, -1).mean(-1).cpu())
    means = torch.cat(means)
    return means[0].item(), means[1:].view(layers, heads)


# ----------------------------------------------------------------------------- in-context learning
def icl_positions(context: int) -> tuple[int, int]:
    """(late index, early index) of the ICL score: Olsson et al.'s tokens 500 and 50 when the
    context has ≥ 501 predicted tokens, else the same fractions of it (64 tokens: 63 and 6)."""
    if context >= ICL_CONTEXT:
        return ICL_LATE_INDEX, ICL_EARLY_INDEX
    late = min(context - 1, round(ICL_LATE_INDEX * context / ICL_CONTEXT))
    early = min(late - 1, max(0, round(ICL_EARLY_INDEX * context / ICL_CONTEXT)))
    return late, early


def icl_score(token_losses: torch.Tensor) -> float:
    """Mean loss at the late position minus mean loss at the early one (Olsson et al.; negative =
    the model uses its context). `token_losses` (rows, predicted positions)."""
    late, early = icl_positions(token_losses.shape[1])
    return (token_losses[:, late].mean() - token_losses[:, early].mean()).item()


# ----------------------------------------------------------------------------- trajectories
def first_crossing(steps, values, level: float) -> float:
    """The first step at which a trajectory reaches `level`, linearly interpolated between the
    two evaluations that bracket it; the first step if it starts there; NaN if it never does."""
    import numpy as np

    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    above = np.flatnonzero(values >= level)
    if not len(above):
        return float("nan")
    i = int(above[0])
    if i == 0:
        return float(steps[0])
    v0, v1 = values[i - 1], values[i]
    return float(steps[i - 1] + (level - v0) / (v1 - v0) * (steps[i] - steps[i - 1]))
