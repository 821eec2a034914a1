"""How many probe sequences make the top-k selection independent of the probe draw?

Scores the whole formation window of a finished run with several draws (seeds) of the probe's
repeated random-token sequences, at several numbers of sequences, and reports for each number
the pairwise overlap of the draws' top-k sets (k as `select` chooses it) and their Spearman
correlation. The default `influence.probe_sequences` is chosen from this table (issue 14, item 7:
overlap ≥ 95 %), before any retraining result is looked at.

    python benchmarks/probe_overlap.py --data /work/base/repo/data \
        --json benchmarks/results/probe_overlap.json

Reads `<data>/checkpoints/step<N>/`, `<data>/locate/targets.json`, `<data>/factors/<head>/`
and the gradient shards `<data>/gradients/shard-*.parquet` listed in its manifest. It calls the
scoring functions below the stage (`preconditioned_probe`, `shard_scores`), so a cache written
before the shards carried their identity metadata can be read; the probe gradients and the
preconditioning are the scores stage's own. Settings (blocks, probe length, select.fraction…)
come from `--params` (default: this repository's params.yaml). Nothing is written but the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data", help="a finished run's data/ directory")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 200, 400, 800],
                    help="numbers of probe sequences")
    ap.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 4, 5, 6], help="probe draws (seeds)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    import numpy as np
    import pandas as pd
    import torch
    import yaml

    from mda.core.compute import runtime
    from mda.core.config import Compute, load_params
    from mda.attribute.ekfac import BlockFactors
    from mda.attribute.overlap import draw_agreement
    from mda.attribute.scoring import preconditioned_probe, probe_columns, shard_scores
    from mda.attribute.window import setup
    from mda.intervene.selection import set_size
    from mda.core.io import read_json, read_targets

    started = time.perf_counter()
    data = Path(args.data)
    params = load_params(args.params)
    inf = params.influence
    rt = runtime(Compute(threads=args.threads))
    s = setup(inf, data / "checkpoints", read_targets(data / "locate/targets.json"), rt)
    # The factors as fitted (load_factors also checks their identity, which older files lack).
    factors = {b.name: BlockFactors.load(data / "factors" / b.name.split("/")[0] / f"{b.name.split('/')[1]}.safetensors")
               for b in s.all_blocks}

    draws, probe_seconds = {}, {}
    for n in args.sizes:
        t0 = time.perf_counter()
        for seed in args.seeds:
            draws[f"n{n}_seed{seed}"] = preconditioned_probe(
                inf.model_copy(update={"probe_sequences": n, "probe_seed": seed}), s, factors)
        probe_seconds[n] = (time.perf_counter() - t0) / len(args.seeds)
    first = next(iter(draws))
    columns = probe_columns(draws[first], {k: v for k, v in draws.items() if k != first})
    columns[first] = columns.pop("score")

    manifest = read_json(data / "gradients/manifest.json", "run the gradients stage")
    t0 = time.perf_counter()
    parts = [p for shard in manifest["shards"] for p in shard_scores(data / "gradients" / shard["file"], columns)]
    frame = pd.concat(parts, ignore_index=True).groupby(["sample_id", "head"], as_index=False, sort=True).sum()
    scoring_seconds = time.perf_counter() - t0

    results = []
    for head, g in frame.groupby("head"):
        k = set_size(len(g), params.select.fraction, params.select.count)
        for n in args.sizes:
            agreement = draw_agreement(g, {f"seed {sd}": f"n{n}_seed{sd}" for sd in args.seeds}, k)
            results.append({"head": head, "probe_sequences": n, **agreement})
    # Sanity: the run's own scores against ours for the run's probe draw (from the run's params.yaml).
    check = None
    stored, run_params = data / "scores/scores.parquet", data.parent / "params.yaml"
    run_inf = yaml.safe_load(run_params.read_text()).get("influence", {}) if run_params.is_file() else {}
    own = f"n{run_inf.get('probe_sequences')}_seed{run_inf.get('probe_seed')}"
    if stored.is_file() and own in frame:
        ref = pd.read_parquet(stored).merge(frame[["sample_id", "head", own]], on=["sample_id", "head"])
        check = {"column": own, "samples": int(len(ref)),
                 "max_abs_diff_over_max_abs": float(np.abs(ref.score - ref[own]).max() / ref.score.abs().max())}

    out = {"data": data.name,  # no machine path in committed JSON
            "window": list(s.window), "influence_step": s.step,
           "heads": [h.name for h in s.heads], "samples": int(frame.sample_id.nunique()),
           "probe": s.probe, "probe_half_len": inf.probe_half_len, "blocks": inf.blocks,
           "select_fraction": params.select.fraction, "select_count": params.select.count,
           "seeds": args.seeds, "sizes": args.sizes, "threads": args.threads,
           "torch": torch.__version__, "seconds": {"probe_gradient_per_draw": probe_seconds,
                                                   "scoring_all_draws": scoring_seconds,
                                                   "total": time.perf_counter() - started},
           "check_against_stored_scores": check, "results": results}
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


def table(results: list[dict]) -> str:
    lines = ["| head | probe sequences | k | top-k overlap, mean over pairs | min | Spearman, mean |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['head']} | {r['probe_sequences']} | {r['k']:,} | {r['overlap_mean']:.1%} | "
                     f"{r['overlap_min']:.1%} | {r['spearman_mean']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
