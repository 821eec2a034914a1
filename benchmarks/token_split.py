"""Token-level attribution on a finished run, before the pipeline reruns: the scores stage's token
split (`mda.attribute.tokens`) for the top and random samples of the window, with this
repository's influence settings (e.g. the new default `influence.probe_sequences`), on a run
whose gradient cache predates the shards' identity metadata.

    python benchmarks/token_split.py --data /work/base/repo/data --json benchmarks/results/token_split.json

Scores the window from the cache's shards with the main probe draw (as `benchmarks/probe_overlap.py`
does), splits the top `influence.token_samples` samples and as many random ones over their
positions, and writes what metrics/scores.json's `tokens` section would hold, plus each top
sample's five strongest positions (token → next token, contribution, predictable).
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
    ap.add_argument("--data", default="data")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import pandas as pd

    from mda.core.compute import runtime
    from mda.core.config import Compute, load_params
    from mda.data.stream import Stream
    from mda.attribute.ekfac import BlockFactors
    from mda.attribute.scoring import attach_samples, preconditioned_probe, probe_columns, shard_scores
    from mda.attribute.tokens import token_sets, token_table
    from mda.attribute.window import setup
    from mda.core.io import read_json, read_targets
    from stages.scores import token_metrics

    started = time.perf_counter()
    data = Path(args.data)
    params = load_params(args.params)
    inf = params.influence
    s = setup(inf, data / "checkpoints", read_targets(data / "locate/targets.json"), runtime(Compute(threads=args.threads)))
    stream = Stream(data / "corpus/stream")
    factors = {b.name: BlockFactors.load(data / "factors" / b.name.split("/")[0] / f"{b.name.split('/')[1]}.safetensors")
               for b in s.all_blocks}
    vectors = preconditioned_probe(inf, s, factors)
    manifest = read_json(data / "gradients/manifest.json", "run the gradients stage")
    columns = probe_columns(vectors)
    parts = [p for shard in manifest["shards"] for p in shard_scores(data / "gradients" / shard["file"], columns)]
    raw = pd.concat(parts, ignore_index=True).groupby(["sample_id", "head"], as_index=False, sort=True).score.sum()
    scores = attach_samples(raw, stream, s, s.probe)
    t0 = time.perf_counter()
    tokens = token_table(inf, s, stream, token_sets(scores, inf.token_samples), vectors)
    split_seconds = time.perf_counter() - t0
    metrics = token_metrics(tokens, scores, inf.token_samples)

    tokenizer = None
    if (data / "corpus/tokenizer/tokenizer.json").is_file():
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(data / "corpus/tokenizer"), local_files_only=True)
    word = (lambda i: tokenizer.decode([int(i)])) if tokenizer else str
    head = s.heads[0].name
    top = tokens[(tokens.set == f"top:{head}") & (tokens["head"] == head)]
    ranked = scores[scores["head"] == head].sort_values(["score", "sample_id"], ascending=[False, True])
    examples = []
    for sid in ranked.sample_id.head(5):
        g = top[top.sample_id == sid].sort_values("contribution", ascending=False).head(5)
        examples.append({"sample_id": int(sid), "score": float(ranked.set_index("sample_id").score[sid]),
                         "strongest": [{"position": int(r.position), "token": word(r.token), "next": word(r.next_token),
                                        "contribution": float(r.contribution), "predictable": bool(r.predictable)}
                                       for r in g.itertuples()]})
    # Beyond the pipeline's definition: positions whose token occurs again later in the row (the
    # earlier half of a repeat, whose key/value a later induction query reads), not predictable.
    recurs = {}
    for label, set_name in (("top", f"top:{head}"), ("random", "random")):
        g = tokens[(tokens.set == set_name) & (tokens["head"] == head)].sort_values(["sample_id", "position"])
        later = g.groupby("sample_id", group_keys=False).apply(
            lambda x: pd.Series([tok in set(x.token.iloc[i + 1:]) for i, tok in enumerate(x.token)], index=x.index))
        source = later.to_numpy(bool) & ~g.predictable.to_numpy(bool)
        pos = g.contribution.clip(lower=0).to_numpy()
        recurs[label] = {"positions": float(source.mean()), "positive_share": float(pos[source].sum() / pos.sum())}
    out = {"data": data.name,  # no machine path in committed JSON
            "window": list(s.window), "influence_step": s.step, "probe": s.probe,
           "probe_sequences": inf.probe_sequences, "probe_seed": inf.probe_seed,
           "token_samples": inf.token_samples, "tokens": metrics, "examples": examples,
           "recurring_later_not_predictable": recurs,
           "seconds": {"split": split_seconds, "total": time.perf_counter() - started}}
    for target, m in metrics["targets"].items():
        for label in ("top", "random"):
            x = m[label]
            print(f"{target} {label:6s}: {x['samples']} samples, predictable positions {x['predictable_positions']:.1%}, "
                  f"positive influence on them {x['positive_on_predictable']:.1%}, "
                  f"per-token ratio {x['per_token_ratio']:.2f}")
    for label, r in recurs.items():
        print(f"{head} {label:6s}: token recurs later, not predictable: {r['positions']:.1%} of positions, "
              f"{r['positive_share']:.1%} of positive influence")
    print(f"sum check (max |Σc − score| / max |score|): {metrics['sum_check_max_rel']:.2e}; "
          f"split {split_seconds:.1f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
