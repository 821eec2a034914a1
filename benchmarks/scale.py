"""Scale benchmark: tokens/s of the head-restricted gradient + score pass (streaming scores: what
the Pythia presets run) and of training steps, at Pythia-14M, 70M and 160M shapes (random
initialisation, 2,048-token rows, vocabulary 50,304), with 1 and 2 processes, on whatever device
the machine has; and the projected wall time of the paper's two windows at the measured rates.

    python benchmarks/scale.py --json benchmarks/results/scale-cpu.json              # this machine
    python benchmarks/scale.py --sizes 14m 70m 160m --procs 1 --json out.json     # a GPU node

Not a test: nothing in CI runs it. Each measurement times whole steps after warm-up steps (CUDA
synchronised), on random token rows (the arithmetic does not depend on the tokens). With
`--procs 2` the script starts itself as 2 torchrun ranks (gloo on CPU, NCCL on GPUs; one GPU per
rank, so a machine with one GPU measures 1 process only) and reports their summed tokens/s.

Anchor (shared/ANCHORS.md): bergson builds Pythia-160M gradients at ≈ 38 k tokens/s on one GH200
(1,024-token rows, projection 16, every parameter); our pass backpropagates only to the target
layer and forms only the head's gradient. Goal: ≥ 2× bergson per GPU at Pythia-160M.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {  # layers, d_model, heads, d_mlp (Pythia's configs)
    "14m": (6, 128, 4, 512),
    "70m": (6, 512, 8, 2048),
    "160m": (12, 768, 12, 3072),
}
HEADS = {"14m": (2, 2), "70m": (3, 3), "160m": (5, 10)}  # the paper's heads where it names them
BLOCKS = {"14m": "qk", "70m": "qkvo", "160m": "qkvo"}     # as the presets score them
ROW_TOKENS, VOCAB, STEP_ROWS = 2048, 50304, 1024
WINDOWS = {  # preset: (size, window steps, steps pretrained before retraining can start)
    "pythia-14m-prevtoken (hub checkpoints)": ("14m", 1000, 0),
    "pythia-14m-pretrain": ("14m", 1000, 2000),
    "pythia-160m-induction": ("160m", 800, 1000),
}
BERGSON_160M_TOKENS_PER_S = 38_000


def build(size: str, rt):
    import torch

    from mda.core.config import Model
    from mda.model.neox import neox_config, new_model

    layers, d, heads, mlp = SHAPES[size]
    model = new_model(neox_config(Model(layers=layers, hidden_size=d, heads=heads, intermediate_size=mlp,
                                        rotary_pct=0.25, max_position_embeddings=ROW_TOKENS, vocab_size=VOCAB),
                                  VOCAB), seed=0)
    del torch
    return rt.prepare(model)


def rows(n: int, seed: int):
    import torch

    return torch.randint(2, 50277, (n, ROW_TOKENS + 1), generator=torch.Generator().manual_seed(seed))


def sync(rt):
    import torch

    if rt.device.type == "cuda":
        torch.cuda.synchronize()


def timed(rt, fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    sync(rt)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(rt)
    return time.perf_counter() - start


def bench_gradients(size: str, rt, batch: int, repeats: int) -> dict:
    """The streaming score pass: per-sample gradients of the target head's blocks (backprop
    truncated at its layer) dotted with a preconditioned probe vector, per batch of rows."""
    import torch

    from mda.core.config import Influence
    from mda.model.heads import Head, head_blocks
    from mda.attribute.gradient_cache import grad_shape
    from mda.attribute.scoring import score_batch
    from mda.attribute.window import Setup

    model = build(size, rt)
    head = Head(*HEADS[size])
    s = Setup(model, 0, [head], {head.name: head_blocks(model.config, head, BLOCKS[size])}, (0, 0), None,
              "induction", "", rt)
    vectors = {b.name: torch.randn(*grad_shape(s, b), dtype=torch.float64) for b in s.all_blocks}
    inf = Influence(blocks=BLOCKS[size], mode="streaming")
    ids = rows(batch, rt.rank)
    seconds = timed(rt, lambda: score_batch(inf, s, ids, vectors), warmup=2, repeats=repeats)
    return {"batch_rows": batch, "repeats": repeats, "seconds": seconds,
            "tokens_per_s": batch * ROW_TOKENS * repeats / seconds,
            "head": head.name, "blocks": BLOCKS[size],
            "floats_per_sample": sum(a * b for a, b in (grad_shape(s, b) for b in s.all_blocks))}


def bench_training(size: str, rt, batch: int, repeats: int) -> dict:
    """Training steps (forward + backward of every parameter, AdamW) on `batch` rows per step,
    `rt.micro_batch` rows per forward, split over the ranks."""
    from mda.core.config import Pretrain
    from mda.train.loop import Trainer

    trainer = Trainer(build(size, rt), Pretrain(warmup_steps=10), total_steps=1000, rt=rt)
    ids = rows(batch, 0)
    losses = []
    seconds = timed(rt, lambda: losses.append(trainer.step(ids)), warmup=1, repeats=repeats)
    return {"batch_rows": batch, "micro_batch": rt.micro_batch, "repeats": repeats, "seconds": seconds,
            "tokens_per_s": batch * ROW_TOKENS * repeats / seconds, "first_loss": losses[0], "last_loss": losses[-1]}


def measure(args) -> dict:
    """This process's (rank's) measurements; ranks' results are gathered on every rank."""
    import torch

    from mda.core.compute import runtime
    from mda.core.config import Compute

    compute = Compute(device=args.device, dtype=args.dtype, micro_batch=args.micro_batch,
                      procs=int(os.environ.get("LOCAL_WORLD_SIZE", 1)), threads=args.threads)
    rt = runtime(compute)
    out = {}
    for size in args.sizes:
        entry = {}
        for name, fn, batch in (("gradients_scores", bench_gradients, args.grad_batch),
                                ("training", bench_training, args.train_batch)):
            if rt.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            result = fn(size, rt, batch, args.repeats)
            if rt.device.type == "cuda":
                result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
            entry[name] = result
            if rt.is_main:
                print(f"{size} {name}: {result['tokens_per_s']:,.0f} tokens/s on rank 0", flush=True)
        out[size] = entry
    gathered = rt.gather_objects(out)
    device = str(torch.cuda.get_device_name(rt.device)) if rt.device.type == "cuda" else platform.processor() or "cpu"
    return {"device": device, "device_type": rt.device.type, "dtype": args.dtype, "world_size": rt.world_size,
            "threads_per_process": rt.threads, "torch": torch.__version__, "ranks": gathered}


