#!/usr/bin/env python
"""Benchmark (not a test): wall time and peak RSS of our influence pipeline against one plain
forward+backward pass and against kronfluence doing the same work, in one run.

Usage, from the repository root, once the pipeline's inputs exist (`dvc repro scores`):

    python benchmarks/influence.py                       # the whole default formation window
    python benchmarks/influence.py --steps 100           # its first 100 steps: a quick check
    python benchmarks/influence.py --json bench.json     # also write the results as JSON
    python benchmarks/influence.py --repeats 3           # median of 3 rounds per phase
    python benchmarks/influence.py --steps 100 --factor-samples 82   # quick, with the full run's
                                                         # factor-subset fraction (2048/40000)
    /usr/bin/time -v python benchmarks/influence.py      # + the run's overall peak RSS

It reads the repository's real default outputs: `params.yaml` (section `influence`),
`data/checkpoints/step<N>/`, `data/corpus/stream/` and `data/locate/targets.json`. Everything it
writes goes to a temporary directory (`--workdir` to choose it, `--keep` to keep it), never
into data/. Run it on a quiet machine: the ratios are only as good as the timings.

Phases, each in its own subprocess (so its peak RSS is its own; each child reports its
`getrusage(RUSAGE_SELF).ru_maxrss`), torch threads = `compute.threads`:

- plain: one forward+backward pass of the full model over exactly the window's sequences, in
  batches of `influence.batch_size`; every parameter requires grad as in training, loss =
  summed next-token cross-entropy, gradients reset per batch, no optimizer step;
- ours: `fit_factors`, `cache_gradients`, scores from the cache (`load_factors` +
  `preconditioned_probe` + `scores_from_cache`), as stages/factors.py, gradients.py and
  scores.py call them; then, for information, the no-cache mode (`scores_streaming`);
- kronfluence 1.0.1 on the same work: EK-FAC over the target layer's
  `attention.query_key_value` and `attention.dense` (the smallest whole-module superset of the
  head: kronfluence cannot track a head's rows), `fit_all_factors` then
  `compute_pairwise_scores` of the one aggregated probe query against every window sample.
  Variant "subset": factors fitted on the same spread subset ours use (every `stride`-th step
  of the window, stride = ceil(window samples / influence.factor_samples)) — the headline;
  variant "window": factors fitted on the whole window (kronfluence's usual workflow).
  To avoid handicapping it, kronfluence's true-Fisher labels come from the very sampler ours
  uses (`mda.attribute.capture.sequence_losses(..., labels="sampled")`, inverse CDF): with
  `torch.multinomial` kronfluence measured 4.6x slower (shared/ANCHORS.md). Damping is its
  heuristic 0.1 * mean(Lambda) (`damping_factor=None`; ours: influence.damping * mean); the
  model is float32 on both sides (the production dtype), kronfluence's factor/score dtypes
  float32 with eigendecompositions in float64 (its defaults; ours accumulates covariances and
  Lambda in float64); `cpu=True`, no profiling, batch size `influence.batch_size`, the query
  batch all probe sequences.

Times are of the work only: each child first imports, loads the model (`setup`) and, for
kronfluence, materialises its in-memory datasets (ours read the stream inside the timed work),
then starts its clock. "proc s" is the child's whole wall time, imports included.
Goals: (a) ours total / plain <= 2.0, (b) ours total / kronfluence total (subset) <= 0.33.

Caveats:
- `--steps N` alone makes the factor subset the whole short window (stride 1), so the factor
  passes weigh far more than in the full run (about 5% of the window there).
  `--factor-samples` rescales the subset.
- The run prints the 1-minute load average before and after. When other work ran on the
  cores (a test run, a stage), 2 torch threads on a 2-core machine made every op wait for a
  thread that was not scheduled. A plain batch then took 2.2 s, against 0.22 s with 1 thread,
  and the truncated passes varied 10x between batches, so such a run's ratios mean little.
  On a busy machine, `--threads 1` (all phases alike) gives usable ratios.
- With several target heads, kronfluence's side covers only the first head's layer and probe.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_PLAIN, GOAL_KRONFLUENCE = 2.0, 0.33
KRONFLUENCE_VARIANTS = {"subset": "factors on our spread subset", "window": "factors on the whole window"}


# ============================================================================ child side
def _rss_mb() -> float:
    """Current resident set size (MB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Child:
    """What every phase shares: params, targets, the model at the influence step, the window."""

    def __init__(self, args):
        sys.path.insert(0, str(ROOT))
        import torch

        from mda.core.compute import runtime
        from mda.core.config import Compute, load_params
        from mda.data.stream import Stream
        from mda.attribute.window import setup
        from mda.core.io import read_targets

        self.torch = torch
        self.args = args
        self.work = Path(args.workdir)
        params = load_params(args.params)
        self.inf = params.influence
        if args.factor_samples is not None:
            self.inf = self.inf.model_copy(update={"factor_samples": args.factor_samples})
        self.threads = args.threads or params.compute.threads
        rt = runtime(Compute(**{**params.compute.model_dump(), "threads": self.threads}))
        self.s = setup(self.inf, args.checkpoints, read_targets(args.targets), rt)
        self.stream = Stream(args.stream)
        first, last = self.s.window
        if args.steps:
            last = min(last, first + args.steps - 1)
            self.s.window = (first, last)
        self.first, self.last = first, last
        self.samples = (last - first + 1) * self.stream.batch_size
        # fit_factors' subset: every `stride`-th step of the window
        fs = self.inf.factor_samples
        self.stride = 1 if not fs else max(1, math.ceil(self.samples / fs))

    def ids(self, stride: int = 1):
        from mda.attribute.window import WindowBatches

        batches = WindowBatches(self.first, self.last, self.inf.batch_size, self.stream.batch_size, stride)
        return self.torch.cat([ids for _, ids, _ in batches.read(self.stream)])

    def probe_tokens(self):
        from mda.units.probes import influence_probe

        inf = self.inf
        return influence_probe(inf, self.s.model.config)


def phase_plain(c: Child) -> dict:
    from mda.attribute.capture import sequence_losses
    from mda.attribute.window import WindowBatches

    model = c.s.model
    model.train()  # as in training (dropout is 0: same cost as eval)
    for p in model.parameters():
        p.requires_grad_(True)
    n = 0
    for _, ids, _ in WindowBatches(c.first, c.last, c.inf.batch_size, c.stream.batch_size).read(c.stream):
        model.zero_grad(set_to_none=True)
        sequence_losses(model, ids).sum().backward()
        n += len(ids)
    return {"samples": n}


def phase_ours_factors(c: Child) -> dict:
    from mda.attribute.factors import fit_factors

    out = c.work / "factors"
    out.mkdir(parents=True, exist_ok=True)
    summary = fit_factors(c.inf, c.s, c.stream, out)
    (c.work / "factors_summary.json").write_text(json.dumps(summary))
    return {"samples": summary["samples"], "stride": summary["stride"]}


def phase_ours_gradients(c: Child) -> dict:
    from mda.attribute.gradient_cache import cache_gradients

    manifest, _ = cache_gradients(c.inf, c.s, c.stream, c.work / "gradients")
    size = sum(f.stat().st_size for f in (c.work / "gradients").glob("shard-*.parquet"))
    return {"samples": manifest["samples"], "cache_mb": size / 2**20}


def _save_scores(c: Child, raw, name: str) -> None:
    import numpy as np

    head = c.s.heads[0].name
    frame = raw[raw["head"] == head].sort_values("sample_id")
    np.save(c.work / f"{name}.npy", frame.score.to_numpy())


def phase_ours_scores(c: Child) -> dict:
    from mda.attribute.factors import load_factors
    from mda.attribute.scoring import preconditioned_probe, scores_from_cache

    vectors = preconditioned_probe(c.inf, c.s, load_factors(c.work / "factors", c.s))
    raw = scores_from_cache(c.inf, c.s, c.stream, c.work / "gradients", vectors)
    return {"samples": int(raw.sample_id.nunique()), "_raw": raw}


def phase_ours_streaming(c: Child) -> dict:
    from mda.attribute.factors import load_factors
    from mda.attribute.scoring import preconditioned_probe, scores_streaming

    vectors = preconditioned_probe(c.inf, c.s, load_factors(c.work / "factors", c.s))
    raw = scores_streaming(c.inf, c.s, c.stream, vectors)
    return {"samples": int(raw.sample_id.nunique()), "_raw": raw}


def _kronfluence(c: Child):
    """(model prepared for kronfluence, task, module names) on the first target head's layer."""
    import logging

    from kronfluence.analyzer import prepare_model
    from kronfluence.task import Task

    from mda.attribute.capture import sequence_losses
    from mda.units.probes import PROBES

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    head = c.s.heads[0]
    prefix = f"gpt_neox.layers.{head.layer}.attention."
    modules = [prefix + "query_key_value", prefix + "dense"]
    gen = c.torch.Generator().manual_seed(c.inf.label_seed)
    probe_name = c.s.probe

    class Window(Task):
        def compute_train_loss(self, batch, model, sample=False):
            # sample=True: kronfluence's true-Fisher passes; labels from our own fast sampler
            labels = "sampled" if sample and c.inf.fisher == "true" else "true"
            return sequence_losses(model, batch["input_ids"], labels, gen).sum()

        def compute_measurement(self, batch, model):
            # m = -f: kronfluence's score is then our score, sign included
            return -PROBES[probe_name](model, batch["input_ids"], head)

        def get_influence_tracked_modules(self):
            return modules

    task = Window()
    return prepare_model(c.s.model, task), task, modules


class Rows:
    """A map-style dataset of {"input_ids": row} (kronfluence's default collate stacks them)."""

    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


def _analyzer(c: Child, model, task):
    from kronfluence.analyzer import Analyzer

    return Analyzer("benchmark", model, task, cpu=True, log_level=None, profile=False,
                    disable_tqdm=True, output_dir=str(c.work / "kronfluence"), disable_model_save=True)


def phase_kron_factors(c: Child, variant: str, start_clock) -> dict:
    from kronfluence.arguments import FactorArguments

    stride = c.stride if variant == "subset" else 1
    ids = c.ids(stride)
    summary_path = c.work / "factors_summary.json"
    if variant == "subset" and summary_path.is_file():
        ours = json.loads(summary_path.read_text())
        assert ours["stride"] == stride and ours["samples"] == len(ids), \
            f"subset differs from ours: {len(ids)} samples (stride {stride}) vs {ours['samples']} ({ours['stride']})"
    model, task, _ = _kronfluence(c)
    f32 = c.torch.float32
    args = FactorArguments(strategy="ekfac", use_empirical_fisher=c.inf.fisher == "empirical",
                           covariance_max_examples=None, lambda_max_examples=None,
                           activation_covariance_dtype=f32, gradient_covariance_dtype=f32,
                           eigendecomposition_dtype=c.torch.float64, per_sample_gradient_dtype=f32,
                           lambda_dtype=f32)
    start_clock()
    analyzer = _analyzer(c, model, task)
    analyzer.fit_all_factors(f"ekfac_{variant}", Rows(ids), per_device_batch_size=c.inf.batch_size,
                             factor_args=args, overwrite_output_dir=True)
    return {"samples": len(ids), "stride": stride}


def phase_kron_scores(c: Child, variant: str, start_clock) -> dict:
    from kronfluence.arguments import ScoreArguments

    train, probe = c.ids(), c.probe_tokens()
    model, task, _ = _kronfluence(c)
    f32 = c.torch.float32
    args = ScoreArguments(damping_factor=None, aggregate_query_gradients=True,
                          per_sample_gradient_dtype=f32, precondition_dtype=f32, score_dtype=f32)
    start_clock()
    analyzer = _analyzer(c, model, task)
    analyzer.compute_pairwise_scores(f"scores_{variant}", factors_name=f"ekfac_{variant}",
                                     query_dataset=Rows(probe), train_dataset=Rows(train),
                                     per_device_query_batch_size=len(probe),
                                     per_device_train_batch_size=c.inf.batch_size,
                                     score_args=args, overwrite_output_dir=True)
    return {"samples": len(train), "_analyzer": analyzer, "_name": f"scores_{variant}"}


def _spearman(a, b) -> float:
    import pandas as pd

    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


def run_child(args) -> None:
    import numpy as np

    c = Child(args)
    clock = {}
    start_clock = lambda: clock.setdefault("t0", (time.perf_counter(), _rss_mb()))
    phase = args._phase
    if phase.startswith("kron_"):
        kind, variant = phase.rsplit("_", 1)
        fn = {"kron_factors": phase_kron_factors, "kron_scores": phase_kron_scores}[kind]
        work = lambda: fn(c, variant, start_clock)
    else:
        fn = {"plain": phase_plain, "ours_factors": phase_ours_factors, "ours_gradients": phase_ours_gradients,
              "ours_scores": phase_ours_scores, "ours_streaming": phase_ours_streaming}[phase]
        work = lambda: (start_clock(), fn(c))[1]
    info = work()
    t1 = time.perf_counter()
    t0, rss0 = clock["t0"]
    result = {"phase": phase, "seconds": t1 - t0, "peak_rss_mb": _peak_mb(), "start_rss_mb": rss0,
              "window": [c.first, c.last], "stride": c.stride, "window_samples": c.samples,
              "batch_size": c.inf.batch_size, "threads": c.threads,
              "factor_samples": c.inf.factor_samples}
    # ---- untimed: keep scores for the cross-checks
    if "_raw" in info:
        _save_scores(c, info.pop("_raw"), phase)
    if "_analyzer" in info:
        analyzer, name = info.pop("_analyzer"), info.pop("_name")
        theirs = analyzer.load_pairwise_scores(name)["all_modules"][0].double().numpy()
        ours_path = c.work / "ours_scores.npy"
        if ours_path.is_file():
            ours = np.load(ours_path)
            if len(ours) == len(theirs):
                info["spearman_vs_ours"] = _spearman(ours, theirs)
    if phase == "ours_streaming" and (c.work / "ours_scores.npy").is_file():
        cached, streamed = np.load(c.work / "ours_scores.npy"), np.load(c.work / "ours_streaming.npy")
        info["max_rel_diff_vs_cached"] = float(np.abs(cached - streamed).max() / np.abs(cached).max())
    result.update(info)
    Path(args._result).write_text(json.dumps(result))


# ============================================================================ parent side
def run_phase(args, phase: str, work: Path) -> dict:
    result = work / f"{phase}.result.json"
    log = work / f"{phase}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_phase", phase, "--_result", str(result),
           "--workdir", str(work), "--params", args.params, "--checkpoints", args.checkpoints,
           "--stream", args.stream, "--targets", args.targets, "--steps", str(args.steps or 0),
           "--threads", str(args.threads or 0)]
    if args.factor_samples is not None:
        cmd += ["--factor-samples", str(args.factor_samples)]
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    print(f"  {phase} ...", end="", flush=True, file=sys.stderr)
    start = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd()).returncode
    wall = time.perf_counter() - start
    if rc != 0 or not result.is_file():
        print(f" failed (exit {rc}); log {log}:", file=sys.stderr)
        print("".join(log.read_text().splitlines(keepends=True)[-40:]), file=sys.stderr)
        raise SystemExit(f"phase {phase} failed")
    out = json.loads(result.read_text())
    out["process_seconds"] = wall
    print(f" {out['seconds']:.1f}s", file=sys.stderr)
    return out


