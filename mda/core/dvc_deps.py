"""`dvc.yaml`'s code deps, regenerated from each stage's import closure:

    python -m mda.core.dvc_deps [dvc.yaml]

Every `mda/…` file a stage's entry modules import, transitively (`mda.core.identity.module_closure`),
listed in the stage's `deps` (a whole package folder when the stage imports all of it);
`tests/test_dvc_deps.py` checks that none is missing.
"""

from __future__ import annotations

from pathlib import Path

from mda.core.identity import PACKAGE_ROOT, module_closure


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
