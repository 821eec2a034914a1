"""Content keys of persisted and resumable artefacts.

An artefact that a later run may reuse (gradient shards, a resumable run's checkpoints) or
that another stage consumes (factors, the gradient manifest) records the *identity* of what
produced it: digests of its input files (checkpoint weights, the window's stream parts), the
settings that shape it (head, blocks, projection rank and seed, dtype, …) and the version of
the code (`code_version`: a digest of the source of a module and of every `mda` module it
imports). It is reused only when every component matches; a mismatch is named in one line
(`describe_mismatch`) and the artefact is recomputed.

The same import closure (`module_closure`, read from the source with `ast`, imports inside
functions included) is what `dvc.yaml` must list as each stage's code deps
(`mda.core.dvc_deps`, `tests/test_dvc_deps.py`).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from functools import lru_cache
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


# ----------------------------------------------------------------------------- code
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory that holds mda/ and stages/


def module_file(name: str, root: Path = PACKAGE_ROOT) -> Path | None:
    """`mda.x.y` → root/mda/x/y.py (or the package's __init__.py); None if not ours."""
    parts = name.split(".")
    if parts[0] not in ("mda", "stages"):
        return None
    base = root.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(path: Path, name: str) -> set[str]:
    """Module names imported anywhere in `path` (absolute and relative), with their parents'
    `from X import y` submodules resolved where `X.y` is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


@lru_cache(maxsize=None)
def module_closure(name: str, root: Path = PACKAGE_ROOT) -> frozenset[Path]:
    """Source files of `name` and of every `mda`/`stages` module it imports, transitively
    (with the `__init__.py` of each package on the way)."""
    seen: dict[str, Path] = {}
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        path = module_file(current, root)
        if path is None:
            continue
        seen[current] = path
        parts = current.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        todo += sorted(_imports(path, current))
    return frozenset(seen.values())


def code_version(*modules: str) -> str:
    """A digest of the source of `modules` and everything they import from mda (16 hex)."""
    files = sorted(set().union(*(module_closure(m) for m in modules)))
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(PACKAGE_ROOT).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


