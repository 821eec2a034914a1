"""Stage `retrain`: one arm's counterfactual training from the window start, evaluated as it goes.

The run resumes the checkpoint at the window start (model, AdamW, schedule, RNG, data
cursor), replays the recorded stream to the window end (+ `tail_steps`) with the arm's edit
(`mda.intervene.edits`), and scores every head every `eval_every` steps with `mda.units.metrics`
through `mda.units.measure.checkpoint_metrics` — the code `locate` uses.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mda.core.identity import checkpoint_digest, code_version, describe_mismatch, files_digest, value_digest
from mda.core.compute import check_batching, runtime
from mda.core.config import Params
from mda.data.corpus import read_heldout
from mda.data.stream import Stream
from mda.core.errors import MdaError
from mda.intervene.arms import build_edit, chosen_sets
from mda.intervene.edits import StreamEdit
from mda.intervene.replay import replay, start_trainer
from mda.core.io import atomic_dir, clean_debris_in, read_json, write_json
from mda.units.measure import checkpoint_metrics
from mda.units.probes import evaluation_probes
from mda.model.neox import TRAINER_STATE, load_model, save_model, step_dir
from mda.train.loop import deterministic, resume


def arm_identity(params: Params, arm: str, seeds: list[int], edit: StreamEdit, checkpoints, stream: Stream,
                 window: tuple[int, int], last: int) -> dict:
    """What an arm's run depends on: a resumed run must continue the same one."""
    return {"arm": arm, "seeds": seeds, "window": list(window), "last_step": last,
            "start_checkpoint": checkpoint_digest(step_dir(checkpoints, window[0])),
            "stream": files_digest(stream.parts(window[0], last)), "edit": value_digest(edit.summary),
            "edit_rows": edit_digest(edit), "params": value_digest([params.retrain.model_dump(), params.pretrain.model_dump(),
                                                                      params.locate.heldout_rows, params.locate.max_sequences,
                                                                      params.compute.threads]),
            "code": code_version("mda.intervene.retrain")}


