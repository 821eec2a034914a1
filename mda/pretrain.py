"""Stage `checkpoints`: pretrain a tiny Pythia-architecture model on the stream, saving
checkpoints on Pythia's revision schedule (or fetch real Pythia revisions from the hub)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from mda.compute import runtime
from mda.config import Params
from mda.data.stream import Stream
from mda.errors import MdaError
from mda.io import read_json
from mda.model import TRAINER_STATE, neox_config, new_model, save_model, step_dir
from mda.train import Trainer, pythia_save_steps, train_steps
from mda.units import attention_patterns, prefix_matching_score, repeated_random_tokens


@dataclass
class PretrainLog:
    """What the run did: per-update loss/lr, and the induction score at each checkpoint."""

    losses: list[tuple[int, float, float]] = field(default_factory=list)  # (step, loss, lr)
    induction: dict[int, list[list[float]]] = field(default_factory=dict)  # step -> [layer][head]


def induction_probe_tokens(params: Params, vocab_size: int, special_ids: tuple[int, ...]) -> torch.Tensor:
    p = params.pretrain.probe
    return repeated_random_tokens(vocab_size, p.sequences, p.half_len, p.seed, exclude=special_ids)


def induction_scores(model, probe_tokens: torch.Tensor) -> torch.Tensor:
    """(layers, heads) prefix-matching score."""
    model.eval()
    return prefix_matching_score(attention_patterns(model, probe_tokens), probe_tokens)


def read_corpus_meta(corpus_dir: str | os.PathLike) -> dict:
    return read_json(Path(corpus_dir) / "meta.json", "run the corpus stage first")


def pretrain(params: Params, corpus_dir: str | os.PathLike, out: str | os.PathLike,
             on_update: Callable[[int, float, float], None] | None = None,
             on_checkpoint: Callable[[int, torch.Tensor], None] | None = None) -> PretrainLog:
    """Train from scratch over the whole stream; write `out/step<N>/` checkpoints."""
    runtime(params.compute)
    torch.use_deterministic_algorithms(True)
    meta = read_corpus_meta(corpus_dir)
    if meta["seq_len"] > params.model.max_position_embeddings:
        raise MdaError(f"{corpus_dir}/meta.json: seq_len {meta['seq_len']} exceeds "
                       f"model.max_position_embeddings {params.model.max_position_embeddings}")
    stream = Stream(Path(corpus_dir) / "stream")
    if stream.first_step != 0:
        raise MdaError(f"{corpus_dir}: the stream starts at step {stream.first_step}; pretraining "
                       "from scratch needs corpus.start_step: 0")
    first, last = stream.first_step, stream.last_step + 1  # checkpoint `last` follows the final update
    config = neox_config(params.model, meta["vocab_size"])
    model = new_model(config, params.model.init_seed)
    trainer = Trainer(model, params.pretrain, total_steps=last)
    probe = induction_probe_tokens(params, config.vocab_size, special_ids=(0, 1))
    save_steps = set(pythia_save_steps(last, params.pretrain.save_every))
    log = PretrainLog()

    def save(step: int) -> None:
        path = step_dir(out, step)
        save_model(model, path)
        torch.save(trainer.state_dict(next_step=step), path / TRAINER_STATE)
        scores = induction_scores(model, probe)
        log.induction[step] = scores.tolist()
        if on_checkpoint:
            on_checkpoint(step, scores)

    bar = tqdm(total=last - first, desc="pretrain", unit="step")

    def update(step: int, loss: float, lr: float) -> None:
        log.losses.append((step, loss, lr))
        bar.update(1)
        if step % params.pretrain.log_every == 0:
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        if on_update:
            on_update(step, loss, lr)

    batches = ((step, ids) for step, ids, _ in stream.batches(first, last - 1))
    train_steps(trainer, batches, save_steps, save, end_step=last, on_update=update)
    bar.close()
    return log


def checkpoint_induction_scores(params: Params, root: str | os.PathLike) -> dict[int, list[list[float]]]:
    """Induction score of every saved checkpoint under `root` (for checkpoints not trained here)."""
    from mda.model import load_model, saved_steps

    out, probe = {}, None
    for step in tqdm(saved_steps(root), desc="induction scores", unit="ckpt"):
        model = load_model(step_dir(root, step))
        if probe is None:  # one vocabulary for all revisions of a model
            special = tuple(sorted({model.config.bos_token_id, model.config.eos_token_id} - {None}))
            probe = induction_probe_tokens(params, model.config.vocab_size, special)
        out[step] = induction_scores(model, probe).tolist()
    return out
