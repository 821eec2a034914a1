"""The training stream on disk: which sequence is consumed at which optimizer step.

One Parquet dataset (`stream/part-*.parquet`), one row per training sequence, schema
`STREAM_SCHEMA`. Row groups hold whole steps, so a step range is read without
touching the rest, and training reads one step's batch at a time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mda.errors import MdaError
from mda.io import atomic_file

STREAM_SCHEMA = pa.schema([
    ("sample_id", pa.int64()),
    ("step", pa.int64()),
    ("batch_pos", pa.int32()),
    ("domain", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
])

STEPS_PER_ROW_GROUP = 64


def stream_table(tokens: np.ndarray, domains: list[str], first_step: int, batch_size: int,
                 first_sample_id: int | None = None) -> pa.Table:
    """Rows `tokens` (n, row_len) laid out as consecutive steps of `batch_size` rows."""
    n, row_len = tokens.shape
    if n % batch_size:
        raise ValueError(f"{n} rows do not fill whole steps of {batch_size}")
    index = np.arange(n, dtype=np.int64)
    first_id = first_step * batch_size if first_sample_id is None else first_sample_id
    flat = pa.array(np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1))
    offsets = pa.array(np.arange(0, (n + 1) * row_len, row_len, dtype=np.int32))
    return pa.Table.from_arrays([
        pa.array(first_id + index),
        pa.array(first_step + index // batch_size),
        pa.array((index % batch_size).astype(np.int32)),
        pa.array(domains, pa.string()),
        pa.ListArray.from_arrays(offsets, flat),
    ], schema=STREAM_SCHEMA)


class StreamWriter:
    """Appends steps to `stream/part-NNNNN.parquet` files, each written atomically."""

    def __init__(self, directory: str | os.PathLike, batch_size: int,
                 steps_per_file: int = 1024):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.batch_size = batch_size
        self.steps_per_file = steps_per_file
        self.parts = 0

    def write(self, table: pa.Table) -> None:
        rows = self.steps_per_file * self.batch_size
        for start in range(0, table.num_rows, rows):
            with atomic_file(self.dir / f"part-{self.parts:05d}.parquet") as tmp:
                pq.write_table(table.slice(start, rows), tmp,
                               row_group_size=STEPS_PER_ROW_GROUP * self.batch_size)
            self.parts += 1


class Stream:
    """Read access to a stream directory written by `StreamWriter`."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.files = sorted(self.dir.glob("part-*.parquet"))
        if not self.files:
            raise MdaError(f"{self.dir}: no stream files (part-*.parquet); run the corpus stage")
        self._index = []  # (file, row_group, first_step, last_step)
        for f in self.files:
            try:
                meta = pq.ParquetFile(f).metadata
            except Exception as err:  # pyarrow raises several types for damaged files
                raise MdaError(f"{f}: unreadable Parquet ({err})") from None
            col = meta.schema.to_arrow_schema().get_field_index("step")
            for rg in range(meta.num_row_groups):
                stats = meta.row_group(rg).column(col).statistics
                self._index.append((f, rg, stats.min, stats.max))
        self.first_step = self._index[0][2]
        self.last_step = self._index[-1][3]
        first = pq.ParquetFile(self.files[0]).read_row_group(0, columns=["step", "input_ids"])
        self.batch_size = int(np.sum(first.column("step").to_numpy() == self.first_step))
        self.row_len = len(first.column("input_ids")[0])

    def parts(self, first_step: int, last_step: int) -> list[Path]:
        """The part files holding any of the steps first_step..last_step."""
        return sorted({f for f, _, lo, hi in self._index if hi >= first_step and lo <= last_step})

    def read(self, first_step: int, last_step: int,
             columns: list[str] | None = None) -> pa.Table:
        """All rows with first_step <= step <= last_step."""
        parts = []
        for f, rg, lo, hi in self._index:
            if hi < first_step or lo > last_step:
                continue
            t = pq.ParquetFile(f).read_row_group(rg, columns=columns and sorted(set(columns) | {"step"}))
            steps = t.column("step").to_numpy()
            parts.append(t.filter(pa.array((steps >= first_step) & (steps <= last_step))))
        if not parts:
            raise MdaError(f"{self.dir}: steps {first_step}..{last_step} are not in the stream "
                           f"(it holds {self.first_step}..{self.last_step})")
        table = pa.concat_tables(parts)
        return table.select(columns) if columns else table

    def batches(self, first_step: int, last_step: int) -> Iterator[tuple[int, np.ndarray, pa.Table]]:
        """(step, input_ids (batch, row_len) int64, rows) for each step, one row group in memory."""
        if first_step < self.first_step or last_step > self.last_step:
            raise MdaError(f"{self.dir}: steps {first_step}..{last_step} are not in the stream "
                           f"(it holds {self.first_step}..{self.last_step})")
        for f, rg, lo, hi in self._index:
            if hi < first_step or lo > last_step:
                continue
            t = pq.ParquetFile(f).read_row_group(rg)
            steps = t.column("step").to_numpy()
            ids = np.stack(t.column("input_ids").to_numpy(zero_copy_only=False)).astype(np.int64)
            for step in range(max(lo, first_step), min(hi, last_step) + 1):
                sel = np.flatnonzero(steps == step)
                if len(sel) != self.batch_size:
                    raise MdaError(f"{f}: step {step} has {len(sel)} rows, expected {self.batch_size}")
                yield step, ids[sel], t.take(pa.array(sel))
