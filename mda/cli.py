"""What every stage entry point shares: load params, turn user errors into one line + exit code."""

from __future__ import annotations

import sys
from typing import Callable

from mda.config import Params, load_params
from mda.errors import MdaError


def run_stage(main: Callable[[Params], None], params_path: str = "params.yaml") -> None:
    """Call `main(params)`; a bad param exits 2, a bad input file exits 1, each with one line."""
    try:
        params = load_params(params_path)
        main(params)
    except MdaError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
