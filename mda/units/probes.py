"""Every probe of a unit in one place: the repeated random-token sequences each stage draws — each
from its own seed (`mda.core.config` checks that evaluation never reuses a seed that chose the head
or scored the samples) — and the probe functions f that influence differentiates.

| who | tokens | seed |
|---|---|---|
| pretraining's progress log | `pretraining_probe` | `pretrain.probe.seed` |
| `locate` (chooses head and window) | `probe_tokens(locate.probe)` | `locate.probe.seed` |
| the influence scores (and their other draws) | `influence_probe` | `influence.probe_seed` (`overlap_seeds`) |
| every retraining arm's evaluations, run seed s | `evaluation_probes` | `retrain.probe.seed` + s |
"""

from __future__ import annotations

from typing import Callable

import torch

from mda.core.config import Influence, Params, ProbeSettings
from mda.model.heads import Head
from mda.model.losses import fits, token_losses
from mda.units.metrics import eager_attention, induction_target_logprob, induction_targets, previous_token_detection


# ----------------------------------------------------------------------------- tokens
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


def probe_tokens(probe: ProbeSettings, model_config, vocab_size: int | None) -> torch.Tensor:
    """Repeated random tokens over the usable vocabulary (the tokenizer's, when smaller than the
    model's padded embedding) minus BOS/EOS."""
    vocab = min(model_config.vocab_size, vocab_size or model_config.vocab_size)
    special = tuple(sorted({model_config.bos_token_id, model_config.eos_token_id} - {None}))
    return repeated_random_tokens(vocab, probe.sequences, probe.half_len, probe.seed, exclude=special)


def pretraining_probe(params: Params, vocab_size: int, special_ids: tuple[int, ...]) -> torch.Tensor:
    """The probe pretraining logs every head's induction score on (`pretrain.probe`)."""
    p = params.pretrain.probe
    return repeated_random_tokens(vocab_size, p.sequences, p.half_len, p.seed, exclude=special_ids)


def influence_probe(inf: Influence, model_config, seed: int | None = None) -> torch.Tensor:
    """The tokens the influence probe f is evaluated on (`influence.probe_*`; `seed`: another draw)."""
    return probe_tokens(ProbeSettings(sequences=inf.probe_sequences, half_len=inf.probe_half_len,
                                      seed=inf.probe_seed if seed is None else seed), model_config, None)


def evaluation_probes(params: Params, model_config, vocab_size: int | None, seeds: list[int]) -> dict[int, torch.Tensor]:
    """Per run seed s, the evaluation probe `retrain.probe` drawn with seed `retrain.probe.seed + s`
    — a namespace of its own, so no arm is scored on the probe that chose its head and window or
    on the sequences the influence scores were computed on."""
    p = params.retrain.probe
    return {s: probe_tokens(ProbeSettings(sequences=p.sequences, half_len=p.half_len, seed=p.seed + s),
                            model_config, vocab_size) for s in seeds}


# ----------------------------------------------------------------------------- probe functions f
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
