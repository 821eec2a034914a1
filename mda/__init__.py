"""mda: Mechanistic Data Attribution — which training samples made this unit form?"""

import os

__version__ = "0.1.0"

# torch's CPU kernels run on GNU OpenMP, whose worker threads spin-wait for each other between
# parallel regions (libgomp's default: 300,000 spins): with any other busy process on the cores (a
# browser, CI, `dvc queue start -j 2`) a descheduled peer makes every step wait for a time slice.
# Measured on the default training step, 2 threads, 2 cores (benchmarks/default.py, contention):
# default spinning 44 ms alone / 1,167 ms beside one busy process; 10,000 spins 43 / 138 ms;
# passive waiting 57-65 / 74-81 ms (its futex sleeps cost ~1.4x alone, on every step of every
# stage). Short spinning keeps the alone speed and avoids the collapse. Set before torch loads
# libgomp; an explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
