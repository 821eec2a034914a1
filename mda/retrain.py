"""Stage `retrain`: counterfactual training from the window start with a stream edit.

The run resumes the checkpoint at the window start (model, AdamW, schedule, RNG, data
cursor), replays the recorded stream to the window end (+ `tail_steps`) with the arm's edit
(`mda.interventions`), and scores every head every `eval_every` steps with `mda.units`
through `mda.locate.checkpoint_metrics` — the code `locate` uses.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from mda.compute import runtime
from mda.config import Params, ProbeSettings
from mda.data.corpus import read_heldout
from mda.data.stream import Stream
from mda.errors import MdaError
from mda.interventions import (StreamEdit, arm_set, augmentation, motif_profile, motif_rows,
                               removal, upweighting)
from mda.locate import checkpoint_metrics, probe_tokens
from mda.model import TRAINER_STATE, load_model, save_model, step_dir
from mda.train import Trainer, resume


def eval_probes(params: Params, config, vocab_size: int | None, seeds: list[int]) -> dict[int, torch.Tensor]:
    """Per seed, locate's probe with its seed offset by the run seed (seed 0 = locate's own)."""
    p = params.locate.probe
    return {s: probe_tokens(ProbeSettings(sequences=p.sequences, half_len=p.half_len, seed=p.seed + s),
                            config, vocab_size) for s in seeds}


def chosen_sets(sets: pd.DataFrame, params: Params, targets: dict) -> str:
    """The target whose sets the arms use (params select.target)."""
    names = sorted(sets.target.unique())
    wanted = params.select.target
    if wanted == "auto":
        wanted = "union" if "union" in names else targets["heads"][0]["name"]
    if wanted not in names:
        raise MdaError(f"select.target: no sets for {wanted!r} (have: {', '.join(names)})")
    return wanted


def build_edit(arm: str, seed: int, params: Params, sets: pd.DataFrame, target: str, stream: Stream,
               window: tuple[int, int]) -> StreamEdit:
    start, end = window
    if arm == "baseline":
        return StreamEdit(summary={"rule": "no change"})
    name = f"{target}:{arm_set(arm, seed)}"
    chosen = sets[sets.set == name]
    if chosen.empty:
        raise MdaError(f"data/select/sets.parquet: no set {name!r} for arm {arm} seed {seed}; rerun select")
    ids = set(chosen.sample_id.tolist())
    rows = stream.read(start, end - 1, columns=["sample_id", "step", "batch_pos"]).to_pandas()
    placement, copies = params.retrain.augment_placement, params.retrain.copies
    if arm.startswith("remove"):
        edit = removal(rows, ids, stream.batch_size)
    elif placement == "upweight" and arm != "augment-synthetic":
        edit = upweighting(rows, ids, stream.batch_size, copies)
    else:
        table = stream.read(start, end - 1, columns=["sample_id", "step", "input_ids"])
        mask = np.isin(table.column("sample_id").to_numpy(), list(ids))
        picked = table.filter(mask)
        steps = picked.column("step").to_numpy()
        tokens = np.stack(picked.column("input_ids").to_numpy(zero_copy_only=False))
        if arm == "augment-synthetic":
            profile = motif_profile(tokens[:1000])
            tokens = motif_rows(profile, len(tokens), tokens.shape[1], seed)
        # New rows have no weight of their own to raise: under `upweight` they go in place.
        where = "in_place" if placement == "upweight" else placement
        edit = augmentation(rows, list(zip(steps.tolist(), tokens)), ids, end - 1, copies, seed, where)
        if arm == "augment-synthetic":
            edit.summary["motifs"] = {"spans": int(len(profile["spans"])), "coverage": profile["coverage"]}
    if arm.startswith("augment"):
        edit.summary["augment_placement"] = placement  # the params value; `placement`: what this arm did
    edit.summary.update(set=name, set_size=len(ids))
    return edit


def start_trainer(params: Params, checkpoints: str | os.PathLike, start: int) -> tuple[Trainer, bool]:
    """Resume at the window start; or, where no trainer state was saved (hub checkpoints) and
    `retrain.fresh_optimizer` allows it, a fresh AdamW with warm-up (flagged)."""
    path = step_dir(checkpoints, start)
    if (path / TRAINER_STATE).is_file():
        trainer, next_step = resume(path, params.pretrain)
        if next_step != start:
            raise MdaError(f"{path / TRAINER_STATE}: data cursor at step {next_step}, expected {start}")
        return trainer, False
    if not params.retrain.fresh_optimizer:
        raise MdaError(f"{path / TRAINER_STATE}: missing — the window start has no optimizer state "
                       "(hub checkpoints never do); set retrain.fresh_optimizer: true to retrain with a "
                       "fresh AdamW and warm-up instead (flagged in the run)")
    model = load_model(path)
    return Trainer(model, params.pretrain, total_steps=params.pretrain.warmup_steps + 10 ** 9), True


def run_arm(params: Params, arm: str, seeds: list[int], edit_seed: int, corpus_dir, checkpoints,
            targets: dict, sets: pd.DataFrame, out: Path, vocab_size: int | None) -> dict:
    """Train one arm once; evaluate it with each of `seeds`' probes. Writes `out/` files."""
    runtime(params.compute)
    torch.use_deterministic_algorithms(True)
    start, end = int(targets["window"]["start"]), int(targets["window"]["end"])
    stream = Stream(Path(corpus_dir) / "stream")
    last = end - 1 + params.retrain.tail_steps
    if last > stream.last_step:
        raise MdaError(f"retrain.tail_steps: the run would need stream step {last}; the stream ends at {stream.last_step}")
    edit = build_edit(arm, edit_seed, params, sets, chosen_sets(sets, params, targets), stream, (start, end))
    trainer, fresh = start_trainer(params, checkpoints, start)
    model = trainer.model
    probes = eval_probes(params, model.config, vocab_size, seeds)
    heldout = torch.from_numpy(read_heldout(corpus_dir, params.locate.heldout_rows))
    rows, losses, reproduces = [], [], None

    def evaluate(step: int) -> None:
        model.eval()
        model_row = None  # held-out loss and ICL do not depend on the probe seed: once per step
        for seed, probe in probes.items():
            heads, row = checkpoint_metrics(model, probe, heldout if model_row is None else None,
                                            params.locate.max_sequences, full=False)
            model_row = model_row or row
            rows.append(heads.assign(step=step, seed=seed, **model_row))

    for step, ids, _ in tqdm(stream.batches(start, last), total=last - start + 1, desc=f"retrain {arm}", unit="step"):
        if (step - start) % params.retrain.eval_every == 0:
            evaluate(step)
        if step == end and arm == "baseline" and not fresh:
            reproduces = same_weights(model, step_dir(checkpoints, end))
        ids, weights = edit.apply(step, ids)
        loss = trainer.step(torch.as_tensor(ids), None if weights is None else torch.from_numpy(weights))
        losses.append((step, loss))
    evaluate(last + 1)
    if last + 1 == end and arm == "baseline" and not fresh:
        reproduces = same_weights(model, step_dir(checkpoints, end))
    save_model(model, out / "model")
    trajectory = pd.concat(rows, ignore_index=True)
    cols = ["step", "seed", "layer", "head"]
    trajectory = trajectory[cols + [c for c in trajectory if c not in cols]]
    trajectory.to_parquet(out / "trajectory.parquet", index=False)
    pd.DataFrame(losses, columns=["step", "loss"]).to_parquet(out / "losses.parquet", index=False)
    return {"arm": arm, "seeds": seeds, "edit_seed": edit_seed, "window": [start, end], "last_step": last,
            "fresh_optimizer": fresh, "edit": edit.summary, "reproduces_original": reproduces,
            "threads": params.compute.threads}


def same_weights(model, checkpoint: Path) -> bool:
    """Bit-for-bit equality with the saved checkpoint's weights."""
    original = load_model(checkpoint).state_dict()
    return all(torch.equal(t, original[k]) for k, t in model.state_dict().items())
