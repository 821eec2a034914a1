"""Output files appear whole or not at all: write under a temporary name, then rename.

Temporary names are `.<name>.tmp-<pid>` (and `.<name>.old-<pid>` for an output set aside
while its replacement is renamed in). A process killed with SIGKILL cleans nothing, so every
writer first removes the debris of *any* earlier process for the same output (`clean_debris`):
a later run never hashes, trusts or trips over it.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq


def _tmp_name(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_debris(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary and set-aside copies of `path` left by any process (a killed run's
    included); return what was removed. Only one writer per output may run at a time."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    found = [p for kind in ("tmp", "old") for p in path.parent.glob(f".{glob.escape(path.name)}.{kind}-*")]
    for p in found:
        _remove(p)
    return found


def clean_debris_in(directory: str | os.PathLike) -> list[Path]:
    """`clean_debris` for every entry of `directory` (e.g. the shards of a resumable output)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir()
             if p.name.startswith(".") and any(f".{kind}-" in p.name for kind in ("tmp", "old"))]
    for p in found:
        _remove(p)
    return found


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `path` only if the block succeeds.
    The old output is renamed aside, the new one renamed in, then the old one deleted: at no
    moment is a half-deleted output at `path`."""
    path = Path(path)
    clean_debris(path)
    tmp = _tmp_name(path)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, path)


def swap_in(new: Path, path: Path) -> None:
    """Rename `new` to `path`, setting aside (then deleting) whatever was there."""
    old = _tmp_name(path, "old")
    if path.exists() or path.is_symlink():
        path.rename(old)
    new.rename(path)
    if old.exists() or old.is_symlink():
        _remove(old)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_debris(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def read_json(path: str | os.PathLike, missing_hint: str) -> dict:
    """A JSON file, or one `MdaError` line naming it (missing: `missing_hint`; or corrupt)."""
    from mda.core.errors import MdaError

    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MdaError(f"{path}: missing; {missing_hint}") from None
    except json.JSONDecodeError as err:
        raise MdaError(f"{path}: corrupt JSON ({err})") from None


def read_targets(path: str | os.PathLike) -> dict:
    """`data/locate/targets.json`: the unit, target heads, window and influence step."""
    return read_json(path, "run the locate stage first")


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_parquet(path: str | os.PathLike, table: pa.Table, **kwargs) -> None:
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, **kwargs)


def read_table(path: str | os.PathLike, stage: str, **kwargs):
    """A Parquet table a stage wrote, as a DataFrame; one line naming the file and the stage to run
    when it is missing or unreadable (every stage reads its inputs through this)."""
    import pandas as pd

    from mda.core.errors import MdaError

    try:
        return pd.read_parquet(path, **kwargs)
    except FileNotFoundError:
        raise MdaError(f"{path}: missing; run the {stage} stage") from None
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise MdaError(f"{path}: unreadable ({type(err).__name__}); rerun the {stage} stage") from None
