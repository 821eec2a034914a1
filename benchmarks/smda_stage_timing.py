"""One SMDA stage as DVC runs it (`python -m stages.<stage> …` in the repository root), without
MLflow, printing its wall time, CPU time and peak RSS as one JSON line — for measuring the stages
on a machine where MLflow is not installed (e.g. a quiet one, pinned to 2 cores with `taskset`).

    python benchmarks/smda_stage_timing.py smda_sft full 0
    for s in smda_task smda_instruct ...; do taskset -c 0,1 python benchmarks/smda_stage_timing.py $s; done

The MLflow run each stage also logs costs about a second more per stage (store lock, one run).
"""

from __future__ import annotations

import importlib
import json
import resource
import sys
import time
from contextlib import contextmanager

START = time.perf_counter()


@contextmanager
def no_tracking(*args, **kwargs):
    from mda.core.tracking import NullRun

    yield NullRun()


def main() -> None:
    import mda.core.tracking

    mda.core.tracking.stage_run = no_tracking  # before the stage module imports it
    stage, args = sys.argv[1], sys.argv[2:]
    module = importlib.import_module(f"stages.{stage}")
    sys.argv = [stage, *args]
    from mda.core.cli import run_stage

    code = 0
    try:
        run_stage(module.main)
    except SystemExit as exit_:
        code = exit_.code or 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"stage": " ".join([stage, *args]), "rc": code, "wall_s": round(time.perf_counter() - START, 2),
                      "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                      "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}))
    sys.exit(code)


if __name__ == "__main__":
    main()
