"""Head metrics: small pure functions of attention patterns, plus the inputs they need.

Every stage that scores a head (pretraining's progress log, locate, retrain, evaluate)
calls these functions; none keeps its own copy.
"""

from __future__ import annotations

import torch


def repeated_random_tokens(vocab_size: int, sequences: int, half_len: int, seed: int,
                           exclude: tuple[int, ...] = ()) -> torch.Tensor:
    """(sequences, 2·half_len) token ids: a random half, then the same half again.

    Tokens within a half are distinct (drawn without replacement from the vocabulary
    minus `exclude`), so every position of the second copy has one unambiguous
    earlier occurrence.
    """
    allowed = torch.tensor(sorted(set(range(vocab_size)) - set(exclude)), dtype=torch.long)
    if len(allowed) < half_len:
        raise ValueError(f"vocabulary of {len(allowed)} usable tokens is smaller than half_len {half_len}")
    gen = torch.Generator().manual_seed(seed)
    halves = torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:half_len]]
                          for _ in range(sequences)])
    return torch.cat([halves, halves], dim=1)


@torch.no_grad()
def attention_patterns(model, tokens: torch.Tensor) -> torch.Tensor:
    """(layers, batch, heads, query, key) attention probabilities of every head, one forward."""
    out = model(input_ids=tokens, output_attentions=True)
    return torch.stack(out.attentions)


def prefix_matching_score(patterns: torch.Tensor, half_len: int) -> torch.Tensor:
    """Induction (prefix-matching) score per head, shape `patterns.shape[:-3]` minus batch.

    For a sequence [x_0 … x_{h-1}, x_0 … x_{h-1}], the query at position h+i (second
    occurrence of x_i) should attend to position i+1, the token after x_i's first
    occurrence. The score is that attention weight averaged over i = 0 … h-1 and over
    the batch: 1.0 for a perfect induction head, about 1/(1.5·h) for uniform attention.
    `patterns` is (..., batch, heads, 2h, 2h).
    """
    q = torch.arange(half_len, 2 * half_len)
    k = q - half_len + 1
    return patterns[..., q, k].mean(dim=(-3, -1))
