"""mda: Mechanistic Data Attribution — which training samples made this unit form?"""

import os

__version__ = "0.1.0"

# torch's CPU kernels run on GNU OpenMP, whose worker threads spin-wait for each other between
# parallel regions: with any other busy process on the cores (a browser, CI, `dvc queue start
# -j 2`) a descheduled peer makes every step wait for a time slice (measured: a default training
# step from 35 ms to over 1 s). Passive waiting costs little alone and keeps steps fast under
# contention (benchmarks/default.py). Set before torch starts OpenMP; an explicit value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
