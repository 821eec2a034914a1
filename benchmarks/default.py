"""Profile of the default pipeline (`dvc repro` on `params.yaml`): where its time goes, how far a
training step is from the arithmetic floor, how the step behaves beside a busy neighbour, and
what each speed lever buys. Not a test: nothing in CI runs it.

    python benchmarks/default.py --quick                # a few minutes; writes benchmarks/results/default-profile.json
    python benchmarks/default.py                        # the full profile (about 20-30 minutes on 2 cores)
    python benchmarks/default.py --only contention      # one section (merged into the JSON)
    python benchmarks/default.py --only stages --mlflow path/to/mlflow.db   # stage wall times of a finished run
    python benchmarks/default.py repro --cwd CLONE      # run `dvc repro` in CLONE, timed per stage, + peak RSS

Sections (each writes its key of the JSON):

- `contention`: ms per default training step (3 layers, d = 64, 16 × 64-token rows, CPU float32),
  alone and beside one busy single-thread process, for torch threads 1 and 2 and the OpenMP
  settings that matter (torch's CPU wheel runs GNU OpenMP, libgomp: `OMP_WAIT_POLICY`,
  `GOMP_SPINCOUNT`; `KMP_BLOCKTIME` is Intel OpenMP's and is listed to show it does nothing).
  Each setting runs in a fresh process (libgomp reads its environment once, when torch loads
  it); medians over steps, then over repeats, interleaved so that drift in the machine's load
  hits every setting alike. Also two 1-thread training processes side by side (throughput).
- `profile`: inside one training step (hooks on the real `Trainer.step`: forward, backward,
  clipping, optimizer, the rest), reading a step from the stream, one retraining evaluation
  (probe forwards and metrics, held-out loss/ICL, the resume-point save), one pretraining
  checkpoint save, and process start-up (imports, a no-op stage launch); then the default
  stages `checkpoints` and `retrain` (all arms) composed from these unit costs.
- `floor`: matmul FLOPs per training step counted from the shapes, ÷ this machine's measured
  float32 matmul throughput (a large square matmul: the peak; and the model's own matmul
  shapes), per step and per stage.
- `levers`: before/after ratios measured in one process, paired and interleaved: AdamW and
  clipping per-parameter loops (before) vs multi-tensor `foreach` kernels (now) vs fused AdamW;
  all evaluation probes in one forward; held-out loss in smaller chunks; SDPA attention;
  `torch.compile` (full run only). Each says whether its numbers are bit-identical.
- `stages`: wall time per stage of a finished `dvc repro`, from the MLflow store (`mlflow.db`)
  and/or a log written by the `repro` subcommand.

On a shared machine absolute times are unreliable; the ratios within one section's run are
the numbers to quote (the JSON records the load average before and after each section).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))  # the default_* modules beside this file
from default_common import (RESULTS, ROOT, StepClock, _timed, default_params, default_trainer, load_average, median_ms, paired,
                            random_rows, vocab_size)
from default_contention import contention, worker
from default_levers import levers
sys.path.insert(0, str(ROOT))

# name: the OpenMP environment of the worker (every variable of OMP_VARS not named is unset)


# ----------------------------------------------------------------------------- the default model


# ----------------------------------------------------------------------------- contention


# ----------------------------------------------------------------------------- profile


def timed_steps(trainer, batches, warmup: int, clock: StepClock | None = None) -> list[dict[str, float]]:
    """Per step after `warmup`: wall seconds of each phase (or just 'step' without a clock)."""
    out = []
    for i, ids in enumerate(batches):
        start = time.perf_counter()
        trainer.step(ids)
        end = time.perf_counter()
        if i >= warmup:
            out.append(clock.phases(start, end) if clock else {"step": end - start})
    return out


def phase_medians(steps: list[dict[str, float]]) -> dict[str, float]:
    out = {k: median_ms([s[k] for s in steps]) for k in steps[0]}
    out["step (sum of medians)"] = round(sum(out.values()), 3)
    return out


def profile_training(params, vocab: int, steps: int) -> dict:
    import torch

    trainer = default_trainer(params, vocab)
    clock = StepClock(trainer)
    batches = random_rows(params, vocab, params.corpus.batch_size * (steps + 5), 1).split(params.corpus.batch_size)
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    per_step = timed_steps(trainer, batches, warmup=5, clock=clock)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    clock.remove()
    top = top_ops(trainer, batches[:6])
    return {"ms": phase_medians(per_step), "steps": len(per_step),
            "cpu_seconds_per_wall_second": round(cpu / wall, 2), "threads": torch.get_num_threads(),
            "top_ops_self_cpu": top}


def top_ops(trainer, batches, n: int = 15) -> list[dict]:
    """torch.profiler's heaviest operators (self CPU time) over a few steps; the profiler's own
    overhead inflates small operators, so read it for which ops, not for the split."""
    from torch.profiler import ProfilerActivity, profile

    trainer.step(batches[0])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for ids in batches[1:]:
            trainer.step(ids)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    steps = len(batches) - 1
    return [{"op": e.key, "calls_per_step": e.count / steps,
             "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3)} for e in rows]


def profile_data(params, vocab: int, steps: int) -> dict:
    """Reading a step from a stream on disk (what pretraining and retraining do per step)."""
    import torch

    from mda.data.stream import Stream, StreamWriter, stream_table
    from mda.intervene.edits import StreamEdit

    n = steps + params.corpus.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        rows = random_rows(params, vocab, n * params.corpus.batch_size, 2).numpy()
        with StreamWriter(Path(tmp) / "stream", params.corpus.batch_size) as writer:
            writer.write(stream_table(rows, ["prose"] * len(rows), 0, params.corpus.batch_size))
        stream, edit = Stream(Path(tmp) / "stream"), StreamEdit()
        start = time.perf_counter()
        for step, ids, _ in stream.batches(0, n - 1):
            ids, weights = edit.apply(step, ids)
            torch.as_tensor(ids)
        wall = time.perf_counter() - start
    return {"ms_per_step": round(1e3 * wall / n, 4), "steps": n,
            "what": "Stream.batches (row-group decode amortised) + StreamEdit.apply + torch.as_tensor"}


def profile_evaluation(params, vocab: int, reps: int) -> dict:
    """One retraining evaluation as `mda.intervene.retrain.run_arm` makes it: `checkpoint_metrics` for the
    first seed with the held-out rows, for the others without; then the resume-point save."""
    import pandas as pd
    import torch

    from mda.core.io import atomic_dir, write_json
    from mda.model.losses import token_losses
    from mda.units.measure import HELDOUT_ROWS_PER_FORWARD, checkpoint_metrics
    from mda.model.neox import TRAINER_STATE, save_model
    from mda.units.probes import evaluation_probes
    from mda.units.metrics import attention_patterns

    trainer = default_trainer(params, vocab)
    model = trainer.model.eval()
    seeds = list(params.retrain.seeds)
    probes = evaluation_probes(params, model.config, vocab, seeds)
    probe = probes[seeds[0]]
    heldout = random_rows(params, vocab, params.locate.heldout_rows, 3)
    ms = params.locate.max_sequences
    heads, row = checkpoint_metrics(model, probe, heldout, ms, full=False)
    # the trajectory a resume point holds half-way through a run: 13 evaluations x seeds
    trajectory = pd.concat([heads.assign(step=0, seed=0, **row)] * (13 * len(seeds)), ignore_index=True)

    def heldout_losses():
        with torch.no_grad():
            return torch.cat([token_losses(model, rows) for rows in heldout.split(min(ms, HELDOUT_ROWS_PER_FORWARD))])

    work = Path(tempfile.mkdtemp())

    def save_resume_point():  # the body of run_arm's checkpoint()
        with atomic_dir(work / "resume") as tmp:
            save_model(model, tmp)
            torch.save(trainer.state_dict(next_step=1), tmp / TRAINER_STATE)
            trajectory.to_parquet(tmp / "trajectory.parquet", index=False)
            write_json(tmp / "progress.json", {"losses": [[i, 1.0] for i in range(1250)], "reproduces": None,
                                               "fresh": False})

    parts = {
        "probe forward (attention patterns)": lambda: attention_patterns(model, probe),
        "checkpoint_metrics, no held-out": lambda: checkpoint_metrics(model, probe, None, ms, full=False),
        "checkpoint_metrics, with held-out": lambda: checkpoint_metrics(model, probe, heldout, ms, full=False),
        "held-out token losses": heldout_losses,
        "resume-point save": save_resume_point,
    }
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        times = paired(parts, reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t = times["median_ms"]
    probe_ms = t["checkpoint_metrics, no held-out"]
    return {
        "ms": t,
        "derived_ms": {
            "probe metrics (after the forward)": round(probe_ms - t["probe forward (attention patterns)"], 3),
            "evaluation, fixed arm (all seeds' probes + held-out)":
                round(t["checkpoint_metrics, with held-out"] + (len(seeds) - 1) * probe_ms, 3),
            "evaluation, random arm (one probe + held-out)": t["checkpoint_metrics, with held-out"],
        },
        "seeds": seeds, "probe_rows": len(probe), "heldout_rows": len(heldout),
    }


def profile_checkpoint(params, vocab: int, reps: int) -> dict:
    """One pretraining checkpoint: induction scores on the probe + model, trainer state, log."""
    import torch

    from mda.core.io import atomic_dir, write_json
    from mda.model.neox import TRAINER_STATE, save_model
    from mda.train.pretrain import induction_scores
    from mda.units.probes import pretraining_probe

    trainer = default_trainer(params, vocab)
    probe = pretraining_probe(params, vocab, (0, 1))
    work = Path(tempfile.mkdtemp())

    def save():
        scores = induction_scores(trainer.model, probe)
        with atomic_dir(work / "step") as tmp:
            save_model(trainer.model, tmp)
            torch.save(trainer.state_dict(next_step=1), tmp / TRAINER_STATE)
            write_json(tmp / "log.json", {"losses": [[i, 1.0, 1e-3] for i in range(500)], "induction": scores.tolist()})
        trainer.model.train()

    try:
        return {"ms": paired({"checkpoint save": save}, reps)["median_ms"]["checkpoint save"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def startup(reps: int) -> dict:
    """Wall and CPU seconds of starting Python with what a stage imports, and of a stage launch
    that stops at its argument check (`python -m mda.core.launch 1 stages.retrain <no such arm>`)."""
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import torch": [sys.executable, "-c", "import torch"],
        "import mda.train.loop": [sys.executable, "-c", "import mda.train.loop"],
        "import mda.model.neox (transformers)": [sys.executable, "-c", "import mda.model.neox"],
        "import stages.retrain": [sys.executable, "-c", "import stages.retrain"],
        "import mlflow (at the stage's MLflow run)": [sys.executable, "-c", "import mlflow"],
        "no-op stage launch": [sys.executable, "-m", "mda.core.launch", "1", "stages.retrain", "no-such-arm"],
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = {}
    for name, cmd in commands.items():
        walls, cpus = [], []
        for _ in range(reps):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True)
            walls.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        out[name] = {"wall_s": round(statistics.median(walls), 3), "cpu_s": round(statistics.median(cpus), 3)}
    return out


def profile(params, vocab: int, quick: bool) -> dict:
    import torch

    from mda.train.loop import deterministic

    torch.set_num_threads(params.compute.threads)
    deterministic("cpu")
    load = [load_average()]
    out = {
        "training_step": profile_training(params, vocab, 20 if quick else 80),
        "data_reading": profile_data(params, vocab, 200 if quick else 1000),
        "retraining_evaluation": profile_evaluation(params, vocab, 3 if quick else 10),
        "pretraining_checkpoint": profile_checkpoint(params, vocab, 3 if quick else 10),
        "startup": startup(2 if quick else 5),
    }
    load.append(load_average())
    out["load_average_before_after"] = load
    return out


# ----------------------------------------------------------------------------- floor
def step_flops(params, vocab: int) -> dict:
    """Matmul FLOPs of one training step, from the shapes (2 per multiply-add; backward = 2 x
    forward). The embedding is a lookup (0); LayerNorm, GELU, softmax and the optimizer are
    elementwise (memory-bound, not counted). Attention scores are counted over the whole
    seq x seq square, as the eager kernel computes them before masking."""
    m, c = params.model, params.corpus
    d, ff, layers, seq = m.hidden_size, m.intermediate_size, m.layers, c.seq_len
    tokens = c.batch_size * seq
    per_token = {
        "attention projections (qkv, dense)": layers * 2 * (3 * d * d + d * d),
        "attention scores and mixing": layers * 2 * 2 * seq * d,
        "mlp": layers * 2 * 2 * d * ff,
        "unembedding": 2 * d * vocab,
    }
    forward = {k: v * tokens for k, v in per_token.items()}
    return {"forward": forward, "forward_total": sum(forward.values()), "training_step": 3 * sum(forward.values()),
            "tokens_per_step": tokens}


def matmul_gflops(n: int, threads: int, reps: int) -> float:
    """Best float32 GFLOP/s of an n x n matmul (the best round: the floor is what the cores can do)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def model_shape_matmuls(params, vocab: int, threads: int, reps: int) -> dict:
    """The forward's matmuls at the default model's own shapes (small: far below peak)."""
    import torch

    torch.set_num_threads(threads)
    m, c = params.model, params.corpus
    d, ff, seq, heads = m.hidden_size, m.intermediate_size, c.seq_len, m.heads
    t = c.batch_size * seq
    x, q = torch.randn(t, d), torch.randn(c.batch_size * heads, seq, d // heads)
    shapes = {"qkv": (x, torch.randn(d, 3 * d)), "dense": (x, torch.randn(d, d)), "mlp in": (x, torch.randn(d, ff)),
              "mlp out": (torch.randn(t, ff), torch.randn(ff, d)), "unembedding": (x, torch.randn(d, vocab))}
    per_layer = {"qkv", "dense", "mlp in", "mlp out"}
    seconds, flops = 0.0, 0
    for name, (a, b) in shapes.items():
        s = min(_timed(lambda: a @ b) for _ in range(reps))
        k = m.layers if name in per_layer else 1
        seconds += k * s
        flops += k * 2 * a.shape[0] * a.shape[1] * b.shape[1]
    kt = q.transpose(1, 2)
    s = min(_timed(lambda: torch.bmm(torch.bmm(q, kt), q)) for _ in range(reps))
    seconds += m.layers * s
    flops += m.layers * 2 * 2 * q.shape[0] * seq * seq * q.shape[2]
    return {"forward_matmul_ms": round(1e3 * seconds, 3), "gflops": round(flops / seconds / 1e9, 2)}


def floor(params, vocab: int, quick: bool) -> dict:
    import torch

    flops = step_flops(params, vocab)
    n, reps = (1024, 5) if quick else (2048, 10)
    load = [load_average()]
    peak = {t: round(matmul_gflops(n, t, reps), 2) for t in (1, 2)}
    shapes = {t: model_shape_matmuls(params, vocab, t, 20 if quick else 50) for t in (1, 2)}
    torch.set_num_threads(params.compute.threads)
    load.append(load_average())
    threads = params.compute.threads
    return {
        "flops": flops,
        "matmul": {"square_n": n, "peak_gflops_by_threads": peak, "model_shapes_by_threads": shapes},
        "floor_ms_per_step": {
            "at peak matmul throughput": round(1e3 * flops["training_step"] / (peak[threads] * 1e9), 3),
            "at the model's matmul shapes (3 x forward matmuls)": round(3 * shapes[threads]["forward_matmul_ms"], 3),
        },
        "threads": threads, "load_average_before_after": load,
    }


# ----------------------------------------------------------------------------- levers


# ----------------------------------------------------------------------------- stage wall times
def stages_from_mlflow(db: Path, pipeline: str | None = None) -> dict:
    """Per DVC stage of one pipeline run in the MLflow store: its MLflow run span, and its wall
    time from the previous stage's end (stages of a `dvc repro` run one after another, so this
    includes process start-up and the work before the stage opens its run: retraining opens its
    runs only after training)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    tags = {}
    for run, key, value in con.execute("select run_uuid, key, value from tags where key in "
                                       "('stage', 'pipeline_id', 'arm', 'seed', 'trained_once')"):
        tags.setdefault(run, {})[key] = value
    runs = [(r, s, e) for r, s, e in con.execute("select run_uuid, start_time, end_time from runs "
                                                 "where end_time is not null and status = 'FINISHED'")]
    con.close()
    if not runs:
        return {"source": db.name, "error": "no finished runs"}
    by_pipeline = {}
    for r, s, e in runs:
        by_pipeline.setdefault(tags.get(r, {}).get("pipeline_id"), []).append((r, s, e))
    pipeline = pipeline or max(by_pipeline, key=lambda p: max(e for _, _, e in by_pipeline[p]))
    groups: dict[str, list[int]] = {}
    for r, s, e in by_pipeline[pipeline]:
        t = tags.get(r, {})
        name = t.get("stage", "?")
        if "arm" in t:  # a fixed arm logs one run per seed; a random arm is its own stage
            name = f"retrain-fixed@{t['arm']}" if t.get("trained_once") == "true" else f"retrain@{t['arm']}-{t.get('seed')}"
        g = groups.setdefault(name, [s, e])
        g[0], g[1] = min(g[0], s), max(g[1], e)
    order = sorted(groups, key=lambda n: groups[n][1])
    out, previous_end = {}, None
    for name in order:
        s, e = groups[name]
        out[name] = {"mlflow_run_s": round((e - s) / 1e3, 1),
                     "wall_s": round((e - (previous_end if previous_end is not None else s)) / 1e3, 1)}
        previous_end = e
    return {"source": db.name, "pipeline_id": pipeline, "stages": out,
            "total_wall_s": round((groups[order[-1]][1] - groups[order[0]][0]) / 1e3, 1),
            "note": "wall_s: from the previous stage's end to this stage's end (sequential dvc repro); the first "
                    "stage's start-up before its MLflow run opens is not included"}


STAGE_LINE = re.compile(r"^(\d+(?:\.\d+)?) .*Running stage '([^']+)'")
TIMESTAMP = re.compile(r"^(\d+(?:\.\d+)?) ")


def stages_from_log(log: Path) -> dict:
    """Per stage wall time from a log whose lines start with a Unix timestamp (what `repro`
    below writes; `dvc repro 2>&1 | ts %.s` too): from its 'Running stage' line to the next."""
    starts, last = [], None
    for line in log.read_text(errors="replace").splitlines():
        m = TIMESTAMP.match(line)
        if not m:
            continue
        last = float(m.group(1))
        s = STAGE_LINE.match(line)
        if s:
            starts.append((s.group(2), float(s.group(1))))
    stages = {name: {"wall_s": round(((starts[i + 1][1] if i + 1 < len(starts) else last) - t), 1)}
              for i, (name, t) in enumerate(starts)}
    total = round(last - starts[0][1], 1) if starts else 0.0
    return {"source": log.name, "stages": stages, "total_wall_s": total}


def repro(args) -> None:
    """`dvc repro` in `--cwd` under `/usr/bin/time -v`: a timestamped log, per-stage wall times
    (log and MLflow) and the peak RSS, into the JSON's `stages` section."""
    cwd = Path(args.cwd).resolve()
    log = Path(args.log or cwd / "repro-timed.log")
    rusage = log.with_suffix(".time")
    cmd = [sys.executable, "-m", "dvc", "repro", *args.dvc_args]
    if Path("/usr/bin/time").exists():
        cmd = ["/usr/bin/time", "-v", "-o", str(rusage), *cmd]
    start = time.time()
    with open(log, "w") as out, open(log.with_suffix(".err"), "w") as err:
        out.write(f"{start:.3f} $ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=err, text=True)
        for line in proc.stdout:
            out.write(f"{time.time():.3f} {line}")
            out.flush()
            print(line, end="", flush=True)
        rc = proc.wait()
        out.write(f"{time.time():.3f} exit {rc}\n")
    section = {"from_log": stages_from_log(log), "exit_code": rc}
    if rusage.is_file():
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", rusage.read_text())
        section["peak_rss_gb"] = m and round(int(m.group(1)) / 2 ** 20, 2)
        section["peak_rss_note"] = "/usr/bin/time -v: the largest single process of the run"
    if (cwd / "mlflow.db").is_file():
        section["from_mlflow"] = stages_from_mlflow(cwd / "mlflow.db")
    write_results(Path(args.json), {"stages": section})
    print(json.dumps(section, indent=1))


# ----------------------------------------------------------------------------- the two big stages
def compose(prof: dict, fl: dict, params, retrain_steps: int) -> dict:
    """Seconds of the default `checkpoints` and `retrain` stages (all arms) composed from the
    profile's unit costs; the floor per stage at the same step counts."""
    from mda.train.loop import pythia_save_steps

    step = {k: v for k, v in prof["training_step"]["ms"].items() if k != "step (sum of medians)"}
    data = prof["data_reading"]["ms_per_step"]
    ev = prof["retraining_evaluation"]
    start = prof["startup"]["no-op stage launch"]["wall_s"]
    floor_ms = fl["floor_ms_per_step"]["at peak matmul throughput"] if fl else None
    r = params.retrain
    fixed, random_runs = len(r.fixed_arms), len(r.random_arms) * len(r.seeds)
    evals = -(-retrain_steps // r.eval_every) + 1
    pre_steps = params.corpus.steps
    checkpoints = len(pythia_save_steps(pre_steps, params.pretrain.save_every))

    def seconds(steps: int, extra: dict) -> dict:
        parts = {k: round(v * steps / 1e3, 1) for k, v in step.items()}
        parts["data reading"] = round(data * steps / 1e3, 1)
        parts.update({k: round(v, 1) for k, v in extra.items()})
        total = round(sum(parts.values()), 1)
        out = {"seconds": parts, "total_s": total, "steps": steps}
        if floor_ms:
            out["floor_s"] = round(floor_ms * steps / 1e3, 1)
            out["total_over_floor"] = round(total / out["floor_s"], 2)
        return out

    return {
        "checkpoints": seconds(pre_steps, {
            "checkpoint saves (induction scores + files)": checkpoints * prof["pretraining_checkpoint"]["ms"] / 1e3,
            "process start-up": start}),
        "retrain (all arms)": seconds((fixed + random_runs) * retrain_steps, {
            "evaluation": evals * (fixed * ev["derived_ms"]["evaluation, fixed arm (all seeds' probes + held-out)"]
                                   + random_runs * ev["derived_ms"]["evaluation, random arm (one probe + held-out)"]) / 1e3,
            "resume-point saves": (fixed + random_runs) * (evals - 1) * ev["ms"]["resume-point save"] / 1e3,
            "process start-up": (fixed + random_runs) * start}),
        "counts": {"pretraining_steps": pre_steps, "pretraining_checkpoints": checkpoints,
                   "retrain_runs": fixed + random_runs, "retrain_steps_per_run": retrain_steps,
                   "evaluations_per_run": evals},
        "note": "unit costs measured in this run x counts; phases are medians, so the sum is a typical, not a "
                "contended, total",
    }


def retrain_window(data: Path) -> tuple[int, str]:
    targets = data / "locate" / "targets.json"
    if targets.is_file():
        w = json.loads(targets.read_text())["window"]
        return w["end"] - w["start"], "data/locate/targets.json"  # no machine path in committed JSON
    return 2500, "default window of the embedded default run (3500 -> 6000); no data/locate/targets.json here"


# ----------------------------------------------------------------------------- main
def write_results(path: Path, sections: dict) -> None:
    """Merge `sections` into the JSON at `path` (other sections kept)."""
    import torch

    current = json.loads(path.read_text()) if path.is_file() else {}
    current.update(sections)
    current["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    current["caveat"] = ("measured on whatever else the machine was running (see load_average_before_after): compare "
                         "numbers within one section's run; absolute times on a quiet machine will be lower")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=1) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("worker", help="(internal) time default training steps in this process")
    w.add_argument("--threads", type=int, required=True)
    w.add_argument("--steps", type=int, default=20)
    w.add_argument("--warmup", type=int, default=3)
    w.add_argument("--max-seconds", type=float, default=60)
    r = sub.add_parser("repro", help="run `dvc repro` timed per stage (+ peak RSS)")
    r.add_argument("--cwd", default=".")
    r.add_argument("--log")
    r.add_argument("--json", default=str(RESULTS))
    r.add_argument("dvc_args", nargs="*")
    parser.add_argument("--quick", action="store_true", help="fewer settings, steps and repeats (a few minutes)")
    parser.add_argument("--only", default="contention,profile,floor,levers,stages",
                        help="comma-separated sections (default: all)")
    parser.add_argument("--compile", choices=("auto", "yes", "no"), default="auto",
                        help="measure torch.compile (auto: in the full run only)")
    parser.add_argument("--mlflow", help="MLflow store of a finished run (default: ./mlflow.db if present)")
    parser.add_argument("--pipeline", help="pipeline_id to read (default: the latest)")
    parser.add_argument("--repro-log", help="a timestamped `dvc repro` log (see `repro`)")
    parser.add_argument("--data", default=str(ROOT / "data"), help="data/ of a run (for the retraining window)")
    parser.add_argument("--json", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.command == "worker":
        return worker(args)
    if args.command == "repro":
        return repro(args)

    import mda  # noqa: F401  (mda's OpenMP default, before torch starts)

    sections = set(args.only.split(","))
    params, vocab = default_params(), vocab_size()
    out = {}
    if "stages" in sections:
        found = {}
        db = Path(args.mlflow) if args.mlflow else Path.cwd() / "mlflow.db"
        if db.is_file():
            found["from_mlflow"] = stages_from_mlflow(db, args.pipeline)
        if args.repro_log:
            found["from_log"] = stages_from_log(Path(args.repro_log))
        if found:
            out["stages"] = found
    if "contention" in sections:
        out["contention"] = contention(args.quick)
    if "floor" in sections:
        out["floor"] = floor(params, vocab, args.quick)
    if "profile" in sections:
        out["profile"] = profile(params, vocab, args.quick)
        steps, source = retrain_window(Path(args.data))
        stored = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
        out["split"] = compose(out["profile"], out.get("floor") or stored.get("floor"), params, steps)
        out["split"]["retrain_window_from"] = source
    if "levers" in sections:
        out["levers"] = levers(params, vocab, args.quick,
                               args.compile == "yes" or (args.compile == "auto" and not args.quick))
    write_results(Path(args.json), out)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
