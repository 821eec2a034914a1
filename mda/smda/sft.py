"""Supervised fine-tuning on a set of pairs, through the one training loop (`mda.train.loop.Trainer`).

The loss is on the response tokens only: `Trainer.step` takes per-target-token weights (1 on
response targets, 0 on prompt and padding targets; `mda.train.loop.batch_loss`). The optimizer is
AdamW with the pretraining recipe's betas and eps, linear warm-up then cosine decay; each
epoch visits the pairs in an order drawn from `(seed, epoch)`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm import tqdm

from mda.core.config import Pretrain, SftRecipe
from mda.smda.lm import LM, response_batch, seeded_order
from mda.train.loop import Trainer


def recipe(sft: SftRecipe) -> Pretrain:
    """The SFT recipe as the Trainer's recipe (betas and eps: the pretraining defaults)."""
    return Pretrain(lr=sft.lr, warmup_steps=sft.warmup_steps, min_lr_ratio=sft.min_lr_ratio,
                    weight_decay=sft.weight_decay, grad_clip=sft.grad_clip)


def fine_tune(lm: LM, pairs: list[tuple[list[int], list[int]]], sft: SftRecipe, seed: int,
              desc: str = "sft", on_step: Callable[[int, float, float], None] | None = None) -> list[dict]:
    """Train `lm.model` in place on the (prompt ids, response ids) pairs; return the loss log.
    Leaves the model in eval mode."""
    steps_per_epoch = math.ceil(len(pairs) / sft.batch_size)
    total = steps_per_epoch * sft.epochs
    log: list[dict] = []
    if total == 0:
        return log
    torch.manual_seed(seed)  # nothing here samples, but a model with dropout would
    trainer = Trainer(lm.model, recipe(sft), total_steps=total, rt=lm.rt)
    bar = tqdm(total=total, desc=desc, unit="step")
    step = 0
    for epoch in range(sft.epochs):
        order = seeded_order(len(pairs), seed, epoch)
        for start in range(0, len(pairs), sft.batch_size):
            batch = [pairs[i] for i in order[start:start + sft.batch_size]]
            ids, weights = response_batch(batch, lm.pad_id)
            lr = trainer.lr
            loss = trainer.step(ids, weights)  # the Trainer moves, micro-batches and autocasts
            # The Trainer normalises by every target token; report the mean response-token loss.
            response_loss = loss * weights.numel() / float(weights.sum())
            log.append({"step": step, "epoch": epoch, "loss": response_loss, "lr": lr})
            if on_step:
                on_step(step, response_loss, lr)
            step += 1
            bar.update(1)
    bar.close()
    lm.model.eval()
    return log
