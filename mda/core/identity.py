"""Content keys of persisted and resumable artefacts.

An artefact that a later run may reuse (gradient shards, a resumable run's checkpoints) or
that another stage consumes (factors, the gradient manifest) records the *identity* of what
produced it: digests of its input files (checkpoint weights, the window's stream parts), the
settings that shape it (head, blocks, projection rank and seed, dtype, …) and the version of
the code (`mda.core.deps.code_version`). It is reused only when every component matches; a
mismatch is named in one line (`describe_mismatch`) and the artefact is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (16 hex), memoised per (path, size, mtime) within a process."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        with open(path, "rb") as f:
            _FILE_DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    return _FILE_DIGESTS[key]


def files_digest(paths) -> str:
    """One digest over several files' names and contents (order-independent)."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        h.update(p.name.encode() + b"\0" + file_digest(p).encode() + b"\0")
    return h.hexdigest()[:16]


def checkpoint_digest(step_dir: str | os.PathLike) -> str:
    """The weights and config of a saved checkpoint (what a model-reading artefact depends on)."""
    step_dir = Path(step_dir)
    return files_digest([step_dir / "model.safetensors", step_dir / "config.json"])


def value_digest(value) -> str:
    """Digest of a JSON-able value (settings, shapes, names)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def identity_digest(identity: dict) -> str:
    return value_digest(identity)


def describe_mismatch(stored: dict | None, current: dict) -> str:
    """What differs between two identities, in a few words: `checkpoint, projection`."""
    if not stored:
        return "no identity recorded"
    changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    return ", ".join(changed) if changed else "nothing"
