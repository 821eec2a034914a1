"""The training stream on disk: which sequence is consumed at which optimizer step.

One Parquet dataset (`stream/part-*.parquet`), one row per training sequence, schema
`STREAM_SCHEMA`. Parts hold `STEPS_PER_FILE` whole steps and row groups hold whole steps, so
a step range is read without touching the rest, and training reads one step's batch at a
time. The order of the parts is the order of the steps recorded in them: at Pythia's 143,000
steps no naming scheme has to sort right.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mda.core.errors import MdaError
from mda.core.io import atomic_file

STREAM_SCHEMA = pa.schema([
    ("sample_id", pa.int64()),
    ("step", pa.int64()),
    ("batch_pos", pa.int32()),
    ("domain", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
])

STEPS_PER_ROW_GROUP = 64
"""Steps per row group (fewer when a row group would pass `ROW_GROUP_BYTES`)."""
ROW_GROUP_BYTES = 64 << 20
"""Token bytes a row group may hold: one Pythia step (1,024 x 2,049 int32) is 8.4 MB, so its
row groups hold 7 steps, and a reader holds one row group, not 64 steps (537 MB)."""
STEPS_PER_FILE = 256
"""Steps per part file: the default stream's 9,000 steps are 36 parts; Pythia's 143,000 steps
are 559 parts of 2.1 GB each."""


def steps_per_row_group(batch_size: int, row_len: int) -> int:
    step_bytes = batch_size * row_len * np.dtype(np.int32).itemsize
    return max(1, min(STEPS_PER_ROW_GROUP, ROW_GROUP_BYTES // step_bytes))


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
    """Writes consecutive steps into part files of `steps_per_file` whole steps, however `write`
    is fed (one step per call, or thousands).

    A part is streamed to disk one row group at a time (`pq.ParquetWriter`), so memory holds
    one row group, never a whole part; it appears under its name only when complete. Parts are
    named by ordinal, `part-00000.parquet`, `part-00001.parquet`, ... (five digits until the
    100,000th part, i.e. 25.6 M steps at the default part size); `Stream` orders them by the
    steps they hold, never by name. Use as a context manager, or call `close()` at the end.
    """

    def __init__(self, directory: str | os.PathLike, batch_size: int,
                 steps_per_file: int = STEPS_PER_FILE):
        if batch_size < 1 or steps_per_file < 1:
            raise ValueError(f"batch_size {batch_size} and steps_per_file {steps_per_file} must be >= 1")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.batch_size = batch_size
        self.steps_per_file = steps_per_file
        self.parts = 0
        self._group_steps: int | None = None  # steps per row group, once the row length is known
        self._pending: list[pa.Table] = []  # steps waiting for their row group to fill
        self._pending_steps = 0
        self._part: tuple[ExitStack, pq.ParquetWriter] | None = None  # the part being written
        self._part_steps = 0  # steps already in the open part
        self._next_step: int | None = None

    def write(self, table: pa.Table) -> None:
        """Append `table` (rows of whole, consecutive steps, continuing the previous call's)."""
        if table.num_rows % self.batch_size:
            raise ValueError(f"{table.num_rows} rows do not fill whole steps of {self.batch_size}")
        if not table.num_rows:
            return
        first = table.column("step")[0].as_py()
        if self._next_step is not None and first != self._next_step:
            raise ValueError(f"steps must be consecutive: got step {first}, expected {self._next_step}")
        steps = table.num_rows // self.batch_size
        self._next_step = first + steps
        if self._group_steps is None:
            row_len = len(table.column("input_ids")[0])
            self._group_steps = steps_per_row_group(self.batch_size, row_len)
        done = 0
        while done < steps:
            # A row group ends at its size or at the end of the part, whichever comes first.
            group = min(self._group_steps, self.steps_per_file - self._part_steps)
            take = min(group - self._pending_steps, steps - done)
            self._pending.append(table.slice(done * self.batch_size, take * self.batch_size))
            self._pending_steps += take
            done += take
            if self._pending_steps == group:
                self._flush()

    def _flush(self) -> None:
        """Write the pending steps as one row group; close the part when it is full."""
        if not self._pending_steps:
            return
        if self._part is None:
            stack = ExitStack()
            tmp = stack.enter_context(atomic_file(self.dir / f"part-{self.parts:05d}.parquet"))
            self._part = stack, stack.enter_context(pq.ParquetWriter(tmp, STREAM_SCHEMA))
        rows = pa.concat_tables(self._pending)
        self._part[1].write_table(rows, row_group_size=rows.num_rows)
        self._part_steps += self._pending_steps
        self._pending, self._pending_steps = [], 0
        if self._part_steps == self.steps_per_file:
            self._close_part()

    def _close_part(self, error: BaseException | None = None) -> None:
        stack, _ = self._part
        self._part, self._part_steps = None, 0
        if error is None:
            stack.close()  # closes the Parquet writer, then renames the part into place
            self.parts += 1
        else:
            stack.__exit__(type(error), error, error.__traceback__)  # deletes the partial part

    def close(self) -> None:
        """Write the last (possibly short) part."""
        self._flush()
        if self._part is not None:
            self._close_part()

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, kind, error, tb) -> None:
        if error is None:
            self.close()
        elif self._part is not None:
            self._close_part(error)