def edit_digest(edit: StreamEdit) -> str:
    h = hashlib.sha256()
    for step in sorted(edit.weights):
        h.update(f"w{step}".encode() + edit.weights[step].tobytes())
    for step in sorted(edit.replace):
        for pos in sorted(edit.replace[step]):
            h.update(f"r{step}:{pos}".encode() + np.asarray(edit.replace[step][pos], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


RESUME = "resume"


def run_arm(params: Params, arm: str, seeds: list[int], edit_seed: int, corpus_dir, checkpoints,
            targets: dict, sets: pd.DataFrame, out: Path | None, vocab_size: int | None, work: Path) -> dict:
    """Train one arm once; evaluate it with each of `seeds`' probes; rank 0 writes `out/` files.

    `work` keeps a resume point (model, trainer state, the trajectory so far) at every
    evaluation: a run killed anywhere continues from its last one when rerun with the same
    inputs, and ends with the same bytes as an uninterrupted run."""
    rt = runtime(params.compute)
    deterministic(rt.device.type)
    start, end = int(targets["window"]["start"]), int(targets["window"]["end"])
    stream = Stream(Path(corpus_dir) / "stream")
    check_batching(rt.world_size, rt.micro_batch, stream.batch_size)
    last = end - 1 + params.retrain.tail_steps
    if last > stream.last_step:
        raise MdaError(f"retrain.tail_steps: the run would need stream step {last}; the stream ends at {stream.last_step}")
    edit = build_edit(arm, edit_seed, params, sets, chosen_sets(sets, params, targets), stream, (start, end))
    identity = arm_identity(params, arm, seeds, edit, checkpoints, stream, (start, end), last)
    resumed = open_work(work, identity, rt)
    if resumed:
        trainer, first = resume(work / RESUME, params.pretrain, rt)
        state = read_json(work / RESUME / "progress.json", "rerun the retrain stage")
        rows = [pd.read_parquet(work / RESUME / "trajectory.parquet")]
        losses, reproduces, fresh = [tuple(x) for x in state["losses"]], state["reproduces"], state["fresh"]
        print(f"{work}: resuming at step {first}", flush=True)
    else:
        (trainer, fresh), first = start_trainer(params, checkpoints, start, rt), start
        rows, losses, reproduces = [], [], None
    model = rt.prepare(trainer.model)
    probes = evaluation_probes(params, model.config, vocab_size, seeds)
    heldout = torch.from_numpy(read_heldout(corpus_dir, params.locate.heldout_rows))

    def evaluate(step: int) -> None:
        if rt.is_main:
            model.eval()
            model_row = None  # held-out loss and ICL do not depend on the probe seed: once per step
            for seed, probe in probes.items():
                heads, row = checkpoint_metrics(model, probe, heldout if model_row is None else None,
                                                params.locate.max_sequences, full=False)
                model_row = model_row or row
                rows.append(heads.assign(step=step, seed=seed, **model_row))
                release_freed_heap()  # else RSS grows with every probe seed's evaluation
        rt.barrier()

    def checkpoint(step: int) -> None:
        if rt.is_main:
            with atomic_dir(work / RESUME) as tmp:
                save_model(model, tmp)
                torch.save(trainer.state_dict(next_step=step), tmp / TRAINER_STATE)
                pd.concat(rows, ignore_index=True).to_parquet(tmp / "trajectory.parquet", index=False)
                write_json(tmp / "progress.json", {"losses": [list(x) for x in losses], "reproduces": reproduces,
                                                   "fresh": fresh})
        rt.barrier()

    def before_step(step: int) -> None:
        nonlocal reproduces
        if (step - start) % params.retrain.eval_every == 0 and not (resumed and step == first):
            evaluate(step)
            checkpoint(step)
        if step == end and arm == "baseline" and not fresh:
            reproduces = same_weights(model, step_dir(checkpoints, end))

    replay(trainer, stream, edit, first, last, losses, before_step, desc=f"retrain {arm}")
    evaluate(last + 1)
    if last + 1 == end and arm == "baseline" and not fresh:
        reproduces = same_weights(model, step_dir(checkpoints, end))
    meta = {"arm": arm, "seeds": seeds, "edit_seed": edit_seed, "window": [start, end], "last_step": last,
            "fresh_optimizer": fresh, "edit": edit.summary, "reproduces_original": reproduces,
            "threads": params.compute.threads}
    if rt.is_main:
        save_model(model, out / "model")
        trajectory = pd.concat(rows, ignore_index=True)
        cols = ["step", "seed", "layer", "head"]
        trajectory = trajectory[cols + [c for c in trajectory if c not in cols]]
        trajectory.to_parquet(out / "trajectory.parquet", index=False)
        pd.DataFrame(losses, columns=["step", "loss"]).to_parquet(out / "losses.parquet", index=False)
    return meta


def release_freed_heap() -> bool:
    """Return freed heap memory to the OS (glibc `malloc_trim`); False where there is none.

    Retraining interleaves training steps with evaluations whose attention patterns are freed
    straight away; glibc keeps the freed pages, fragmented, so a fixed arm scored with K probe
    seeds grew ~16 MiB per evaluation (5.2 GiB at K = 19, `benchmarks/results/peak-rss.json`)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return False
    trim(0)
    return True


def open_work(work: Path, identity: dict, rt) -> bool:
    """Whether `work` holds a resume point of this very run; otherwise empty it (one line if it
    held another run's) and record `identity`."""
    resumable = False
    if rt.is_main:
        clean_debris_in(work)
        stored = read_json(work / "identity.json", "") if (work / "identity.json").is_file() else None
        resumable = stored == {"identity": identity} and (work / RESUME).is_dir()
        if not resumable:
            if stored is not None and (work / RESUME).is_dir():
                print(f"{work}: a resume point of another run ({describe_mismatch(stored.get('identity'), identity)} "
                      "differ); starting over", flush=True)
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            write_json(work / "identity.json", {"identity": identity})
    return bool(rt.broadcast_object(resumable))


def same_weights(model, checkpoint: Path) -> bool:
    """Bit-for-bit equality with the saved checkpoint's weights."""
    original = load_model(checkpoint).state_dict()
    return all(torch.equal(t.cpu(), original[k]) for k, t in model.state_dict().items())
