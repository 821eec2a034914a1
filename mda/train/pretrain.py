"""Stage `checkpoints`: pretrain a tiny Pythia-architecture model on the stream, saving
checkpoints on Pythia's revision schedule (or fetch real Pythia revisions from the hub)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from mda.core.identity import code_version, describe_mismatch, file_digest, files_digest, value_digest
from mda.core.compute import check_batching, runtime
from mda.core.config import Params
from mda.data.corpus import read_corpus_meta
from mda.data.stream import Stream
from mda.core.errors import ConfigError, MdaError
from mda.core.io import atomic_dir, clean_debris_in, read_json, write_json
from mda.model.neox import (TRAINER_STATE, hub_initial_model, neox_config, new_model, save_model, saved_steps,
                       step_dir)
from mda.train.loop import Trainer, deterministic, pythia_save_steps, resume, train_steps
from mda.units.metrics import attention_patterns, prefix_matching_score
from mda.units.probes import pretraining_probe


@dataclass
class PretrainLog:
    """What the run did: per-update loss/lr, and the induction score at each checkpoint."""

    losses: list[tuple[int, float, float]] = field(default_factory=list)  # (step, loss, lr)
    induction: dict[int, list[list[float]]] = field(default_factory=dict)  # step -> [layer][head]


def induction_scores(model, probe_tokens: torch.Tensor) -> torch.Tensor:
    """(layers, heads) prefix-matching score."""
    model.eval()
    return prefix_matching_score(attention_patterns(model, probe_tokens), probe_tokens)


RUN_FILE = "run.json"
LOG_FILE = "log.json"


def pretrain_identity(params: Params, corpus_dir: str | os.PathLike) -> dict:
    """What a pretraining run's checkpoints depend on (the compute settings are not part of it:
    a run may resume with another number of ranks or micro-batches)."""
    stream = Stream(Path(corpus_dir) / "stream")
    return {"stream": files_digest(stream.files), "corpus_meta": file_digest(Path(corpus_dir) / "meta.json"),
            "model": value_digest(params.model.model_dump()), "pretrain": value_digest(params.pretrain.model_dump()),
            "code": code_version("mda.train.pretrain")}


def open_run(out: Path, identity: dict, rt) -> list[int]:
    """Make `out` hold only checkpoints of the run `identity` describes; return their steps.
    Debris of a killed run is removed; checkpoints of another run are discarded (one line)."""
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        clean_debris_in(out)
        stored = read_json(out / RUN_FILE, "") if (out / RUN_FILE).is_file() else None
        existing = [p for p in out.iterdir() if p.name.startswith("step") and p.is_dir()]
        if stored is not None and stored.get("identity") != identity or stored is None and existing:
            if existing:
                why = describe_mismatch(stored and stored.get("identity"), identity)
                print(f"{out}: {len(existing)} checkpoint(s) made by another run ({why} differ); starting over",
                      flush=True)
            for p in existing:
                shutil.rmtree(p)
        write_json(out / RUN_FILE, {"identity": identity})
    rt.barrier()
    return saved_steps(out) if any(p.is_dir() for p in out.glob("step*")) else []


def hub_identity(params: Params) -> dict:
    hub = params.model.hub
    return {"hub": hub.repo_id, "revisions": list(hub.revisions), "code": code_version("mda.model.neox")}


def pretrain(params: Params, corpus_dir: str | os.PathLike, out: str | os.PathLike,
             on_update: Callable[[int, float, float], None] | None = None,
             on_checkpoint: Callable[[int, torch.Tensor], None] | None = None) -> PretrainLog:
    """Train from scratch over the whole stream, writing `out/step<N>/` checkpoints as it goes
    (each complete or absent). A rerun of the same run resumes from its last checkpoint."""
    rt = runtime(params.compute)
    deterministic(rt.device.type)
    out = Path(out)
    meta = read_corpus_meta(corpus_dir)
    if meta["seq_len"] > params.model.max_position_embeddings:
        raise MdaError(f"{corpus_dir}/meta.json: seq_len {meta['seq_len']} exceeds "
                       f"model.max_position_embeddings {params.model.max_position_embeddings}")
    stream = Stream(Path(corpus_dir) / "stream")
    if stream.first_step != 0:
        raise MdaError(f"{corpus_dir}: the stream starts at step {stream.first_step}; pretraining "
                       "from scratch needs corpus.start_step: 0")
    check_batching(rt.world_size, rt.micro_batch, stream.batch_size)
    first, last = stream.first_step, stream.last_step + 1  # checkpoint `last` follows the final update
    if not (params.model.vocab_size or meta["vocab_size"]):
        raise ConfigError("params: model.vocab_size: needed when the corpus has no tokenizer (Pythia: 50304)")
    config = neox_config(params.model, meta["vocab_size"])
    # Pythia's own initial weights are fetched (and their shape checked) before anything is written.
    hub_initial = hub_initial_model(params.model.hub, params.model) if params.pretrain.init == "hub" else None
    done = open_run(out, pretrain_identity(params, corpus_dir), rt)
    probe = pretraining_probe(params, config.vocab_size, special_ids=(0, 1))
    total = params.pretrain.total_steps or last
    save_steps = set(pythia_save_steps(last, params.pretrain.save_every))
    log = PretrainLog()
    for step in done:  # what the run did before it was stopped
        entry = read_json(step_dir(out, step) / LOG_FILE, "rerun the checkpoints stage")
        log.losses += [tuple(x) for x in entry["losses"]]
        log.induction[step] = entry["induction"]
    if done:
        trainer, start = resume(step_dir(out, done[-1]), params.pretrain, rt)
        print(f"{out}: resuming at step {start} (checkpoints up to it are complete)", flush=True)
    else:
        initial = hub_initial or new_model(config, params.model.init_seed)
        trainer, start = Trainer(initial, params.pretrain, total_steps=total, rt=rt), first
    rt.prepare(trainer.model)
    model = trainer.model

    def save(step: int) -> None:
        if step in log.induction:  # the checkpoint we resumed from
            return
        scores = induction_scores(model, probe)
        since = [x for x in log.losses if x[0] >= max([s for s in log.induction if s < step], default=-1)]
        log.induction[step] = scores.tolist()
        if rt.is_main:
            with atomic_dir(step_dir(out, step)) as tmp:
                save_model(model, tmp)
                torch.save(trainer.state_dict(next_step=step), tmp / TRAINER_STATE)
                write_json(tmp / LOG_FILE, {"losses": [list(x) for x in since], "induction": scores.tolist()})
        rt.barrier()
        if on_checkpoint:
            on_checkpoint(step, scores)

    bar = tqdm(total=last - first, initial=start - first, desc="pretrain", unit="step", disable=not rt.is_main)

    def update(step: int, loss: float, lr: float) -> None:
        log.losses.append((step, loss, lr))
        bar.update(1)
        if step % params.pretrain.log_every == 0:
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        if on_update:
            on_update(step, loss, lr)

    if start < last:
        batches = ((step, ids) for step, ids, _ in stream.batches(start, last - 1))
        train_steps(trainer, batches, save_steps, save, end_step=last, on_update=update)
    bar.close()
    return log


def checkpoint_induction_scores(params: Params, root: str | os.PathLike) -> dict[int, list[list[float]]]:
    """Induction score of every saved checkpoint under `root` (for checkpoints not trained here)."""
    from mda.model.neox import load_model, saved_steps

    out, probe = {}, None
    for step in tqdm(saved_steps(root), desc="induction scores", unit="ckpt"):
        model = load_model(step_dir(root, step))
        if probe is None:  # one vocabulary for all revisions of a model
            special = tuple(sorted({model.config.bos_token_id, model.config.eos_token_id} - {None}))
            probe = pretraining_probe(params, model.config.vocab_size, special)
        out[step] = induction_scores(model, probe).tolist()
    return out
