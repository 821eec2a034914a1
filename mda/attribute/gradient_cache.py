"""Phase 2: per-sample training gradients of every target block over the window →
`shard-NNNNN.parquet` + `manifest.json`, resumable.

Shards cover fixed step ranges (`influence.shard_samples`), whatever the number of
processes; rank r writes its contiguous range of shards. Every shard records the identity of
what produced it (checkpoint weights, the window's stream parts, blocks, projection, dtype,
loss, code version): a rerun keeps a shard only when its identity and row count match, and
says in one line how many it recomputes and why. Rank 0 writes the manifest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from mda.core.identity import code_version, describe_mismatch
from mda.core.config import Influence
from mda.data.stream import Stream
from mda.core.errors import MdaError
from mda.model.heads import Block
from mda.attribute.capture import capture_batch, per_sample_gradients
from mda.attribute.window import Setup, WindowBatches, stream_key
from mda.core.io import atomic_file, clean_debris_in, read_json, write_json

MANIFEST = "manifest.json"
LOSS = "next-token cross-entropy, true labels, summed over the sequence's tokens"


def gradient_identity(inf: Influence, s: Setup, stream: Stream) -> dict:
    return {"checkpoint": s.checkpoint, "stream": stream_key(stream, *s.window), "blocks": s.blocks_key(),
            "projection": [inf.projection, inf.projection_seed] if inf.projection else None,
            "dtype": inf.dtype, "mode": inf.mode, "loss": LOSS, "code": code_version("mda.attribute.gradient_cache")}


def batch_gradients(s: Setup, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample training-loss gradients (true labels, summed over tokens) of every target
    block, from one backward pass: name → (batch, out, in), float32 or float64, on the model's device."""
    with s.rt.autocast():
        captured = capture_batch(s.model, ids, s.all_blocks, "true", projector=s.projector, where=s.where)
    return {name: per_sample_gradients(a, g) for name, (a, g) in captured.items()}


def grad_shape(s: Setup, b: Block) -> list[int]:
    """(out, in) of a block's stored gradient: the block's, or the projection's rank per side."""
    rank = s.projector.rank if s.projector else 0
    return [rank if 0 < rank < dim else dim for dim in b.shape(s.model)]


def shard_plan(first: int, last: int, steps_per_shard: int) -> list[tuple[int, int]]:
    return [(a, min(a + steps_per_shard - 1, last)) for a in range(first, last + 1, steps_per_shard)]


def _block_rows(s: Setup, grads: dict[str, torch.Tensor], sample_ids: np.ndarray, dtype) -> pa.Table:
    """One row per (block, sample), blocks contiguous (the order the scorer reads them in)."""
    parts = []
    for b in s.all_blocks:
        head, block = b.name.split("/")
        g = grads[b.name].reshape(len(sample_ids), -1).to(torch.float32).cpu().numpy().astype(dtype, copy=False)
        size = g.shape[1]
        values = pa.array(g.reshape(-1))
        parts.append(pa.table({
            "sample_id": pa.array(sample_ids, pa.int64()),
            "head": pa.array([head] * len(sample_ids), pa.string()),
            "block": pa.array([block] * len(sample_ids), pa.string()),
            "grad": pa.ListArray.from_arrays(pa.array(np.arange(0, (len(sample_ids) + 1) * size, size,
                                                                dtype=np.int32)), values)}))
    return pa.concat_tables(parts)


def _stored_identity(path: Path) -> tuple[dict | None, int, tuple[int, int] | None]:
    """(identity, rows, (first, last) steps) a shard records; (None, 0, None) if unreadable."""
    try:
        meta = pq.read_metadata(path)
        kv = meta.metadata or {}
        steps = (int(kv[b"mda.first_step"]), int(kv[b"mda.last_step"]))
        return json.loads(kv[b"mda.identity"]), meta.num_rows, steps
    except Exception:
        return None, 0, None