class Stream:
    """Read access to a stream directory written by `StreamWriter`.

    Parts are ordered by the steps recorded in them (row-group statistics), not by file name,
    and must hold contiguous, non-overlapping step ranges with `batch_size` rows per step.
    """

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        files = list(self.dir.glob("part-*.parquet"))
        if not files:
            raise MdaError(f"{self.dir}: no stream files (part-*.parquet); run the corpus stage")
        parts = sorted((_row_groups(f) for f in files), key=lambda groups: groups[0][2])
        self.files = [groups[0][0] for groups in parts]
        self._index = [g for groups in parts for g in groups]  # (file, row_group, first, last, rows)
        self.first_step = self._index[0][2]
        self.last_step = self._index[-1][3]
        first = self._index[0]
        self.batch_size = first[4] // (first[3] - first[2] + 1)
        self._check_steps()
        self.row_len = len(_read_row_group(first[0], 0, ["input_ids"]).column("input_ids")[0])

    def _check_steps(self) -> None:
        """Every step once, in order, with `batch_size` rows: one line naming the file otherwise."""
        expected = self.first_step
        previous = None
        for f, rg, lo, hi, rows in self._index:
            if lo != expected:
                what = "overlaps" if lo < expected else "leaves a gap after"
                raise MdaError(f"{f}: row group {rg} starts at step {lo}, which {what} "
                               f"{previous.name} (steps up to {expected - 1}); part files must "
                               f"hold contiguous, non-overlapping steps")
            if rows != (hi - lo + 1) * self.batch_size:
                raise MdaError(f"{f}: row group {rg} holds {rows} rows for steps {lo}..{hi}, "
                               f"expected {self.batch_size} per step")
            expected, previous = hi + 1, f

    def parts(self, first_step: int, last_step: int) -> list[Path]:
        """The part files holding any of the steps first_step..last_step."""
        return sorted({f for f, _, lo, hi, _ in self._index if hi >= first_step and lo <= last_step})

    def read(self, first_step: int, last_step: int,
             columns: list[str] | None = None) -> pa.Table:
        """All rows with first_step <= step <= last_step."""
        parts = []
        for f, rg, lo, hi, _ in self._index:
            if hi < first_step or lo > last_step:
                continue
            t = _read_row_group(f, rg, columns and sorted(set(columns) | {"step"}))
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
        for f, rg, lo, hi, _ in self._index:
            if hi < first_step or lo > last_step:
                continue
            t = _read_row_group(f, rg)
            steps = t.column("step").to_numpy()
            ids = np.stack(t.column("input_ids").to_numpy(zero_copy_only=False)).astype(np.int64)
            for step in range(max(lo, first_step), min(hi, last_step) + 1):
                sel = np.flatnonzero(steps == step)
                if len(sel) != self.batch_size:
                    raise MdaError(f"{f}: step {step} has {len(sel)} rows, expected {self.batch_size}")
                yield step, ids[sel], t.take(pa.array(sel))


def _row_groups(path: Path) -> list[tuple[Path, int, int, int, int]]:
    """(file, row group, first step, last step, rows) per row group, from the footer alone."""
    try:
        meta = pq.ParquetFile(path).metadata
        col = meta.schema.to_arrow_schema().get_field_index("step")
        stats = [meta.row_group(rg).column(col).statistics for rg in range(meta.num_row_groups)]
    except Exception as err:  # pyarrow raises several types for damaged files
        raise MdaError(f"{path}: unreadable Parquet ({_first_line(err)})") from None
    if col < 0 or not stats:
        raise MdaError(f"{path}: no stream rows (no 'step' column or no row groups)")
    if any(s is None or not s.has_min_max for s in stats):
        raise MdaError(f"{path}: no step statistics in its row groups (not written by StreamWriter)")
    return [(path, rg, int(s.min), int(s.max), meta.row_group(rg).num_rows)
            for rg, s in enumerate(stats)]


def _read_row_group(path: Path, rg: int, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.ParquetFile(path).read_row_group(rg, columns=columns)
    except Exception as err:  # missing since indexing, or damaged past its footer
        raise MdaError(f"{path}: cannot read row group {rg} ({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]
