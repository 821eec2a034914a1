"""The one training loop: pretraining and every retraining arm run through `Trainer.step`.

Pythia's recipe, scaled down: AdamW β=(0.9, 0.95), ε=1e-8, weight decay on matrices
only, gradient clipping at 1.0, linear warm-up then cosine decay to `min_lr_ratio` of
the peak. The loss of a step is the sum over the batch of each row's token losses,
weighted per row, divided by the number of target tokens in the batch — so a row
with weight 0 contributes exactly nothing and the other rows' gradients are the ones
they would have had anyway (the rule interventions rely on).

A checkpoint at step N holds the model after N updates, i.e. before the batch whose
stream `step` is N; its trainer state lets training continue from there bit-exactly.
"""

from __future__ import annotations

import math
import os
import random
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mda.config import Pretrain


def pythia_save_steps(last_step: int, every: int) -> list[int]:
    """Pythia's revision schedule: 0, 1, 2, 4, …, 512, then every `every` steps, and the last step."""
    steps = {0, last_step}
    p = 1
    while p <= min(512, last_step):
        steps.add(p)
        p *= 2
    steps.update(range(every * (512 // every + 1), last_step + 1, every))
    return sorted(s for s in steps if s <= last_step)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for the update made at `step`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def token_losses(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(batch, row_len-1) next-token cross-entropy: inputs row[:-1], targets row[1:]."""
    logits = model(input_ids=input_ids[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), input_ids[:, 1:].flatten(),
                           reduction="none").view(input_ids.shape[0], -1)


def batch_loss(model, input_ids: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss of a step: weighted token losses summed, divided by all target tokens.
    `row_weights` is one weight per row (batch,) or, for SFT's loss on response tokens only
    (mda.smda), one per target token (batch, row_len-1)."""
    losses = token_losses(model, input_ids)
    if row_weights is not None:
        weights = row_weights if row_weights.ndim == 2 else row_weights[:, None]
        losses = losses * weights.to(losses.dtype)
    return losses.sum() / losses.numel()


class Trainer:
    """Optimizer, schedule and RNG bookkeeping around a model; `step()` makes one update."""

    def __init__(self, model, recipe: Pretrain, total_steps: int):
        self.model = model
        self.recipe = recipe
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]  # biases and LayerNorms
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": recipe.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=recipe.lr, betas=tuple(recipe.betas), eps=recipe.eps, foreach=False)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, recipe.warmup_steps, total_steps, recipe.min_lr_ratio))
        self.total_steps = total_steps

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, input_ids: torch.Tensor, row_weights: torch.Tensor | None = None) -> float:
        """One update on a batch; returns the batch's (weighted) mean token loss."""
        self.model.train()
        loss = batch_loss(self.model, input_ids, row_weights)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()

    def state_dict(self, next_step: int) -> dict:
        return {
            "next_step": next_step,  # the data cursor: the stream step to consume next
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "total_steps": self.total_steps,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate()},
        }

    def load_state_dict(self, state: dict) -> int:
        """Restore everything; returns the step to continue from."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        return int(state["next_step"])


def train_steps(trainer: Trainer, batches, save_steps: set[int],
                save: Callable[[int], None], end_step: int,
                on_update: Callable[[int, float, float], None] | None = None) -> None:
    """Consume `(step, input_ids[, row_weights])` batches in order; call `save(step)` at the
    start of each step in `save_steps` and at `end_step` (after the last update)."""
    for item in batches:
        step, ids = item[0], item[1]
        weights = item[2] if len(item) > 2 else None
        if step in save_steps:
            save(step)
        lr = trainer.lr
        loss = trainer.step(torch.as_tensor(ids), weights)
        if on_update:
            on_update(step, loss, lr)
    if end_step in save_steps:
        save(end_step)


def resume(checkpoint: str | os.PathLike, recipe: Pretrain) -> tuple[Trainer, int]:
    """Model, optimizer, schedule and RNG exactly as saved at `checkpoint`; and the next step."""
    from mda.model import load_model, load_trainer_state

    state = load_trainer_state(checkpoint)
    model = load_model(checkpoint)
    trainer = Trainer(model, recipe, total_steps=state["total_steps"])
    return trainer, trainer.load_state_dict(state)
