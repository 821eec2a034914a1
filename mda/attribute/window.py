"""What the three influence phases share: the model at the influence step, the target heads'
blocks, the formation window, and the window's samples in fixed batches.

Batches are numbered over the window (every `stride`-th step, `rows` samples each), whatever
the number of processes: rank r of a distributed stage takes its contiguous range of batch
numbers (`Runtime.shard`), so the work is split without changing what any batch holds.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from mda.core.identity import checkpoint_digest, files_digest, value_digest
from mda.core.compute import Runtime
from mda.core.config import Influence
from mda.data.stream import Stream
from mda.core.errors import MdaError
from mda.model.heads import Block, Head, check_head, head_blocks
from mda.attribute.capture import Projector
from mda.model.neox import load_model, step_dir

UNIT_PROBE = {"induction": "induction", "previous_token": "prev_token"}


@dataclass
class Setup:
    """Everything the three phases share: model at the influence step, heads, blocks, window."""

    model: torch.nn.Module
    step: int
    heads: list[Head]
    blocks: dict[str, list[Block]]  # head name → its blocks
    window: tuple[int, int]         # stream steps [first, last] inclusive
    projector: Projector | None
    probe: str
    checkpoint: str                 # digest of the influence checkpoint's weights and config
    rt: Runtime

    @property
    def all_blocks(self) -> list[Block]:
        return [b for h in self.heads for b in self.blocks[h.name]]

    @property
    def where(self) -> str:
        return f" at step {self.step}"

    def blocks_key(self) -> str:
        """Digest of which weights the blocks are (names, layers, modules, rows/columns)."""
        return value_digest([[b.name, b.layer, b.module, b.out_index, b.in_index] for b in self.all_blocks])


def setup(inf: Influence, checkpoints: str | os.PathLike, targets: dict, rt: Runtime,
          dtype: torch.dtype = torch.float32) -> Setup:
    """The influence checkpoint's model (weights in `dtype`; float64 in exactness tests) on the
    runtime's device, the target heads' blocks, the window and the probe."""
    step = int(targets["influence_step"])
    path = step_dir(checkpoints, step)
    model = rt.prepare(load_model(path, dtype=dtype))
    heads = []
    for h in targets["heads"]:
        head = Head(int(h["layer"]), int(h["head"]))
        try:
            check_head(model.config.num_hidden_layers, model.config.num_attention_heads, head,
                       "targets.json: head")
        except ValueError as err:
            raise MdaError(str(err)) from None
        heads.append(head)
    start, end = int(targets["window"]["start"]), int(targets["window"]["end"])
    if end <= start:
        raise MdaError(f"targets.json: window {start}..{end} is empty")
    probe = UNIT_PROBE[targets["unit"]] if inf.probe == "auto" else inf.probe
    return Setup(model, step, heads, {h.name: head_blocks(model.config, h, inf.blocks) for h in heads},
                 (start, end - 1), Projector(inf.projection, inf.projection_seed) if inf.projection else None,
                 probe, checkpoint_digest(path), rt)


def stream_key(stream: Stream, first: int, last: int) -> str:
    """Digest of the stream part files that hold steps first..last."""
    return files_digest(stream.parts(first, last))


# ----------------------------------------------------------------------------- numbered batches
@dataclass(frozen=True)
class WindowBatches:
    """The window's samples as numbered batches: every `stride`-th step of [first, last], in stream
    order, `rows` samples per batch (the last one may be shorter)."""

    first: int
    last: int
    rows: int
    step_rows: int   # samples per stream step
    stride: int = 1

    @property
    def steps(self) -> range:
        return range(self.first, self.last + 1, self.stride)

    @property
    def samples(self) -> int:
        return len(self.steps) * self.step_rows

    def __len__(self) -> int:
        return math.ceil(self.samples / self.rows)

    def size(self, index: int) -> int:
        """Samples in batch `index`."""
        return min(self.rows, self.samples - index * self.rows)

    def read(self, stream: Stream, part: range | None = None) -> Iterator[tuple[int, torch.Tensor, pa.Table]]:
        """(batch number, input_ids (≤rows, row_len) int64, the rows' sample_id/step/domain) for the
        batches numbered in `part` (default: all), one stream row group in memory at a time."""
        part = range(len(self)) if part is None else part
        if not len(part):
            return
        lo, hi = part.start * self.rows, min(part.stop * self.rows, self.samples)  # sample offsets
        first_k, last_k = lo // self.step_rows, (hi - 1) // self.step_rows  # positions in self.steps
        buffer_start = first_k * self.step_rows  # sample offset of the buffer's first row
        ids: list[np.ndarray] = []
        meta: list[pa.Table] = []
        index = part.start
        for step, step_ids, table in stream.batches(self.steps[first_k], self.steps[last_k]):
            if (step - self.first) % self.stride:
                continue
            ids.append(step_ids)
            meta.append(table.select(["sample_id", "step", "domain"]))
            buffer_end = buffer_start + sum(len(x) for x in ids)
            while index < part.stop and buffer_end >= index * self.rows + self.size(index):
                all_ids, all_meta = np.concatenate(ids), pa.concat_tables(meta)
                start, n = index * self.rows - buffer_start, self.size(index)
                yield index, torch.from_numpy(all_ids[start:start + n]), all_meta.slice(start, n)
                ids, meta = [all_ids[start + n:]], [all_meta.slice(start + n)]
                buffer_start += start + n
                index += 1
