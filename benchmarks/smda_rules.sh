#!/usr/bin/env bash
# Issue 22: the SMDA stages for one task draw with every curation rule's sets trained — the loop
# the results/smda-rules/task-seed-N folders were made with (the same stage commands as dvc.yaml).
#
#   bash benchmarks/smda_rules.sh SEED [RULE ...]
#
# RULE: the rules whose curated and random sets are fine-tuned besides the published rule's
# (default: every rule of mda.smda.curate.RULES); every rule is scored against the ground truth
# by smda-curate either way.
# Run in a workspace whose `data/checkpoints` exist (e.g. after the default's `dvc repro`). It sets
# `smda.task.seed` and `smda.sft.sets` in params.yaml, runs the SMDA stages in DAG order, and goes
# on past an SFT run that stops (a rule whose removals leave one class out is refused by smda-sft
# with one line): `smda-evaluate` then lists it under `missing_runs`, so every other set still
# counts. Old SFT outputs are removed first, so a stopped run can never leave the previous draw's
# model in place. Collect with benchmarks/experiment.py and tabulate with `python -m mda.smda.rules_table`.
set -uo pipefail
seed=${1:?usage: smda_rules.sh TASK_SEED [RULE ...]}
shift
python - "$seed" "$@" <<'PY'
import sys
import yaml

from mda.smda.curate import RULES

path = "params.yaml"
params = yaml.safe_load(open(path))
params["smda"]["task"]["seed"] = int(sys.argv[1])
rules = sys.argv[2:] or [r for r in RULES if r != "median"]  # `curated` / `random`: the median rule's sets
params["smda"]["sft"]["sets"] = ["full", "curated", "random", "oracle"] + [f"{kind}-{rule}" for rule in rules
                                                                             for kind in ("curated", "random")]
yaml.safe_dump(params, open(path, "w"), sort_keys=False)
PY
for stage in smda_task smda_instruct smda_sae smda_policy smda_influence smda_curate; do
  python -m "stages.$stage" || exit 1
done
rm -rf data/smda/sft
read -r -a sets < <(python -c "import yaml; print(' '.join(yaml.safe_load(open('params.yaml'))['smda']['sft']['sets']))")
read -r -a seeds < <(python -c "import yaml; print(' '.join(map(str, yaml.safe_load(open('params.yaml'))['smda']['sft']['seeds'])))")
for set_name in "${sets[@]}"; do
  for sft_seed in "${seeds[@]}"; do
    python -m stages.smda_sft "$set_name" "$sft_seed" || echo "smda_rules: smda-sft $set_name $sft_seed stopped (above); counted as missing"
  done
done
python -m stages.smda_evaluate && python -m stages.smda_report
