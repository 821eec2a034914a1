"""EK-FAC, K-FAC and gradient dot products against the exact damped-Fisher-inverse influence
(`tests/test_influence.py::exact_check`: 200 samples, a 512-parameter head) → JSON.

    python benchmarks/ekfac_exact.py --json benchmarks/results/ekfac_exact.json

The README's table of these numbers quotes this file; the test asserts bounds on the same
computation.
"""

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/ekfac_exact.json"))
    args = ap.parse_args(argv)
    import torch

    from tests.test_influence import exact_check

    vs, rho_blockwise = exact_check()
    out = {"what": "scores of 200 training samples on a 512-parameter head (qk + v + o of L1H0, tiny GPT-NeoX) "
                   "against the exact damped Fisher inverse; top10 = share of the exact top 10 % (20 samples)",
           "against_exact": {name: {k: round(v, 4) for k, v in m.items()} for name, m in vs.items()},
           "ekfac_vs_exact_block_diagonal_spearman": round(rho_blockwise, 4),
           "torch": torch.__version__, "python": platform.python_version()}
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
