"""The Megatron reader returns exactly the rows Pythia consumed at each step, and refuses
damaged or mismatched files with one-line errors naming the file.

Every pair read here is built byte by byte in the test from Megatron-LM's documented layout
(`megatron/core/datasets/indexed_dataset.py`, `_IndexWriter`; the same in GPT-NeoX, which wrote
Pythia's data), not by our own `write_megatron`, so reader and writer cannot share a mistake.
"""

import struct

import numpy as np
import pytest

from mda.data.pythia import MegatronDataset, pythia_rows, write_megatron
from mda.core.errors import MdaError

STEPS, BATCH, ROW_LEN = 4, 3, 9
UINT16, INT32 = 8, 4  # Megatron's DType codes


def megatron_pair(prefix, sequences: list[list[int]], document_indices: list[int], code: int = UINT16):
    """`.bin`: the sequences' tokens back to back, little-endian. `.idx`: b"MMIDIDX\\x00\\x00",
    <Q version 1, <B dtype code, <Q sequence count, <Q document-index count, then int32 sequence
    lengths, int64 byte offsets of each sequence in the `.bin`, int64 document indices (the
    sequence index where each document starts, then the total: documents + 1 entries)."""
    fmt, itemsize = {UINT16: ("<H", 2), INT32: ("<i", 4)}[code]
    pointers, offset = [], 0
    for seq in sequences:
        pointers.append(offset)
        offset += len(seq) * itemsize
    n, m = len(sequences), len(document_indices)
    with open(f"{prefix}.bin", "wb") as f:
        for seq in sequences:
            f.write(b"".join(struct.pack(fmt, t) for t in seq))
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code))
        f.write(struct.pack("<Q", n) + struct.pack("<Q", m))
        f.write(struct.pack(f"<{n}i", *(len(seq) for seq in sequences)))
        f.write(struct.pack(f"<{n}q", *pointers))
        f.write(struct.pack(f"<{m}q", *document_indices))


def expected(first_row, n):
    return np.arange(first_row, first_row + n)[:, None] * 100 + np.arange(ROW_LEN)


@pytest.fixture
def prefix(tmp_path):
    # Row r holds r*100 + 0..8: every token says which row and position it came from. One
    # document per row, as in Pythia's pre-shuffled files.
    rows = expected(0, STEPS * BATCH).tolist()
    megatron_pair(tmp_path / "pile", rows, list(range(len(rows) + 1)))
    return tmp_path / "pile"


@pytest.mark.parametrize("code", [UINT16, INT32])
def test_rows_of_a_multi_document_file(tmp_path, code):
    """10 rows of 5 tokens in 4 documents of 3, 1, 4 and 2 rows: the document index has 5
    entries, not rows + 1, and the reader must step over it. Tokens above 32767 are read as
    unsigned (Pythia's vocabulary of 50k needs uint16)."""
    rows = [[40_000 + 100 * r + t for t in range(5)] for r in range(10)]
    megatron_pair(tmp_path / "docs", rows, [0, 3, 4, 8, 10], code)
    data = MegatronDataset(tmp_path / "docs")
    assert len(data) == 10 and data.dtype == np.dtype("<u2" if code == UINT16 else "<i4")
    np.testing.assert_array_equal(data.rows(0, 10), rows)
    got = pythia_rows(tmp_path / "docs", first_step=2, steps=2, batch_size=2, row_len=5)  # rows 4..7
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, rows[4:8])


def test_our_writer_lays_out_the_same_bytes(tmp_path):
    rows = expected(0, 5)
    write_megatron(tmp_path / "ours", rows)
    megatron_pair(tmp_path / "theirs", rows.tolist(), list(range(6)))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"theirs{suffix}").read_bytes(), suffix


def test_step_range_returns_its_rows(prefix):
    rows = pythia_rows(prefix, first_step=1, steps=2, batch_size=BATCH, row_len=ROW_LEN)
    assert rows.dtype == np.int32 and rows.shape == (2 * BATCH, ROW_LEN)
    np.testing.assert_array_equal(rows, expected(1 * BATCH, 2 * BATCH))


def test_iter_steps_streams_one_batch_per_step(prefix):
    got = list(MegatronDataset(prefix).iter_steps(2, 2, BATCH, ROW_LEN))
    assert [step for step, _ in got] == [2, 3]
    np.testing.assert_array_equal(got[1][1], expected(3 * BATCH, BATCH))


@pytest.mark.parametrize("change", ["truncate", "append"])
def test_wrong_bin_size_names_bin(prefix, change):
    bin_path = prefix.with_suffix(".bin")
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[:-2] if change == "truncate" else data + b"\0\0")
    with pytest.raises(MdaError, match=r"pile\.bin: holds \d+ bytes .* describes \d+ bytes"):
        MegatronDataset(prefix)


def test_missing_idx_names_it(prefix):
    prefix.with_suffix(".idx").unlink()
    with pytest.raises(MdaError, match=r"pile\.idx: .*not found"):
        pythia_rows(prefix, 0, 1, BATCH, ROW_LEN)


@pytest.mark.parametrize("offset, patch, message", [
    (0, b"NOTMAGIC!", "bad magic"),
    (9, b"\x02", "unsupported index version 2"),
    (17, b"\x09", "unknown dtype code 9"),
])
def test_bad_header_names_idx(prefix, offset, patch, message):
    idx = prefix.with_suffix(".idx")
    data = idx.read_bytes()
    idx.write_bytes(data[:offset] + patch + data[offset + len(patch):])
    with pytest.raises(MdaError, match=rf"pile\.idx: .*{message}"):
        MegatronDataset(prefix)


def test_steps_beyond_data(prefix):
    with pytest.raises(MdaError, match=r"steps 3\.\.4 .* holds 12 rows \(4 steps of 3\)"):
        pythia_rows(prefix, first_step=3, steps=2, batch_size=BATCH, row_len=ROW_LEN)


def test_row_length_mismatch(prefix):
    with pytest.raises(MdaError, match=r"rows hold 9 tokens, corpus\.seq_len \+ 1 = 8"):
        pythia_rows(prefix, 0, 1, BATCH, row_len=8)
