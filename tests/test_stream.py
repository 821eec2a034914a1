import math
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from mda.data.stream import (STEPS_PER_ROW_GROUP, Stream, StreamWriter, steps_per_row_group,
                             stream_table)
from mda.core.errors import MdaError


def write_stream(directory, rows, first_step, batch_size, steps_per_file, chunks):
    """Feed `rows` to a writer `chunks[i]` steps per call."""
    table = stream_table(rows, ["x"] * len(rows), first_step, batch_size)
    with StreamWriter(directory, batch_size, steps_per_file) as w:
        done = 0
        for steps in chunks:
            w.write(table.slice(done * batch_size, steps * batch_size))
            done += steps
    assert done * batch_size == len(rows)
    return table


def test_write_read_round_trip(tmp_path):
    rows = np.arange(10 * 3 * 5, dtype=np.int32).reshape(30, 5)
    with StreamWriter(tmp_path / "s", batch_size=3, steps_per_file=4) as w:
        w.write(stream_table(rows, ["x"] * 30, first_step=7, batch_size=3))
    s = Stream(tmp_path / "s")
    assert (s.first_step, s.last_step, s.batch_size, s.row_len) == (7, 16, 3, 5)
    assert len(s.files) == 3
    got = [(step, ids) for step, ids, _ in s.batches(9, 12)]
    assert [g[0] for g in got] == [9, 10, 11, 12]
    np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), rows[6:18])
    assert s.read(8, 8).column("sample_id").to_pylist() == [24, 25, 26]


@pytest.mark.parametrize("chunks", [[25], [1] * 25, [3, 7, 1, 9, 5]])
def test_parts_hold_whole_steps_however_fed(tmp_path, chunks):
    """A part per `steps_per_file` steps whatever the calls' sizes, each byte-identical to
    pyarrow writing that part's rows in row groups of `STEPS_PER_ROW_GROUP` steps."""
    batch, steps_per_file = 2, 4
    rows = np.arange(25 * batch * 3, dtype=np.int32).reshape(-1, 3)
    table = write_stream(tmp_path / "s", rows, 0, batch, steps_per_file, chunks)
    parts = sorted((tmp_path / "s").iterdir())
    assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in range(math.ceil(25 / 4))]
    for i, part in enumerate(parts):
        pq.write_table(table.slice(i * steps_per_file * batch, steps_per_file * batch),
                       tmp_path / "reference.parquet", row_group_size=STEPS_PER_ROW_GROUP * batch)
        assert part.read_bytes() == (tmp_path / "reference.parquet").read_bytes()


def test_row_groups_stay_small_at_pythia_shapes():
    # One Pythia step is 1,024 x 2,049 int32 = 8,392,704 bytes; 64 MiB hold 7 such steps.
    assert steps_per_row_group(1024, 2049) == 7
    assert steps_per_row_group(16, 65) == STEPS_PER_ROW_GROUP
    assert steps_per_row_group(1, 10 ** 8) == 1


def test_order_comes_from_steps_not_names(tmp_path):
    """Steps 99,990 .. 100,014 in parts of 4 steps, renamed by unpadded first step, so that
    name order ('part-100002' < 'part-99990') is not step order."""
    batch, first = 2, 99_990
    rows = np.arange(25 * batch * 3, dtype=np.int32).reshape(-1, 3)
    write_stream(tmp_path, rows, first, batch, steps_per_file=4, chunks=[1] * 25)
    for part in tmp_path.glob("part-*.parquet"):
        step = pq.read_table(part, columns=["step"]).column("step")[0].as_py()
        part.rename(tmp_path / f"part-{step}.parquet")
    assert sorted(p.name for p in tmp_path.iterdir())[0] == "part-100002.parquet"
    s = Stream(tmp_path)
    assert (s.first_step, s.last_step) == (99_990, 100_014)
    assert [f.name for f in s.files][:4] == ["part-99990.parquet", "part-99994.parquet",
                                             "part-99998.parquet", "part-100002.parquet"]
    got = list(s.batches(99_990, 100_014))
    assert [step for step, _, _ in got] == list(range(99_990, 100_015))
    np.testing.assert_array_equal(np.concatenate([ids for _, ids, _ in got]), rows)
    assert s.read(99_999, 100_000).column("sample_id").to_pylist() == [
        99_999 * batch, 99_999 * batch + 1, 100_000 * batch, 100_000 * batch + 1]


