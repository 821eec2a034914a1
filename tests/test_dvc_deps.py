"""`dvc.yaml` knows every dependency of every stage, or `dvc repro` says "up to date" after a
change that alters results:

- code: every `mda`/`stages` module a stage's entry point imports, transitively (read from
  the source by `mda.core.identity.module_closure`, imports inside functions included), is a dep of
  the stage (the file or a folder above it);
- params: every key a stage reads — recorded while the stages really run (`MDA_RECORD_PARAMS`,
  see `mda.core.cli`) on the quick preset and on the other sources (Pythia `.bin/.idx`, local
  files, hub checkpoints), modes (streaming scores) and estimators — is listed (the key or a section
  above it), and every listed entry is read by the stage in at least one of those runs.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from mda.core.identity import PACKAGE_ROOT, module_closure
from tests.conftest import (REPO, TINY, add_revision, deep_update, make_pipeline_repo, run_stage, set_params,
                            tiny_model)


def dvc_stages() -> dict[str, dict]:
    """name → {"modules": entry modules, "deps": [...], "params": [...]}."""
    stages = {}
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        words = stage["cmd"].split()
        modules = [w for w in words if w.startswith("stages.")] + (["mda.core.launch"] if "mda.core.launch" in words else [])
        stages[name] = {"modules": modules, "deps": [str(d) for d in stage.get("deps", [])],
                        "params": [p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])]}
    return stages


def covered(path: str, entries: list[str]) -> bool:
    return any(path == e or path.startswith(e.rstrip("/") + "/") for e in entries)


def test_every_imported_module_is_a_dependency():
    missing = {}
    for name, stage in dvc_stages().items():
        files = set().union(*(module_closure(m) for m in stage["modules"]))
        lacking = sorted(str(f.relative_to(PACKAGE_ROOT)) for f in files
                         if not covered(str(f.relative_to(PACKAGE_ROOT)), stage["deps"]))
        if lacking:
            missing[name] = lacking
    assert not missing, f"dvc.yaml lacks code deps: {missing}"


def test_closure_sees_imports_inside_functions(tmp_path):
    pkg = tmp_path / "mda"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from mda.sub import b\n    from .c import g\n")
    (pkg / "sub" / "b.py").write_text("import os\n")
    (pkg / "c.py").write_text("g = 1\n")
    (pkg / "unused.py").write_text("")
    names = {p.relative_to(tmp_path).as_posix() for p in module_closure("mda.a", tmp_path)}
    assert names == {"mda/__init__.py", "mda/a.py", "mda/sub/__init__.py", "mda/sub/b.py", "mda/c.py"}


# ----------------------------------------------------------------------------- params
def recorded(path: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        out.setdefault(entry["module"], set()).update(entry["read"])
    return out


@pytest.fixture(scope="module")
def params_read(quick_repo, tmp_path_factory):
    """What each stage module read over the quick DAG and the other sources and modes."""
    log = tmp_path_factory.mktemp("reads") / "read.jsonl"
    shutil.copy(quick_repo / "params-read.jsonl", log)
    env = {"MDA_RECORD_PARAMS": str(log)}
    # Streaming scores and projected gradients (other code paths of the influence stages and
    # of `lds`, which reuses the quick run's retrained subsets).
    for name, change, stages in (("streaming", {"mode": "streaming"}, ("scores", "lds")),
                                 ("projected", {"projection": 4}, ("factors", "gradients", "scores", "lds")),
                                 ("trajectory", {"estimator": "trajectory"}, ("scores",)),
                                 ("exact", {"estimator": "exact"}, ("scores",))):
        repo = tmp_path_factory.mktemp(name) / "repo"
        shutil.copytree(quick_repo, repo, symlinks=True)
        set_params(repo, {"influence": change})
        for stage in stages:
            res = run_stage(repo, stage, env=env)
            assert res.returncode == 0, (name, stage, res.stderr[-2000:])
    base = deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    # The Pythia source: a Megatron .bin/.idx pair.
    from mda.data.pythia import write_megatron

    pythia = make_pipeline_repo(tmp_path_factory.mktemp("pythia") / "repo", deep_update(base, {
        "corpus": {"source": "pythia", "steps": 3, "heldout_rows": 4,
                   "pythia": {"path": str(tmp_path_factory.getbasetemp() / "pile")}}}))
    write_megatron(tmp_path_factory.getbasetemp() / "pile", np.arange(20 * 33).reshape(20, 33) % 50)
    res = run_stage(pythia, "corpus", env=env)
    assert res.returncode == 0, res.stderr
    # Hub checkpoints from a fake hub cache.
    cache_dir = tmp_path_factory.mktemp("hubcache")
    for step in (0, 1):
        tiny_model(seed=step).save_pretrained(cache_dir / f"saved{step}")
        add_revision(cache_dir / "cache", f"step{step}", cache_dir / f"saved{step}")
    cache_dir = cache_dir / "cache"
    hub = make_pipeline_repo(tmp_path_factory.mktemp("hub") / "repo", deep_update(base, {
        "model": {"source": "hub", "hub": {"revisions": [0, 1], "cache_dir": str(cache_dir),
                                           "local_files_only": True}}}))
    res = run_stage(hub, "checkpoints", env=env)
    assert res.returncode == 0, res.stderr
    return recorded(log)


def test_every_params_key_a_stage_reads_is_listed(params_read):
    missing, unread = {}, {}
    for name, stage in dvc_stages().items():
        module = next(m for m in stage["modules"] if m.startswith("stages."))
        reads = params_read.get(module)
        assert reads is not None, f"stage {name} ({module}) never ran in the recorded scenarios"
        lacking = sorted(k for k in reads if not covered(k.replace(".", "/"), [p.replace(".", "/") for p in stage["params"]]))
        if lacking:
            missing[name] = lacking
        dead = [p for p in stage["params"]
                if not any(covered(k.replace(".", "/"), [p.replace(".", "/")]) or
                           covered(p.replace(".", "/"), [k.replace(".", "/")]) for k in reads)]
        if dead:
            unread[name] = dead
    assert not missing, f"dvc.yaml lacks params the stages read: {missing}"
    assert not unread, f"dvc.yaml lists params the stages never read: {unread}"