def summarise(runs: dict[int, dict]) -> dict:
    """Tokens/s per size and process count (summed over ranks), bergson's ratio, and projections."""
    table, projections = {}, {}
    for procs, run in runs.items():
        for size in run["ranks"][0]:
            for phase in ("gradients_scores", "training"):
                if phase == "gradients_scores":  # every rank scores its own rows: rates add up
                    rate = sum(r[size][phase]["tokens_per_s"] for r in run["ranks"])
                else:  # ranks split each step's rows: one step's rows over the slowest rank's time
                    rate = run["ranks"][0][size][phase]["batch_rows"] * ROW_TOKENS * run["ranks"][0][size][phase][
                        "repeats"] / max(r[size][phase]["seconds"] for r in run["ranks"])
                table.setdefault(size, {}).setdefault(phase, {})[f"{procs}_procs_tokens_per_s"] = rate
    for preset, (size, steps, pretrain_steps) in WINDOWS.items():
        if size not in table:
            continue
        tokens = steps * STEP_ROWS * ROW_TOKENS
        grad = table[size]["gradients_scores"].get("1_procs_tokens_per_s")
        train = table[size]["training"].get("1_procs_tokens_per_s")
        projections[preset] = {
            "window_tokens": tokens,
            "scores_hours_1_device": tokens / grad / 3600 if grad else None,
            "retrain_hours_per_arm_1_device": tokens / train / 3600 if train else None,
            "pretrain_hours_1_device": pretrain_steps * STEP_ROWS * ROW_TOKENS / train / 3600 if train and pretrain_steps else 0,
        }
    out = {"tokens_per_s": table, "projections": projections}
    grad160 = table.get("160m", {}).get("gradients_scores", {}).get("1_procs_tokens_per_s")
    if grad160:
        out["bergson_160m_ratio"] = grad160 / BERGSON_160M_TOKENS_PER_S
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["14m"], choices=list(SHAPES))
    p.add_argument("--procs", nargs="+", type=int, default=[1, 2])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--grad-batch", type=int, default=None, help="rows per gradient batch (default 8 GPU, 1 CPU)")
    p.add_argument("--train-batch", type=int, default=None, help="rows per training step (default 16 GPU, 2 CPU)")
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default 10 GPU, 2 CPU)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path)
    p.add_argument("--rank-output", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.device = "cuda" if cuda else "cpu"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.grad_batch = args.grad_batch or (8 if cuda else 1)
    args.train_batch = args.train_batch or (16 if cuda else 2)
    args.micro_batch = args.micro_batch or (8 if cuda else 1)
    args.repeats = args.repeats or (10 if cuda else 2)
    if args.rank_output:  # a torchrun rank of `--procs 2`
        result = measure(args)
        if int(os.environ.get("RANK", 0)) == 0:
            args.rank_output.write_text(json.dumps(result))
        return
    runs, skipped = {}, {}
    for procs in args.procs:
        available = torch.cuda.device_count() if cuda else (os.cpu_count() or 1)
        if procs > available:
            skipped[procs] = f"{procs} processes need {procs} {'GPUs' if cuda else 'cores'}; this machine has {available}"
            print(f"skip {procs} processes: {skipped[procs]}", flush=True)
            continue
        threads = args.threads or max(1, (os.cpu_count() or 1) // procs if not cuda else 4)
        out = ROOT / f".scale-rank-{os.getpid()}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
               __file__, "--sizes", *args.sizes, "--device", args.device, "--dtype", args.dtype,
               "--grad-batch", str(args.grad_batch), "--train-batch", str(args.train_batch),
               "--micro-batch", str(args.micro_batch), "--repeats", str(args.repeats), "--threads", str(threads),
               "--rank-output", str(out)]
        print(f"{procs} process(es), {threads} threads each:", flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        runs[procs] = json.loads(out.read_text())
        out.unlink()
    result = {"runs": {str(k): v for k, v in runs.items()}, "skipped": {str(k): v for k, v in skipped.items()},
              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "rank_output")},
              "row_tokens": ROW_TOKENS, "vocab": VOCAB, **summarise(runs),
              "anchor": "bergson: Pythia-160M gradient build ≈ 38k tokens/s on one GH200 (1,024-token rows, "
                        "projection 16, every parameter); goal ≥ 2× per GPU"}
    print(json.dumps({k: result[k] for k in ("tokens_per_s", "projections", "skipped")}, indent=2))
    if "bergson_160m_ratio" in result:
        print(f"160m gradient+score pass / bergson: {result['bergson_160m_ratio']:.2f}×")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
