"""Start a stage with `compute.procs` data-parallel processes — the one launcher `dvc.yaml` uses:

    python -m mda.core.launch <procs> stages.<name> [stage args…]

- `procs` = 1 (the default): the stage runs in this process, exactly as
  `python -m stages.<name>` (no torchrun start-up cost).
- `procs` > 1: torchrun (`torch.distributed.run`, single node: `--standalone`) starts that many
  ranks of the stage; each joins the process group in `mda.core.compute.runtime`.
- Several nodes: set `MDA_TORCHRUN_ARGS` to torchrun's rendezvous arguments (they replace
  `--standalone`), e.g. `--nnodes 2 --rdzv-backend c10d --rdzv-endpoint head:29500
  --rdzv-id job42`, and start the same command on every node (under SLURM: `srun`).

The compute settings are checked here first (a missing GPU, more processes than devices:
one line, nothing started). A rank that fails fails the stage with its exit code; its own
error line is printed by the rank.
"""

from __future__ import annotations

import os
import runpy
import shlex
import sys

from mda.core.compute import check_batching, check_compute
from mda.core.config import load_params
from mda.core.errors import ConfigError, MdaError


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or not argv[0].isdigit() or not argv[1].startswith("stages."):
        print("usage: python -m mda.core.launch <procs> stages.<name> [args…]", file=sys.stderr)
        sys.exit(2)
    procs, module, args = int(argv[0]), argv[1], argv[2:]
    extra = os.environ.get("MDA_TORCHRUN_ARGS", "")
    try:
        params = load_params()
        compute = params.compute
        if procs != compute.procs:
            raise ConfigError(f"params: compute.procs is {compute.procs}, but the launcher was asked for {procs}")
        check_compute(compute)
        check_batching(compute.procs, compute.micro_batch, params.corpus.batch_size)
    except MdaError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    if procs == 1 and not extra:
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    rendezvous = shlex.split(extra) if extra else ["--standalone"]
    config = get_args_parser().parse_args([*rendezvous, "--nproc-per-node", str(procs), "--module", module, *args])
    try:
        run(config)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        print(f"error: {module} failed on rank {rank} (exit code {failure.exitcode})", file=sys.stderr)
        sys.exit(failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1)


if __name__ == "__main__":
    main()
