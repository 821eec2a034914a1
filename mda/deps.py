"""Which `mda` source files a piece of code depends on, and a digest of them.

One answer serves two checks:
- DVC must list every module a stage imports (`tests/test_dvc_deps.py` compares `dvc.yaml`
  with `module_closure` of each stage's entry point);
- a persisted cache records the digest of the code that produced it (`code_version`), so
  a cache made by other code is never reused.

Imports are read from the source (`ast`), including imports inside functions, so the
closure holds every module the code *may* import, not only those a given run touched.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the directory that holds mda/ and stages/


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
