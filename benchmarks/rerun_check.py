"""Does a rerun reproduce a run's outputs? Two finished workspaces (e.g. the default before and after
a code change), stage by stage: the `dvc.lock` output hashes, and — where a hash differs — every
file compared by content, with what is expected to differ named.

    python benchmarks/rerun_check.py --a RUN_BEFORE --b RUN_AFTER --json benchmarks/results/rerun-check.json

A file that differs in bytes is compared again by its content: safetensors by tensors (the
metadata records the code version that wrote them), Parquet by table (its metadata likewise),
JSON with the recorded code versions and identities set aside. Only outputs identical in content
pass; a difference in the code-version fields alone is reported as such. The code deps' hashes in
`dvc.lock` differ after any code change and are not compared.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import yaml

CODE_KEYS = {"code", "identity", "code_version", "metric_versions"}


def lock_outs(run: Path) -> dict[str, dict[str, str]]:
    stages = yaml.safe_load((run / "dvc.lock").read_text())["stages"]
    return {name: {o["path"]: o.get("md5") for o in stage.get("outs", [])} for name, stage in stages.items()}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in CODE_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def same_content(a: Path, b: Path) -> tuple[bool, str]:
    """(equal, how it was compared) for two files whose bytes differ."""
    if a.suffix == ".safetensors":
        from safetensors.torch import load_file

        x, y = load_file(str(a)), load_file(str(b))
        import torch
        return (x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)), "tensors"
    if a.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(a).replace_schema_metadata(None).equals(pq.read_table(b).replace_schema_metadata(None)), \
            "table"
    if a.suffix == ".json":
        return _strip(json.loads(a.read_text())) == _strip(json.loads(b.read_text())), "JSON without code versions"
    if a.suffix == ".pt":
        import torch

        x, y = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
        return repr(x) == repr(y), "torch objects (repr)"
    return False, "bytes"


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def compare_path(a: Path, b: Path) -> dict:
    files_a = {str(p.relative_to(a)): p for p in a.rglob("*") if p.is_file()} if a.is_dir() else {"": a}
    files_b = {str(p.relative_to(b)): p for p in b.rglob("*") if p.is_file()} if b.is_dir() else {"": b}
    out = {"only_in_a": sorted(set(files_a) - set(files_b)), "only_in_b": sorted(set(files_b) - set(files_a)),
           "identical_bytes": 0, "same_content": [], "different": []}
    for name in sorted(set(files_a) & set(files_b)):
        if digest(files_a[name]) == digest(files_b[name]):
            out["identical_bytes"] += 1
            continue
        equal, how = same_content(files_a[name], files_b[name])
        (out["same_content"] if equal else out["different"]).append({"file": name, "compared": how})
    out["reproduced"] = not out["only_in_a"] and not out["only_in_b"] and not out["different"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    a, b = Path(args.a), Path(args.b)
    outs_a, outs_b = lock_outs(a), lock_outs(b)
    report = {"stages": {}}
    for stage in sorted(set(outs_a) & set(outs_b)):
        for path, md5 in outs_a[stage].items():
            entry = {"md5_equal": md5 == outs_b[stage].get(path)}
            if not entry["md5_equal"] and (a / path).exists() and (b / path).exists():
                entry.update(compare_path(a / path, b / path))
            else:
                entry["reproduced"] = entry["md5_equal"]
            report["stages"].setdefault(stage, {})[path] = entry
    report["stages_only_in_one"] = sorted(set(outs_a) ^ set(outs_b))
    report["all_reproduced"] = all(e["reproduced"] for s in report["stages"].values() for e in s.values())
    report["what"] = __doc__.split("\n\n")[0]
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"all_reproduced": report["all_reproduced"],
                      "not_reproduced": [f"{s}:{p}" for s, d in report["stages"].items() for p, e in d.items()
                                         if not e["reproduced"]]}, indent=1))


if __name__ == "__main__":
    main()
