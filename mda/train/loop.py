"""The one training loop: pretraining and every retraining arm run through `Trainer.step`.

Pythia's recipe, scaled down: AdamW β=(0.9, 0.95), ε=1e-8, weight decay on matrices
only, gradient clipping at 1.0, linear warm-up then cosine decay to `min_lr_ratio` of
the peak. The loss of a step is the sum over the batch of each row's token losses,
weighted per row, divided by the number of target tokens in the batch — so a row
with weight 0 contributes exactly nothing and the other rows' gradients are the ones
they would have had anyway (the rule interventions rely on).

A checkpoint at step N holds the model after N updates, i.e. before the batch whose
stream `step` is N; its trainer state lets training continue from there bit-exactly.

Scale (`mda.core.compute`): every rank is handed the step's whole batch and trains on its own
contiguous rows (`Runtime.shard`), `compute.micro_batch` rows per forward, accumulating
gradients; the loss normaliser is still the whole step's token count, so the summed
gradients equal the full batch's. The ranks' gradients are summed by one all-reduce of a
flat buffer (what DDP does, as a sum: our loss is already normalised by the global token
count), then every rank clips and steps identically. With one process and no micro-batches
this is exactly one forward and backward of the batch.

Speed: AdamW and the gradient clipping use PyTorch's multi-tensor (`foreach`) kernels, one call
over all parameters instead of a Python loop of small operations per parameter (PyTorch's
default on GPUs). On CPU they give the bits of the per-parameter loop (tests/test_speed_levers.py)
and save little there (0-2 % of a default step, of the optimizer's ~5 %). The fused AdamW
kernel makes the optimizer ~3x cheaper but rounds differently (benchmarks/default.py), so it is
not used.
"""

from __future__ import annotations

import math
import os
import random
from typing import Callable

import numpy as np
import torch

from mda.core.compute import Runtime
from mda.core.config import Pretrain
from mda.model.losses import token_losses


def pythia_save_steps(last_step: int, every: int) -> list[int]:
    """Pythia's revision schedule: 0, 1, 2, 4, …, 512, then every `every` steps, and the last step."""
    steps = {0, last_step}
    p = 1
    while p <= min(512, last_step):
        steps.add(p)
        p *= 2
    steps.update(range(every * (512 // every + 1), last_step + 1, every))
    return sorted(s for s in steps if s <= last_step)


def deterministic(device_type: str) -> None:
    """Deterministic kernels for training and its evaluations (bit-exact reruns and resumes).
    PyTorch then also fills every new tensor with NaN, which only guards code that reads memory
    it never wrote (ours does not: the same bits with and without, tests/test_speed_levers.py).
    The fill is switched off: it costs 2-4 % of a default step (benchmarks/default.py)."""
    torch.use_deterministic_algorithms(True, warn_only=device_type == "cuda")
    torch.utils.deterministic.fill_uninitialized_memory = False


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for the update made at `step`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_loss(model, input_ids: torch.Tensor, row_weights: torch.Tensor | None = None,
               normaliser: int | None = None) -> torch.Tensor:
    """The training loss of a step: weighted token losses summed, divided by all target tokens
    of the step (`normaliser`; default: those of `input_ids`, i.e. the batch is the whole step).
    `row_weights` is one weight per row (batch,) or, for SFT's loss on response tokens only
    (mda.smda), one per target token (batch, row_len-1)."""
    losses = token_losses(model, input_ids)
    if row_weights is not None:
        weights = row_weights if row_weights.ndim == 2 else row_weights[:, None]
        losses = losses * weights.to(losses.dtype)
    return losses.sum() / (normaliser or losses.numel())


class Trainer:
    """Optimizer, schedule and RNG bookkeeping around a model; `step()` makes one update.
    `foreach=False`: per-parameter loops instead of the multi-tensor kernels (the same bits,
    slower; kept for benchmarks/default.py's before/after)."""

    def __init__(self, model, recipe: Pretrain, total_steps: int, rt: Runtime | None = None,
                 foreach: bool = True):
        self.rt = rt or Runtime(device=torch.device("cpu"), dtype=torch.float32, micro_batch=None,
                                threads=torch.get_num_threads())
        self.model = model.to(self.rt.device)
        self.recipe = recipe
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]  # biases and LayerNorms
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": recipe.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=recipe.lr, betas=tuple(recipe.betas), eps=recipe.eps, foreach=foreach)
        self.foreach = foreach
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, recipe.warmup_steps, total_steps, recipe.min_lr_ratio))
        self.total_steps = total_steps

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, input_ids: torch.Tensor, row_weights: torch.Tensor | None = None,
             observe=None) -> float:
        """One update on a step's whole batch (every rank passes the same one); returns the
        batch's (weighted) mean token loss. `observe(grads)`, if given, sees the clipped gradients
        the update is about to use (the exact estimator keeps them)."""
        loss = self.accumulate(input_ids, row_weights)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip, foreach=self.foreach)
        if observe is not None:
            observe([p.grad for p in self.model.parameters()])
        self.optimizer.step()
        self.scheduler.step()
        return loss

    def accumulate(self, input_ids: torch.Tensor, row_weights: torch.Tensor | None = None) -> float:
        """The step's gradients in `.grad` (this rank's rows, micro-batch by micro-batch, then
        summed over ranks) and the step's loss; no update."""
        rt, model = self.rt, self.model
        model.train()
        mine = rt.shard(len(input_ids))
        ids = input_ids[mine.start:mine.stop].to(rt.device)
        weights = None if row_weights is None else row_weights[mine.start:mine.stop].to(rt.device)
        normaliser = input_ids.shape[0] * (input_ids.shape[1] - 1)
        micro = rt.micro_batch or len(ids)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=rt.device)
        for i in range(0, len(ids), micro):
            with rt.autocast():
                loss = batch_loss(model, ids[i:i + micro], None if weights is None else weights[i:i + micro],
                                  normaliser)
            loss.backward()
            total += loss.detach()
        if rt.distributed:
            self._sum_gradients()
            rt.all_reduce_sum(total)
        return total.item()

    def _sum_gradients(self) -> None:
        """Sum every parameter's gradient over the ranks, as one flat buffer."""
        params = list(self.model.parameters())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch._utils._flatten_dense_tensors(grads)
        self.rt.all_reduce_sum(flat)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)

    def seek(self, step: int) -> None:
        """Make the next update use the learning rate the schedule gives update `step`."""
        self.scheduler.last_epoch = step - 1
        self.scheduler.step()

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
        for group in self.optimizer.param_groups:  # a saved state carries the kernel choice of its writer
            group["foreach"] = self.foreach
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


def resume(checkpoint: str | os.PathLike, recipe: Pretrain, rt: Runtime | None = None) -> tuple[Trainer, int]:
    """Model, optimizer, schedule and RNG exactly as saved at `checkpoint`; and the next step.
    (Any number of ranks can resume it: the state is the same on every rank.)"""
    from mda.model.neox import load_model, load_trainer_state

    state = load_trainer_state(checkpoint)
    model = load_model(checkpoint)
    trainer = Trainer(model, recipe, total_steps=state["total_steps"], rt=rt)
    return trainer, trainer.load_state_dict(state)