def test_gaps_and_overlaps_name_the_file(tmp_path):
    rows = np.zeros((12 * 2, 3), dtype=np.int32)
    write_stream(tmp_path, rows, 0, 2, steps_per_file=4, chunks=[12])
    (tmp_path / "part-00001.parquet").rename(tmp_path / "aside.parquet")  # steps 4..7 missing
    with pytest.raises(MdaError, match=r"part-00002.parquet: row group 0 starts at step 8, which "
                                       r"leaves a gap after part-00000.parquet \(steps up to 3\)"):
        Stream(tmp_path)
    (tmp_path / "aside.parquet").rename(tmp_path / "part-00001.parquet")
    shutil.copyfile(tmp_path / "part-00000.parquet", tmp_path / "part-00009.parquet")  # 0..3 twice
    with pytest.raises(MdaError, match=r"part-0000[09].parquet: row group 0 starts at step 0, "
                                       r"which overlaps part-0000[09].parquet"):
        Stream(tmp_path)


def test_failed_write_leaves_no_part(tmp_path):
    rows = np.zeros((6 * 2, 3), dtype=np.int32)
    table = stream_table(rows, ["x"] * 12, 0, 2)
    with pytest.raises(RuntimeError):
        with StreamWriter(tmp_path, 2, steps_per_file=4) as w:
            w.write(table)  # steps 0..3 complete a part; 4..5 wait in an open one
            raise RuntimeError("source failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00000.parquet"]
    with pytest.raises(ValueError, match="steps must be consecutive"):
        with StreamWriter(tmp_path / "b", 2) as w:
            w.write(table.slice(0, 4))
            w.write(table.slice(6, 4))


def test_missing_and_corrupt_streams(tmp_path):
    with pytest.raises(MdaError, match="no stream files"):
        Stream(tmp_path)
    (tmp_path / "part-00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(MdaError, match="part-00000.parquet: unreadable Parquet"):
        Stream(tmp_path)


def test_out_of_range_steps(tmp_path):
    rows = np.zeros((6, 4), dtype=np.int32)
    with StreamWriter(tmp_path, batch_size=2) as w:
        w.write(stream_table(rows, ["x"] * 6, 0, 2))
    with pytest.raises(MdaError, match="steps 2..5 are not in the stream"):
        list(Stream(tmp_path).batches(2, 5))


def test_part_gone_after_opening_names_the_file(tmp_path):
    rows = np.zeros((8 * 2, 3), dtype=np.int32)
    write_stream(tmp_path, rows, 0, 2, steps_per_file=4, chunks=[8])
    s = Stream(tmp_path)
    (tmp_path / "part-00001.parquet").unlink()
    with pytest.raises(MdaError, match="part-00001.parquet: cannot read row group 0"):
        list(s.batches(0, 7))


def test_row_counts_must_fill_steps(tmp_path):
    table = stream_table(np.zeros((8, 3), dtype=np.int32), ["x"] * 8, 0, 2)
    pq.write_table(table.slice(0, 4), tmp_path / "part-00000.parquet")
    pq.write_table(table.slice(5, 3), tmp_path / "part-00001.parquet")  # step 2 lacks a row
    with pytest.raises(MdaError, match=r"part-00001.parquet: row group 0 holds 3 rows for steps "
                                       r"2..3, expected 2 per step"):
        Stream(tmp_path)
