import numpy as np
import pytest

from mda.data.stream import Stream, StreamWriter, stream_table
from mda.errors import MdaError


def test_write_read_round_trip(tmp_path):
    rows = np.arange(10 * 3 * 5, dtype=np.int32).reshape(30, 5)
    w = StreamWriter(tmp_path / "s", batch_size=3, steps_per_file=4)
    w.write(stream_table(rows, ["x"] * 30, first_step=7, batch_size=3))
    s = Stream(tmp_path / "s")
    assert (s.first_step, s.last_step, s.batch_size, s.row_len) == (7, 16, 3, 5)
    assert len(s.files) == 3
    got = [(step, ids) for step, ids, _ in s.batches(9, 12)]
    assert [g[0] for g in got] == [9, 10, 11, 12]
    np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), rows[6:18])
    assert s.read(8, 8).column("sample_id").to_pylist() == [24, 25, 26]


def test_missing_and_corrupt_streams(tmp_path):
    with pytest.raises(MdaError, match="no stream files"):
        Stream(tmp_path)
    (tmp_path / "part-00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(MdaError, match="part-00000.parquet: unreadable Parquet"):
        Stream(tmp_path)


def test_out_of_range_steps(tmp_path):
    rows = np.zeros((6, 4), dtype=np.int32)
    StreamWriter(tmp_path, batch_size=2).write(stream_table(rows, ["x"] * 6, 0, 2))
    with pytest.raises(MdaError, match="steps 2..5 are not in the stream"):
        list(Stream(tmp_path).batches(2, 5))