def total(name: str, parts: list[dict]) -> dict:
    return {"phase": name, "seconds": sum(p["seconds"] for p in parts),
            "process_seconds": sum(p["process_seconds"] for p in parts),
            "peak_rss_mb": max(p["peak_rss_mb"] for p in parts),
            "start_rss_mb": max(p["start_rss_mb"] for p in parts), "total": True}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=0, help="only the window's first N steps (default: all)")
    p.add_argument("--skip-kronfluence", action="store_true", help="skip the kronfluence phases")
    p.add_argument("--skip-window-variant", action="store_true",
                   help="skip kronfluence with factors fitted on the whole window")
    p.add_argument("--skip-streaming", action="store_true", help="skip our no-cache scoring mode")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of every phase; reports each phase's median time (default 1)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of every phase (default: compute.threads)")
    p.add_argument("--factor-samples", type=int, default=None,
                   help="override influence.factor_samples (ours and kronfluence [subset]); with "
                        "--steps, 2048 * N / 2500 keeps the full run's subset fraction")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--workdir", help="where temporary outputs go (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temporary outputs")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--checkpoints", default="data/checkpoints")
    p.add_argument("--stream", default="data/corpus/stream")
    p.add_argument("--targets", default="data/locate/targets.json")
    p.add_argument("--_phase", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._phase:
        run_child(args)
        return 0

    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
        made = False
    else:
        work, made = Path(tempfile.mkdtemp(prefix="mda-bench-")), True
    data = Path(args.stream).resolve().parent.parent
    if data in work.resolve().parents or work.resolve() == data:
        raise SystemExit(f"--workdir {work} is inside {data}: the benchmark never writes there")
    load_before = os.getloadavg()
    try:
        results = run_all(args, work)
    finally:
        if made and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep or args.workdir:
            print(f"temporary outputs kept in {work}", file=sys.stderr)
    report(args, results, load_before, os.getloadavg())
    return 0


def phase_names(args) -> list[str]:
    names = ["plain", "ours_factors", "ours_gradients", "ours_scores"]
    if not args.skip_streaming:
        names.append("ours_streaming")
    if not args.skip_kronfluence:
        for variant in KRONFLUENCE_VARIANTS:
            if not (variant == "window" and args.skip_window_variant):
                names += [f"kron_factors_{variant}", f"kron_scores_{variant}"]
    return names


def run_all(args, work: Path) -> dict:
    """Every phase in order, `--repeats` rounds (round-robin, so a change of machine load hits
    every phase alike); per phase the median seconds and the largest peak RSS."""
    print(f"benchmark work dir: {work}", file=sys.stderr)
    runs: dict[str, list[dict]] = {}
    for r in range(args.repeats):
        if args.repeats > 1:
            print(f"round {r + 1}/{args.repeats}", file=sys.stderr)
        shutil.rmtree(work / "gradients", ignore_errors=True)  # else cache_gradients reuses shards
        for name in phase_names(args):
            runs.setdefault(name, []).append(run_phase(args, name, work))
    phases = {}
    for name, rs in runs.items():
        by_time = sorted(rs, key=lambda x: x["seconds"])
        med = dict(by_time[(len(rs) - 1) // 2])  # the median run (lower median for even counts)
        med.update(peak_rss_mb=max(x["peak_rss_mb"] for x in rs),
                   all_seconds=[x["seconds"] for x in rs])
        phases[name] = med
    return phases


def report(args, phases: dict, load_before=None, load_after=None) -> None:
    import importlib.metadata as md

    plain = phases["plain"]
    rows = [("plain forward+backward (full model)", plain)]
    ours = total("ours total (cached)", [phases[k] for k in ("ours_factors", "ours_gradients", "ours_scores")])
    rows += [("ours: fit_factors", phases["ours_factors"]), ("ours: cache_gradients", phases["ours_gradients"]),
             ("ours: scores (cached)", phases["ours_scores"]), ("ours total (cached)", ours)]
    streaming = None
    if "ours_streaming" in phases:
        streaming = total("ours total (streaming)", [phases["ours_factors"], phases["ours_streaming"]])
        rows += [("ours: scores (streaming, no cache)", phases["ours_streaming"]),
                 ("ours total (factors + streaming)", streaming)]
    kron = {}
    for variant in KRONFLUENCE_VARIANTS:
        if f"kron_factors_{variant}" not in phases:
            continue
        f, s = phases[f"kron_factors_{variant}"], phases[f"kron_scores_{variant}"]
        kron[variant] = total(f"kronfluence total ({variant})", [f, s])
        rows += [(f"kronfluence [{variant}]: fit_all_factors", f),
                 (f"kronfluence [{variant}]: compute_pairwise_scores", s),
                 (f"kronfluence total [{variant}]", kron[variant])]

    w = plain["window"]
    versions = {k: _version(md, k) for k in ("torch", "transformers", "kronfluence")}
    print(f"\nInfluence benchmark: window steps {w[0]}..{w[1]} ({plain['window_samples']} sequences), "
          f"factors on every {plain['stride']}-th step ({phases['ours_factors']['samples']} sequences), "
          f"batch {plain['batch_size']}, torch threads {plain['threads']}")
    print(f"python {platform.python_version()}, " + ", ".join(f"{k} {v}" for k, v in versions.items())
          + f", {os.cpu_count()} CPUs")
    busy = ""
    if load_before is not None:
        busy = (f"load average (1 min) {load_before[0]:.2f} at the start, {load_after[0]:.2f} at the end "
                f"(the benchmark itself adds ~{_inf_threads(plain)})")
        if load_before[0] > 0.5:
            busy += ": the machine was busy before the run, timings are suspect"
        print(busy)
    print(f"repeats: {args.repeats} (seconds: median)" if args.repeats > 1 else "repeats: 1")
    print("seconds: the phase's work only (after imports + model load); proc s: the whole subprocess; "
          "peak RSS: the subprocess's ru_maxrss; +RSS: peak minus RSS when its clock started\n")
    head = f"{'phase':<44} {'seconds':>9} {'proc s':>8} {'peak RSS MB':>12} {'+RSS MB':>8} {'x plain':>8}"
    print(head)
    print("-" * len(head))
    for label, r in rows:
        if r.get("total"):
            extra = f"{'':>8}"
        else:
            extra = f"{r['peak_rss_mb'] - r['start_rss_mb']:>8.0f}"
        print(f"{label:<44} {r['seconds']:>9.2f} {r['process_seconds']:>8.1f} {r['peak_rss_mb']:>12.0f} "
              f"{extra} {r['seconds'] / plain['seconds']:>8.2f}")
    print()
    goals = {}
    a = ours["seconds"] / plain["seconds"]
    goals["ours_vs_plain"] = {"ratio": a, "goal": GOAL_PLAIN, "pass": a <= GOAL_PLAIN}
    print(f"(a) ours total / plain pass            = {a:6.3f}  goal <= {GOAL_PLAIN:<4}  "
          f"{'PASS' if a <= GOAL_PLAIN else 'MISS'}")
    if "subset" in kron:
        b = ours["seconds"] / kron["subset"]["seconds"]
        goals["ours_vs_kronfluence_subset"] = {"ratio": b, "goal": GOAL_KRONFLUENCE, "pass": b <= GOAL_KRONFLUENCE}
        print(f"(b) ours total / kronfluence [subset]  = {b:6.3f}  goal <= {GOAL_KRONFLUENCE:<4}  "
              f"{'PASS' if b <= GOAL_KRONFLUENCE else 'MISS'}")
    if "window" in kron:
        bw = ours["seconds"] / kron["window"]["seconds"]
        goals["ours_vs_kronfluence_window"] = {"ratio": bw}
        print(f"    ours total / kronfluence [window]  = {bw:6.3f}  (information: kronfluence's usual "
              f"workflow, factors on all {plain['window_samples']} sequences)")
    if streaming:
        print(f"    ours (factors + streaming) / plain = {streaming['seconds'] / plain['seconds']:6.3f}"
              + (f", / kronfluence [subset] = {streaming['seconds'] / kron['subset']['seconds']:.3f}"
                 if "subset" in kron else ""))
    for name, r in phases.items():
        if "spearman_vs_ours" in r:
            print(f"    Spearman(ours, {name.replace('kron_scores_', 'kronfluence [') + ']'}) = "
                  f"{r['spearman_vs_ours']:.4f}  (whole modules + biases vs the head's blocks: not expected 1)")
    if "ours_streaming" in phases and "max_rel_diff_vs_cached" in phases["ours_streaming"]:
        print(f"    streaming vs cached scores: max |d| / max |score| = "
              f"{phases['ours_streaming']['max_rel_diff_vs_cached']:.1e}")
    if kron:
        print("\nFairness: kronfluence samples its true-Fisher labels with our inverse-CDF sampler "
              "(mda.attribute.capture.sequence_losses), not torch.multinomial (4.6x slower in "
              "shared/ANCHORS.md); its datasets are built in memory before its clock starts. It tracks "
              "the whole query_key_value + dense of the head's layer, every head's rows/columns and the "
              "biases included, where ours covers only the head's qk/v/o weight blocks.")
        if plain["stride"] == 1:
            print("Note: stride 1 (window <= influence.factor_samples): the [subset] and [window] "
                  "variants fit their factors on the same sequences.")
    if args.json:
        payload = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                   "load_average_1min": {"start": load_before and load_before[0],
                                         "end": load_after and load_after[0]},
                   "versions": versions, "cpus": os.cpu_count(), "phases": phases,
                   "totals": {"ours_cached": ours, **({"ours_streaming": streaming} if streaming else {}),
                              **{f"kronfluence_{k}": v for k, v in kron.items()}},
                   "ratios_vs_plain": {label: r["seconds"] / plain["seconds"] for label, r in rows},
                   "goals": goals}
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")


def _inf_threads(r: dict) -> int:
    return int(r.get("threads", 1))


def _version(md, name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"


if __name__ == "__main__":
    sys.exit(main())
