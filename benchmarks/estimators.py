"""Cost and accuracy of the influence estimators on a finished default run (`influence.estimator`).

    python benchmarks/estimators.py cost --run CLONE --json benchmarks/results/estimators-cost.json
    python benchmarks/estimators.py fd --run CLONE --exact-scores SCORES --json benchmarks/results/exact-fd.json

`cost`: each phase in its own process, one after another in one run (same-run ratios), timing its
work only (after imports and loading) and reading its own peak RSS:
- `retrain` — one retraining of the formation window (`mda.intervene.retrain.train_edit`, no edit): the unit
  the exact estimator is measured in (MAGIC reports 2-3 of them per query; the goal here is ≤ 4);
- `exact` — the metagradient of every window sample (`mda.attribute.metagradient`);
- `ekfac` — the paper's estimator: factors, gradient cache, scores (`mda.attribute.*`);
- `trajectory` — EK-FAC at each window checkpoint (`mda.attribute.trajectory`).

`fd`: the exact estimator against real retraining on the full window: for the samples with the
highest and lowest metagradient and one at the median, the window retrained with the sample's
loss weight at 0 and at 2 (removing and duplicating it, ε = 1; float32 training) and at 0.5 and
1.5 (ε = 0.5); (f(1 + ε) − f(1 − ε)) / 2ε against the metagradient. A fourth sample, the largest
|metagradient| of the window's last segment, checks the late window (added after the scores showed
the early samples' metagradients to be orders of magnitude larger: a diagnostic, not a tuned pick).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _context(run: Path):
    import torch

    from mda.core.compute import runtime
    from mda.core.config import load_params
    from mda.data.stream import Stream
    from mda.core.io import read_targets
    from mda.train.loop import deterministic

    params = load_params(run / "params.yaml")
    torch.set_num_threads(params.compute.threads)
    deterministic("cpu")
    return params, read_targets(run / "data/locate/targets.json"), Stream(run / "data/corpus/stream"), runtime(params.compute)


def phase(name: str, run: Path, out: Path) -> None:
    """One phase, in this process; writes {seconds, peak_rss_gib, …} to `out`."""
    import resource

    params, targets, stream, rt = _context(run)
    checkpoints = run / "data/checkpoints"
    window = (int(targets["window"]["start"]), int(targets["window"]["end"]))
    extra = {}
    if name == "retrain":
        from mda.intervene.edits import StreamEdit
        from mda.intervene.replay import train_edit
        began = time.perf_counter()
        train_edit(params, checkpoints, stream, window, StreamEdit(summary={"rule": "no change"}), rt)
    elif name == "exact":
        from mda.attribute.metagradient import window_metagradients
        from mda.attribute.window import setup
        s = setup(params.influence, checkpoints, targets, rt)
        began = time.perf_counter()
        scores = window_metagradients(params, checkpoints, targets, stream, s)
        extra["samples"] = int(len(scores))
    elif name == "ekfac":
        import tempfile

        from mda.attribute.factors import fit_factors, load_factors
        from mda.attribute.gradient_cache import cache_gradients
        from mda.attribute.scoring import preconditioned_probe, scores_from_cache
        from mda.attribute.window import setup
        inf = params.influence
        s = setup(inf, checkpoints, targets, rt)
        with tempfile.TemporaryDirectory() as tmp:
            began = time.perf_counter()
            fit_factors(inf, s, stream, Path(tmp) / "factors")
            cache_gradients(inf, s, stream, Path(tmp) / "gradients")
            scores = scores_from_cache(inf, s, stream, Path(tmp) / "gradients",
                                       preconditioned_probe(inf, s, load_factors(Path(tmp) / "factors", s)))
        extra["samples"] = int(len(scores))
    elif name == "trajectory":
        from mda.attribute.trajectory import trajectory_scores
        began = time.perf_counter()
        scores = trajectory_scores(params.influence, checkpoints, targets, stream, rt)
        extra["samples"], extra["checkpoints"] = int(len(scores)), sorted(int(c) for c in scores.checkpoint.unique())
    else:
        raise SystemExit(f"unknown phase {name}")
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    out.write_text(json.dumps({"phase": name, "seconds": round(seconds, 1), "peak_rss_gib": round(peak, 3), **extra}))


def cost(args) -> None:
    run = Path(args.run).resolve()
    results, tmp = {}, Path(args.json).with_suffix(".phase.json")
    load_before = os.getloadavg()
    for name in args.phases:
        cmd = [sys.executable, str(Path(__file__).resolve()), "phase", name, "--run", str(run), "--out", str(tmp)]
        began = time.time()
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"phase {name} failed:\n{res.stderr[-3000:]}")
        results[name] = {**json.loads(tmp.read_text()), "process_wall_s": round(time.time() - began, 1)}
        print(json.dumps(results[name]), flush=True)
    tmp.unlink(missing_ok=True)
    ratio = lambda a, b: round(results[a]["seconds"] / results[b]["seconds"], 2) if a in results and b in results else None
    out = {"what": "seconds of each phase's work (after imports and loading), each phase in its own process, one after "
                   "another in one run; peak RSS per process",
           "phases": results,
           "exact_over_one_retraining": ratio("exact", "retrain"), "goal_exact_over_retraining": 4.0,
           "trajectory_over_ekfac": ratio("trajectory", "ekfac"),
           "load_average_before_after": [list(load_before), list(os.getloadavg())],
           "machine": machine()}
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


def fd(args) -> None:
    import numpy as np
    import pandas as pd
    import torch

    from mda.model.heads import Head
    from mda.units.probes import PROBES
    from mda.intervene.edits import StreamEdit
    from mda.units.probes import influence_probe
    from mda.intervene.replay import train_edit

    run = Path(args.run).resolve()
    params, targets, stream, rt = _context(run)
    window = (int(targets["window"]["start"]), int(targets["window"]["end"]))
    exact = pd.read_parquet(args.exact_scores).set_index("sample_id").score
    rows = stream.read(window[0], window[1] - 1, columns=["sample_id", "step", "batch_pos"]).to_pandas().set_index("sample_id")
    head = Head(int(targets["heads"][0]["layer"]), int(targets["heads"][0]["head"]))
    inf = params.influence

    def probe_after(sample: int, weight: float) -> float:
        w = np.ones(stream.batch_size, dtype=np.float32)
        w[int(rows.batch_pos[sample])] = weight
        model, _ = train_edit(params, run / "data/checkpoints", stream, window,
                              StreamEdit(weights={int(rows.step[sample]): w}), rt, desc=f"fd sample {sample} w={weight}")
        tokens = influence_probe(inf, model.config)
        with torch.no_grad():
            return PROBES["induction"](model.eval(), tokens, head).item()

    ordered = exact.sort_values()
    picks = {"highest": int(ordered.index[-1]), "lowest": int(ordered.index[0]),
             "median": int(ordered.index[len(ordered) // 2])}
    # The metagradient's scale grows by orders of magnitude towards the window start
    # (results/estimators scale.json), so the three above lie early; one sample of the last segment
    # (the largest |metagradient| there) checks the late window, where few steps follow the edit.
    late = rows.index[rows.step.to_numpy() >= window[1] - params.influence.exact_segment]
    picks["late_highest_abs"] = int(exact.loc[late].abs().idxmax())
    out = []
    for label, sample in picks.items():
        f = {w: probe_after(sample, w) for w in (0.0, 0.5, 1.5, 2.0)}
        row = {"sample": label, "sample_id": sample, "step": int(rows.step[sample]), "metagradient": float(exact[sample]),
               "fd_eps_1": (f[2.0] - f[0.0]) / 2, "fd_eps_0.5": f[1.5] - f[0.5], "probe": f}
        row["rel_error_eps_1"] = abs(row["fd_eps_1"] - row["metagradient"]) / abs(row["metagradient"])
        row["rel_error_eps_0.5"] = abs(row["fd_eps_0.5"] - row["metagradient"]) / abs(row["metagradient"])
        out.append(row)
        print(json.dumps(row), flush=True)
    Path(args.json).write_text(json.dumps({"what": __doc__.split("`fd`: ")[1].strip(), "window": list(window),
                                           "samples": out, "machine": machine()}, indent=1) + "\n")


def machine() -> dict:
    import platform

    import torch
    model = ""
    try:
        m = re.search(r"^Model name:\s*(.+)$", subprocess.run(["lscpu"], capture_output=True, text=True).stdout, re.M)
        model = m.group(1).strip() if m else ""
    except FileNotFoundError:
        pass
    return {"cpu_model": model, "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "written_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--run", required=True, help="a finished default run (its params.yaml and data/)")
    c.add_argument("--json", default=str(ROOT / "benchmarks/results/estimators-cost.json"))
    c.add_argument("--phases", nargs="+", default=["retrain", "exact", "ekfac", "trajectory"])
    p = sub.add_parser("phase", help="(internal) one phase in this process")
    p.add_argument("name")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    f = sub.add_parser("fd")
    f.add_argument("--run", required=True)
    f.add_argument("--exact-scores", required=True, help="scores.parquet of the exact estimator on that run")
    f.add_argument("--json", default=str(ROOT / "benchmarks/results/exact-fd.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    {"cost": cost, "phase": lambda a: phase(a.name, Path(a.run).resolve(), Path(a.out)), "fd": fd}[args.verb](args)


if __name__ == "__main__":
    main()