def cache_gradients(inf: Influence, s: Setup, stream: Stream, out: Path) -> tuple[dict, int]:
    """Write this rank's shards (reusing complete ones with the same identity) and, on rank 0,
    the manifest; returns the manifest and the number of reused shards on every rank. (The
    manifest is the same bytes however many shards a rerun reused.)"""
    out, rt = Path(out), s.rt
    first, last = s.window
    # Streaming mode scores without a cache (at Pythia's sizes one would take terabytes).
    plan = [] if inf.mode == "streaming" else shard_plan(first, last, max(1, inf.shard_samples // stream.batch_size))
    identity = gradient_identity(inf, s, stream)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        clean_debris_in(out)  # a killed run's half-written shards, whichever process wrote them
        for stale in set(out.glob("shard-*.parquet")) - {out / f"shard-{i:05d}.parquet" for i in range(len(plan))}:
            stale.unlink()  # from an earlier, longer window, or a cache streaming mode does not use
    rt.barrier()
    dtype = np.float16 if inf.dtype == "float16" else np.float32
    mine = rt.shard(len(plan))
    reused, redone, why = 0, 0, set()
    bar = tqdm(total=sum(b - a + 1 for a, b in plan[mine.start:mine.stop]) * stream.batch_size,
               desc="gradients", unit="sample", disable=not rt.is_main)
    for i in mine:
        a, b = plan[i]
        path = out / f"shard-{i:05d}.parquet"
        rows = (b - a + 1) * stream.batch_size * len(s.all_blocks)
        if path.is_file():
            stored, stored_rows, steps = _stored_identity(path)
            if stored == identity and stored_rows == rows and steps == (a, b):
                reused += 1
                bar.update((b - a + 1) * stream.batch_size)
                continue
            redone += 1
            why.add(describe_mismatch(stored, identity) if stored != identity else "incomplete")
        _write_shard(s, stream, path, (a, b), inf.batch_size, dtype, identity, bar)
    bar.close()
    counts = rt.gather_objects((reused, redone, sorted(why)))
    if rt.is_main and sum(c[1] for c in counts):
        reasons = sorted({r for c in counts for r in c[2]})
        print(f"{out}: {sum(c[1] for c in counts)} cached shard(s) made from other inputs or incomplete "
              f"({'; '.join(reasons)}); recomputed", flush=True)
    shards = [{"file": f"shard-{i:05d}.parquet", "first_step": a, "last_step": b,
               "samples": (b - a + 1) * stream.batch_size} for i, (a, b) in enumerate(plan)]
    manifest = {"mode": inf.mode, "step": s.step, "window": list(s.window), "heads": [h.name for h in s.heads],
                "blocks": inf.blocks, "shapes": {b.name: grad_shape(s, b) for b in s.all_blocks},
                "dtype": inf.dtype, "identity": identity,
                "projection": {"rank": inf.projection, "seed": inf.projection_seed} if inf.projection else None,
                "loss": LOSS, "samples": sum(x["samples"] for x in shards), "shards": shards}
    rt.barrier()
    if rt.is_main:
        write_json(out / MANIFEST, manifest)
    rt.barrier()
    return manifest, sum(c[0] for c in counts)


def _write_shard(s: Setup, stream: Stream, path: Path, steps: tuple[int, int], rows: int, dtype,
                 identity: dict, bar) -> None:
    a, b = steps
    metadata = {"mda.step": str(s.step), "mda.first_step": str(a), "mda.last_step": str(b),
                "mda.identity": json.dumps(identity, sort_keys=True)}
    writer = None
    with atomic_file(path) as tmp:
        # Batch by batch into row groups: a shard is never held in memory whole. No dictionary or
        # statistics on the gradient column: float noise gains nothing from them and they cost 6×
        # the write time and 50 % more disk.
        for _, ids, meta in WindowBatches(a, b, rows, stream.batch_size).read(stream):
            table = _block_rows(s, batch_gradients(s, ids), meta.column("sample_id").to_numpy(), dtype)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema.with_metadata(metadata),
                                          use_dictionary=["head", "block"], write_statistics=["sample_id"])
            writer.write_table(table.replace_schema_metadata(metadata))
            bar.update(len(ids))
        writer.close()


def read_manifest(directory: str | os.PathLike, identity: dict) -> dict:
    """The gradient cache's manifest, checked to be made from the inputs `identity` describes."""
    path = Path(directory) / MANIFEST
    manifest = read_json(path, "run the gradients stage")
    if manifest.get("identity") != identity:
        raise MdaError(f"{path}: gradients made from other inputs "
                       f"({describe_mismatch(manifest.get('identity'), identity)} differ); rerun the gradients stage")
    return manifest
