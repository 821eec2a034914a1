"""SMDA's scores against the policy actually refitted after each pair's one-step update, on a
finished run (`mda.smda.influence.refit_check`): how well the first-order score predicts the
refit, and what linearising ΔX through the SAE's TopK gate costs (latents entering or leaving
the top k under the step are what the score ignores).

    python benchmarks/smda_refit.py --run CLONE --json benchmarks/results/smda-refit.json

Reads the run's data/smda/{task,instruct,sae,policy} and its params.yaml; every SFT pair at
`smda.influence.lr` (the scores' own step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/smda-refit.json"))
    args = ap.parse_args(argv)
    import numpy as np
    from scipy.stats import spearmanr

    from mda.core.config import load_params
    from mda.smda import lm as lms
    from mda.smda.influence import refit_check
    from mda.smda.pipeline import load_checked_sae, load_lm, prefixes, read_policy
    from mda.smda.task import read_task

    run = Path(args.run).resolve()
    os.chdir(run)
    params = load_params("params.yaml")
    data = Path("data/smda")
    lm = load_lm(params, data / "instruct")
    sae = load_checked_sae(params, lm, data / "sae")
    arrays, summary = read_policy(data / "policy")
    pairs, prompts = read_task(data / "task")
    sft = pairs[pairs.set == "sft"].reset_index(drop=True)
    by_id = prompts.set_index("prompt_id")
    probe = [lms.encode_prompt(lm, by_id.prompt[i]) for i in arrays["train_prompt_ids"]]
    began = time.perf_counter()
    rows = refit_check(lm, sae, arrays["features"], arrays["X_train"], arrays["Y_train"], arrays["W"],
                       summary["ridge"], probe, prefixes(params, lm), params.smda.sae.layer,
                       lms.pair_tokens(lm, sft.prompt, sft.response), params.smda.influence.lr)
    score = np.array([r["score"] for r in rows])
    refit = np.array([r["refit"] for r in rows])
    held = np.array([r["refit_gate_held"] for r in rows])
    changed = np.array([r["gate_changes"] > 0 for r in rows])
    scale = np.abs(refit).max()
    out = {"what": __doc__.split("\n\n")[0], "pairs": len(rows), "lr": params.smda.influence.lr,
           "spearman_score_vs_refit": float(spearmanr(score, refit).statistic),
           "spearman_score_vs_refit_gate_held": float(spearmanr(score, held).statistic),
           "max_abs_score_minus_gate_held_over_max_refit": float(np.abs(score - held).max() / scale),
           "max_abs_refit_minus_gate_held_over_max_refit": float(np.abs(refit - held).max() / scale),
           "pairs_with_gate_changes": int(changed.sum()),
           "sign_agreement_score_refit": float((np.sign(score) == np.sign(refit)).mean()),
           "seconds": round(time.perf_counter() - began, 1),
           "rows": [{"pair_id": int(p), **r} for p, r in zip(sft.pair_id, rows)]}
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
