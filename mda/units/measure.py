"""Every head and the model measured at one checkpoint: what `locate` runs over the saved
checkpoints and every retraining arm runs every `retrain.eval_every` steps (one code path)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from mda.model.losses import token_losses
from mda.units.metrics import ATTENTION_METRICS, attention_patterns, copying_score, head_ablation_logprobs, icl_score

HELDOUT_ROWS_PER_FORWARD = 16
"""Held-out rows per forward: at the default shapes a training step's worth of logits (16 x 64
x 2,067); one forward of all 256 rows (135 MB of logits) only adds memory traffic: 10-30 % of
the held-out pass, which retraining runs every `retrain.eval_every` steps (benchmarks/default.py).
On CPU the losses are the same bits as in one forward (tested); every stage scores the held-out
rows through this function, so they agree with each other anyway."""


@torch.no_grad()
def checkpoint_metrics(model, probe: torch.Tensor, heldout: torch.Tensor | None,
                       max_sequences: int, full: bool = True) -> tuple[pd.DataFrame, dict]:
    """Per-head metrics (one row per head) and model-level metrics of one checkpoint.
    `full=False` (retraining's frequent evaluations) skips copying and the ablations;
    `heldout=None` skips the held-out loss and ICL score (they do not depend on the probe)."""
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    patterns = attention_patterns(model, probe)  # every head in one forward
    columns = {name: metric(patterns, probe) for name, metric in ATTENTION_METRICS.items()}
    if full:
        columns["copying"] = copying_score(model)
        clean, ablated = head_ablation_logprobs(model, probe, max_sequences)
        columns["induction_logprob_ablated"] = ablated
        columns["induction_logprob_drop"] = clean - ablated
    frame = pd.DataFrame({"layer": np.repeat(np.arange(layers), heads),
                          "head": np.tile(np.arange(heads), layers),
                          **{k: v.reshape(-1).double().cpu().numpy() for k, v in columns.items()}})
    model_row = {}
    if heldout is not None:
        device = next(model.parameters()).device
        rows_per_forward = min(max_sequences, HELDOUT_ROWS_PER_FORWARD)
        losses = torch.cat([token_losses(model, rows.to(device)).cpu() for rows in heldout.split(rows_per_forward)])
        model_row = {"heldout_loss": losses.mean().item(), "icl_score": icl_score(losses)}
    if full:
        model_row["induction_logprob"] = clean
    return frame, model_row
