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


# ----------------------------------------------------------------------------- dvc.yaml's code deps
def stage_code_deps(modules: list[str], root: Path = PACKAGE_ROOT) -> list[str]:
    """The `mda/…` entries a stage's deps need: every file of the closure, a whole package folder
    listed instead of its files when the stage imports all of them."""
    files = {f.relative_to(root).as_posix() for m in modules for f in module_closure(m, root)
             if f.relative_to(root).parts[0] == "mda"}
    out = set(files)
    for package in sorted({str(Path(f).parent) for f in files}, key=lambda p: p.count("/")):
        members = {p.relative_to(root).as_posix() for p in (root / package).rglob("*.py")}
        if package != "mda" and members and members <= files:
            out = {f for f in out if not f.startswith(package + "/")} | {package}
    return sorted(out)


def regenerate(dvc_yaml: Path) -> list[str]:
    """Rewrite each stage's `mda/…` deps in `dvc_yaml` from the closure of its command's modules
    (stages/… and data deps stay as they are); returns the stages changed."""
    import re

    import yaml

    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    lines = dvc_yaml.read_text().splitlines(keepends=True)
    changed, out, i = [], [], 0
    current = None
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^  ([\w@-]+):\s*(#.*)?$", line)
        if m:
            current = m.group(1)
        if current in stages and re.match(r"^    deps:\s*(&\w+)?\s*$", line):  # not `deps: *alias`
            out.append(line)
            i += 1
            block = []
            while i < len(lines) and re.match(r"^      - ", lines[i]):
                block.append(lines[i])
                i += 1
            words = stages[current]["cmd"].split()
            modules = [w for w in words if w.startswith("stages.")] + [w for w in words if w.startswith("mda.")]
            code = stage_code_deps(modules)
            kept = [b for b in block if not b.strip().startswith("- mda/") and not b.strip() == "- mda"]
            first_mda = next((k for k, b in enumerate(block) if b.strip().startswith("- mda/")), len(kept))
            first_mda = min(first_mda, len(kept))
            new_block = kept[:first_mda] + [f"      - {c}\n" for c in code] + kept[first_mda:]
            if new_block != block:
                changed.append(current)
            out += new_block
            continue
        out.append(line)
        i += 1
    dvc_yaml.write_text("".join(out))
    return changed


if __name__ == "__main__":
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "dvc.yaml")
    print("regenerated code deps of:", ", ".join(regenerate(target)) or "none")
