"""Output files appear whole or not at all: write under a temporary name, then rename."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `path` only if the block succeeds."""
    path = Path(path)
    tmp = _tmp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def read_json(path: str | os.PathLike, missing_hint: str) -> dict:
    """A JSON file, or one `MdaError` line naming it (missing: `missing_hint`; or corrupt)."""
    from mda.errors import MdaError

    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MdaError(f"{path}: missing; {missing_hint}") from None
    except json.JSONDecodeError as err:
        raise MdaError(f"{path}: corrupt JSON ({err})") from None


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_parquet(path: str | os.PathLike, table: pa.Table, **kwargs) -> None:
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, **kwargs)
