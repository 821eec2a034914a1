"""Reader for the Pythia pre-shuffled Pile, stored as a Megatron `MMapIndexedDataset`.

A dataset is a pair `<prefix>.bin` (all tokens, concatenated) and `<prefix>.idx`
(little-endian): magic `MMIDIDX\\x00\\x00`, version `<Q` = 1, dtype code `<B`, `<Q` number
of sequences N, `<Q` number of document indices M, then `sizes` int32[N], `pointers`
int64[N] (byte offsets into the .bin) and `doc_idx` int64[M].

In Pythia's pre-shuffled data every sequence is one training row of seq_len + 1 = 2049
tokens, and optimizer step s consumes rows s*B ... s*B + B - 1 (B = 1024 for Pythia).
Both files are memory-mapped: the full Pile is hundreds of GB, so only the requested
rows are ever read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from mda.core.errors import MdaError
from mda.core.io import atomic_file

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
          6: np.float64, 7: np.float32, 8: np.uint16}
"""Megatron's dtype codes."""
_HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8


class MegatronDataset:
    """Memory-mapped, validated access to one `.bin`/`.idx` pair."""

    def __init__(self, prefix: str | os.PathLike):
        self.idx_path = Path(f"{prefix}.idx")
        self.bin_path = Path(f"{prefix}.bin")
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise MdaError(f"{path}: Megatron dataset file not found")
        self._read_index()
        self.tokens = (np.asarray(np.memmap(self.bin_path, dtype=self.dtype, mode="r"))
                       if self.bin_path.stat().st_size else np.empty(0, self.dtype))

    def _read_index(self) -> None:
        path = self.idx_path
        idx_bytes = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(_HEADER_BYTES)
        if len(header) < _HEADER_BYTES or header[:len(MAGIC)] != MAGIC:
            raise MdaError(f"{path}: not a Megatron MMapIndexedDataset index (bad magic)")
        version = int(np.frombuffer(header, "<u8", 1, len(MAGIC))[0])
        if version != VERSION:
            raise MdaError(f"{path}: unsupported index version {version} (expected {VERSION})")
        code = header[len(MAGIC) + 8]
        if code not in DTYPES:
            raise MdaError(f"{path}: unknown dtype code {code} (expected one of {sorted(DTYPES)})")
        self.dtype = np.dtype(DTYPES[code]).newbyteorder("<")
        n, m = (int(v) for v in np.frombuffer(header, "<u8", 2, len(MAGIC) + 9))
        expected = _HEADER_BYTES + 4 * n + 8 * n + 8 * m
        if idx_bytes != expected:
            raise MdaError(f"{path}: index holds {idx_bytes} bytes, its header "
                           f"({n} sequences, {m} doc indices) implies {expected}")
        index = np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))
        self.sizes = index[_HEADER_BYTES:_HEADER_BYTES + 4 * n].view("<i4")
        self.pointers = index[_HEADER_BYTES + 4 * n:_HEADER_BYTES + 12 * n].view("<i8")
        self._check_bin_size(n)

    def _check_bin_size(self, n: int) -> None:
        actual = self.bin_path.stat().st_size
        expected = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n else 0
        if actual != expected:
            raise MdaError(f"{self.bin_path}: holds {actual} bytes but {self.idx_path.name} "
                           f"describes {expected} bytes (truncated or mismatched pair?)")

    def __len__(self) -> int:
        return len(self.sizes)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Sequences start..stop-1 as an int32 (stop - start, row_len) array."""
        if not 0 <= start <= stop <= len(self):
            raise MdaError(f"{self.idx_path}: rows {start}..{stop - 1} out of range "
                           f"(the dataset holds {len(self)} rows)")
        sizes = self.sizes[start:stop]
        if stop == start:
            return np.empty((0, 0), np.int32)
        row_len = int(sizes[0])
        if np.any(sizes != row_len):
            odd = start + int(np.flatnonzero(sizes != row_len)[0])
            raise MdaError(f"{self.idx_path}: row {odd} holds {int(self.sizes[odd])} tokens, "
                           f"row {start} holds {row_len}; rows must have one length")
        first = self.pointers[start:stop] // self.dtype.itemsize
        return self.tokens[first[:, None] + np.arange(row_len)].astype(np.int32)

    def step_range(self, first_step: int, steps: int, batch_size: int,
                   row_len: int | None = None) -> tuple[int, int]:
        """Row range of `steps` optimizer steps from `first_step`, checked against the data."""
        start, stop = first_step * batch_size, (first_step + steps) * batch_size
        if stop > len(self):
            raise MdaError(f"{self.idx_path}: steps {first_step}..{first_step + steps - 1} need "
                           f"rows up to {stop - 1}, but the dataset holds {len(self)} rows "
                           f"({len(self) // batch_size} steps of {batch_size})")
        stored = int(self.sizes[start]) if stop > start else row_len
        if row_len is not None and stored != row_len:
            raise MdaError(f"{self.idx_path}: rows hold {stored} tokens, "
                           f"corpus.seq_len + 1 = {row_len}")
        return start, stop

    def iter_steps(self, first_step: int, steps: int, batch_size: int,
                   row_len: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(step, rows (batch_size, row_len) int32) per step, so long ranges stream."""
        self.step_range(first_step, steps, batch_size, row_len)
        for step in range(first_step, first_step + steps):
            yield step, self.rows(step * batch_size, (step + 1) * batch_size)


def pythia_rows(prefix: str | os.PathLike, first_step: int, steps: int, batch_size: int,
                row_len: int) -> np.ndarray:
    """The rows of optimizer steps first_step .. first_step + steps - 1, (steps*batch_size, row_len)."""
    data = MegatronDataset(prefix)
    start, stop = data.step_range(first_step, steps, batch_size, row_len)
    return data.rows(start, stop)


def write_megatron(prefix: str | os.PathLike, rows: np.ndarray, dtype=np.uint16) -> None:
    """Write `rows` (n, row_len) as a `.bin`/`.idx` pair, one sequence and one document per row."""
    rows = np.asarray(rows)
    dtype = np.dtype(dtype)
    codes = {np.dtype(t): c for c, t in DTYPES.items()}
    if rows.ndim != 2 or dtype not in codes:
        raise ValueError(f"need 2-D rows and a Megatron dtype, got {rows.shape} {dtype}")
    if rows.size and dtype.kind in "iu" and (rows.min() < np.iinfo(dtype).min
                                             or rows.max() > np.iinfo(dtype).max):
        raise ValueError(f"token values {rows.min()}..{rows.max()} do not fit {dtype}")
    n, row_len = rows.shape
    with atomic_file(f"{prefix}.bin") as tmp:
        np.ascontiguousarray(rows, dtype=dtype.newbyteorder("<")).tofile(tmp)
    with atomic_file(f"{prefix}.idx") as tmp, open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(np.array([VERSION], "<u8").tobytes())
        f.write(bytes([codes[dtype]]))
        f.write(np.array([n, n + 1], "<u8").tobytes())
        f.write(np.full(n, row_len, "<i4").tobytes())
        f.write((np.arange(n, dtype="<i8") * row_len * dtype.itemsize).tobytes())
        f.write(np.arange(n + 1, dtype="<i8").tobytes())
