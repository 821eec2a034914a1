"""What every stage entry point shares: load params, turn user errors into one line + exit code.

`MDA_RECORD_PARAMS=<file>`: append the stage's name and every params key it read to `<file>`
(one JSON line per process; `tests/test_dvc_deps.py` checks them against `dvc.yaml`).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable

from mda.core.config import Params, RecordedParams, load_params
from mda.core.errors import MdaError


def run_stage(main: Callable[[Params], None], params_path: str = "params.yaml") -> None:
    """Call `main(params)`; a bad param exits 2, a bad input file exits 1, each with one line."""
    record = os.environ.get("MDA_RECORD_PARAMS")
    read: set[str] = set()
    try:
        params = load_params(params_path)
        main(RecordedParams(params, "", read) if record else params)
        if record:
            with open(record, "a") as f:
                f.write(json.dumps({"module": _entry_module(main), "argv": sys.argv[1:],
                                    "read": sorted(read)}) + "\n")
    except MdaError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        _leave_process_group()


def _entry_module(main) -> str:
    """`stages.x` for `python -m stages.x` (whose functions say `__main__`)."""
    if main.__module__ != "__main__":
        return main.__module__
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return spec.name if spec else "__main__"


def _leave_process_group() -> None:
    """End a torchrun rank cleanly (nothing to do in a single process)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
