"""The retraining loop: resume the window start's trainer state and replay the recorded stream
with a stream edit, one `Trainer.step` per step — every arm's and every LDS subset's training."""

from __future__ import annotations

import os
from typing import Callable

import torch
from tqdm import tqdm

from mda.core.config import Params
from mda.core.errors import MdaError
from mda.data.stream import Stream
from mda.intervene.edits import StreamEdit
from mda.model.neox import TRAINER_STATE, load_model, step_dir
from mda.train.loop import Trainer, resume


def start_trainer(params: Params, checkpoints: str | os.PathLike, start: int, rt) -> tuple[Trainer, bool]:
    """Resume at the window start; or, where no trainer state was saved (hub checkpoints) and
    `retrain.fresh_optimizer` allows it, a fresh AdamW with warm-up (flagged)."""
    path = step_dir(checkpoints, start)
    if (path / TRAINER_STATE).is_file():
        trainer, next_step = resume(path, params.pretrain, rt)
        if next_step != start:
            raise MdaError(f"{path / TRAINER_STATE}: data cursor at step {next_step}, expected {start}")
        return trainer, False
    if not params.retrain.fresh_optimizer:
        raise MdaError(f"{path / TRAINER_STATE}: missing — the window start has no optimizer state "
                       "(hub checkpoints never do); set retrain.fresh_optimizer: true to retrain with a "
                       "fresh AdamW at the schedule's learning rate instead (flagged in the run; exact at step 0)")
    model = load_model(path)
    # Fresh AdamW moments, the learning rate the schedule has at `start` (exact at step 0, where
    # Pythia's optimizer starts fresh too).
    total = params.pretrain.total_steps or params.pretrain.warmup_steps + 10 ** 9
    trainer = Trainer(model, params.pretrain, total_steps=total, rt=rt)
    trainer.seek(start)
    return trainer, True


def replay(trainer: Trainer, stream: Stream, edit: StreamEdit, first: int, last: int, losses: list,
           before_step: Callable[[int], None] | None = None, desc: str = "retrain") -> None:
    """The retraining loop (every arm's and every LDS subset's): the recorded stream's steps
    first..last with `edit` applied, one `Trainer.step` each, appending (step, loss) to `losses`;
    `before_step(step)` runs ahead of each update (evaluations, resume points)."""
    for step, ids, _ in tqdm(stream.batches(first, last), total=last - first + 1, desc=desc,
                             unit="step", disable=not trainer.rt.is_main):
        if before_step is not None:
            before_step(step)
        ids, weights = edit.apply(step, ids)
        loss = trainer.step(torch.as_tensor(ids), None if weights is None else torch.from_numpy(weights))
        losses.append((step, loss))


def train_edit(params: Params, checkpoints, stream: Stream, window: tuple[int, int], edit: StreamEdit,
               rt, desc: str = "retrain") -> tuple[torch.nn.Module, bool]:
    """(the model at the window end, fresh optimizer?) after training from the window start
    (`start_trainer`) through `replay` with `edit` — an arm's run without its evaluations and
    resume points (the LDS stage's unit of work). `window`: stream steps [start, end)."""
    torch.use_deterministic_algorithms(True, warn_only=rt.device.type == "cuda")
    (trainer, fresh), (start, end) = start_trainer(params, checkpoints, window[0], rt), window
    rt.prepare(trainer.model)
    replay(trainer, stream, edit, start, end - 1, [], desc=desc)
    return trainer.model, fresh
