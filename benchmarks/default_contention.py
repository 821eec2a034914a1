"""`benchmarks/default.py --only contention`: a default training step alone and beside a busy
neighbour, per OpenMP setting and thread count (each setting in a fresh worker process)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path


from default_common import (OMP_VARS, QUICK_SETTINGS, ROOT, SETTINGS, default_params, default_trainer, load_average,
                            median_ms, random_rows, vocab_size)


def worker(args) -> None:
    """One setting, one fresh process: ms per default training step (printed as JSON)."""
    import torch  # first: libgomp reads OMP_WAIT_POLICY/GOMP_SPINCOUNT when torch loads it

    from mda.train.loop import deterministic  # `import mda` now only fills OMP_WAIT_POLICY in for children

    seen = {k: os.environ.get(k) for k in OMP_VARS}
    torch.set_num_threads(args.threads)
    deterministic("cpu")  # as the stages run
    params = default_params()
    vocab = vocab_size()
    trainer = default_trainer(params, vocab)
    rows = random_rows(params, vocab, params.corpus.batch_size * 8, 0).split(params.corpus.batch_size)
    times, deadline = [], time.perf_counter() + args.max_seconds
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        trainer.step(rows[i % len(rows)])
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
        if time.perf_counter() > deadline and len(times) >= 3:
            break
    print(json.dumps({"env": seen, "threads": torch.get_num_threads(), "steps": len(times),
                      "ms_per_step": median_ms(times)}))


@contextmanager
def busy_neighbour(on: bool):
    """One busy single-thread process on the cores while the block runs."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if on else None
    try:
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def worker_cmd(threads: int, steps: int, max_seconds: float) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve().with_name("default.py")), "worker", "--threads", str(threads),
            "--steps", str(steps), "--max-seconds", str(max_seconds)]


def worker_env(setting: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **setting}


def run_worker(threads: int, setting: dict, steps: int, max_seconds: float) -> dict:
    res = subprocess.run(worker_cmd(threads, steps, max_seconds), env=worker_env(setting),
                         capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"worker failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_pair(steps: int, max_seconds: float) -> list[dict]:
    """Two 1-thread training processes at once (mda's default OpenMP setting)."""
    env = worker_env(SETTINGS["GOMP_SPINCOUNT=10000 (mda default)"])
    procs = [subprocess.Popen(worker_cmd(1, steps, max_seconds), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode:
            raise RuntimeError(f"worker failed: {stderr[-2000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def contention(quick: bool) -> dict:
    names = QUICK_SETTINGS if quick else tuple(SETTINGS)
    repeats, steps, max_seconds = (1, 15, 25) if quick else (3, 40, 60)
    runs: dict[tuple, list[float]] = {}
    pairs = []
    load = [load_average()]
    from tqdm import tqdm

    grid = [(t, n, c) for t in (1, 2) for n in names for c in (False, True)]
    with tqdm(total=repeats * (len(grid) + 1), desc="contention", unit="run") as bar:
        for _ in range(repeats):
            for threads, name, contended in grid:
                with busy_neighbour(contended):
                    r = run_worker(threads, SETTINGS[name], steps, max_seconds)
                runs.setdefault((name, threads, contended), []).append(r["ms_per_step"])
                bar.update(1)
            pairs.append(run_pair(steps, max_seconds))
            bar.update(1)
    load.append(load_average())
    table = []
    for name in names:
        for threads in (1, 2):
            alone = statistics.median(runs[(name, threads, False)])
            busy = statistics.median(runs[(name, threads, True)])
            table.append({"setting": name, "threads": threads, "alone_ms": alone, "contended_ms": busy,
                          "contended_over_alone": round(busy / alone, 2),
                          "alone_runs_ms": runs[(name, threads, False)],
                          "contended_runs_ms": runs[(name, threads, True)]})
    pair_ms = [statistics.median(p[i]["ms_per_step"] for p in pairs) for i in range(2)]
    default_2 = next(r for r in table if r["setting"].endswith("(mda default)") and r["threads"] == 2)
    return {
        "what": "ms per default training step (16 x 64-token rows, float32, CPU), median of steps, then of "
                "repeats; each setting in a fresh process; 'contended': one busy single-thread process beside it",
        "repeats": repeats, "steps_per_run": steps, "load_average_before_after": load,
        "table": table,
        "two_1_thread_processes": {
            "ms_per_step_each": pair_ms,
            "steps_per_s_together": round(sum(1e3 / m for m in pair_ms), 2),
            "steps_per_s_one_2_thread_process_alone": round(1e3 / default_2["alone_ms"], 2),
        },
    }
