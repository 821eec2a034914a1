"""The Megatron reader returns exactly the rows Pythia consumed at each step, and refuses
damaged or mismatched files with one-line errors naming the file."""

import numpy as np
import pytest

from mda.data.pythia import MegatronDataset, pythia_rows, write_megatron
from mda.errors import MdaError

STEPS, BATCH, ROW_LEN = 4, 3, 9


@pytest.fixture
def prefix(tmp_path):
    # Row r holds r*100 + 0..8: every token says which row and position it came from.
    rows = np.arange(STEPS * BATCH)[:, None] * 100 + np.arange(ROW_LEN)
    write_megatron(tmp_path / "pile", rows)
    return tmp_path / "pile"


def expected(first_row, n):
    return np.arange(first_row, first_row + n)[:, None] * 100 + np.arange(ROW_LEN)


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
