"""`benchmarks/default.py --only levers`: what each speed lever of the training loop and the
evaluations buys, measured side by side in one process, and whether it keeps the bits."""

from __future__ import annotations

import time


from default_common import StepClock, _ratio, default_trainer, load_average, median_ms, paired, random_rows


def lever_optimizer(params, vocab: int, steps: int) -> dict:
    """AdamW + clipping: per-parameter loops (before) vs foreach (now) vs fused AdamW, trained
    side by side on the same batches; with the optimizer and clipping phases of each step."""
    import torch

    from mda.train.loop import lr_factor

    variants = {"loops (foreach=False, before)": default_trainer(params, vocab, foreach=False),
                "foreach (now)": default_trainer(params, vocab),
                "fused AdamW + foreach clip": default_trainer(params, vocab)}
    fused, r = variants["fused AdamW + foreach clip"], params.pretrain
    groups = [{k: v for k, v in g.items() if k not in ("foreach", "fused")} for g in fused.optimizer.param_groups]
    fused.optimizer = torch.optim.AdamW(groups, fused=True)
    fused.scheduler = torch.optim.lr_scheduler.LambdaLR(
        fused.optimizer, lambda s: lr_factor(s, r.warmup_steps, params.corpus.steps, r.min_lr_ratio))
    return _side_by_side(variants, params, vocab, steps, phases=("optimizer", "clip (+ loss sum)"))


def lever_probe_batch(params, vocab: int, reps: int) -> dict:
    """All seeds' evaluation probes in one forward vs one forward per seed (as run_arm does)."""
    import numpy as np
    import torch

    from mda.units.measure import checkpoint_metrics
    from mda.units.probes import evaluation_probes
    from mda.units.metrics import ATTENTION_METRICS, attention_patterns

    model = default_trainer(params, vocab).model.eval()
    probes = evaluation_probes(params, model.config, vocab, list(params.retrain.seeds))
    ms = params.locate.max_sequences

    def per_seed():
        return [checkpoint_metrics(model, p, None, ms, full=False)[0] for p in probes.values()]

    def batched():
        everything = torch.cat(list(probes.values()))
        patterns = attention_patterns(model, everything)
        out, at = [], 0
        for p in probes.values():
            part = patterns[:, at:at + len(p)]
            out.append({k: f(part, p).reshape(-1) for k, f in ATTENTION_METRICS.items()})
            at += len(p)
        return out

    same = all(np.array_equal(frame[k].to_numpy(), cols[k].double().numpy())  # as checkpoint_metrics stores them
               for frame, cols in zip(per_seed(), batched()) for k in ATTENTION_METRICS)
    t = paired({"one forward per seed (now)": per_seed, "one forward for all seeds": batched}, reps)
    return {**t, "metrics": "bit-identical" if same else "differ"}


def lever_heldout_chunks(params, vocab: int, reps: int) -> dict:
    """Held-out token losses in one forward (locate.max_sequences = 1024 > 256 rows: before) vs
    chunks (16: now, `mda.units.measure.HELDOUT_ROWS_PER_FORWARD`)."""
    import torch

    from mda.model.losses import token_losses

    model = default_trainer(params, vocab).model.eval()
    heldout = random_rows(params, vocab, params.locate.heldout_rows, 3)

    def losses(chunk):
        with torch.no_grad():
            return torch.cat([token_losses(model, rows) for rows in heldout.split(chunk)])

    ref = losses(params.locate.max_sequences)
    fns = {f"chunks of {c}": (lambda c=c: losses(c)) for c in (params.locate.max_sequences, 64, 16, 4)}
    t = paired(fns, reps)
    t["losses"] = {n: "bit-identical" if torch.equal(f(), ref) else
                   f"differ (max |diff| {(f() - ref).abs().max().item():.3g})" for n, f in fns.items()}
    return t


def lever_sdpa(params, vocab: int, steps: int) -> dict:
    """PyTorch's fused attention (SDPA) for training on CPU instead of the eager kernel."""
    eager, sdpa = default_trainer(params, vocab), default_trainer(params, vocab)
    sdpa.model.set_attn_implementation("sdpa")
    return _side_by_side({"eager attention (now)": eager, "sdpa attention": sdpa}, params, vocab, steps)


def lever_compile(params, vocab: int, steps: int) -> dict:
    """torch.compile of the model (forward and backward through AOTAutograd/Inductor)."""
    import torch

    eager, compiled = default_trainer(params, vocab), default_trainer(params, vocab)
    batch = random_rows(params, vocab, params.corpus.batch_size, 9)
    compiled.model.compile()
    start = time.perf_counter()
    compiled.step(batch)  # compiles
    compile_s = time.perf_counter() - start
    eager.step(batch)
    out = _side_by_side({"eager (now)": eager, "torch.compile": compiled}, params, vocab, steps)
    gain_ms = out["eager (now)"]["step_ms"] - out["torch.compile"]["step_ms"]
    out["compile_s"] = round(compile_s, 1)
    out["steps_to_repay_compile"] = round(1e3 * compile_s / gain_ms) if gain_ms > 0 else None
    torch._dynamo.reset()
    return out


def _side_by_side(trainers: dict, params, vocab: int, steps: int, settings: dict | None = None,
                  phases: tuple[str, ...] = ()) -> dict:
    """Train each on the same batches, interleaved (the order rotates every step); per variant the
    median wall and process-CPU ms per step, the medians of the per-step ratios to the first
    variant, and its weights vs the first's. `settings[name]()` runs before each of its steps;
    `phases`: StepClock phases to report too (median wall ms)."""
    names = list(trainers)
    settings = settings or {}
    clocks = {n: StepClock(t) for n, t in trainers.items()} if phases else {}
    split = {n: [] for n in names}
    batches = random_rows(params, vocab, params.corpus.batch_size * steps, 5).split(params.corpus.batch_size)
    wall, cpu = {n: [] for n in names}, {n: [] for n in names}
    for i, ids in enumerate(batches):
        for n in names[i % len(names):] + names[:i % len(names)]:
            settings.get(n, lambda: None)()
            c, w = time.process_time(), time.perf_counter()
            trainers[n].step(ids)
            wall[n].append(time.perf_counter() - w)
            cpu[n].append(time.process_time() - c)
            if clocks:
                split[n].append(clocks[n].phases(w, w + wall[n][-1]))
    for clock in clocks.values():
        clock.remove()
    ref = trainers[names[0]].model.state_dict()
    out = {}
    for n in names:
        w = trainers[n].model.state_dict()
        diff = max((w[k] - ref[k]).abs().max().item() for k in ref)
        out[n] = {"step_ms": median_ms(wall[n][3:]), "step_cpu_ms": median_ms(cpu[n][3:]),
                  "wall_ratio_to_first": _ratio(wall[n][3:], wall[names[0]][3:]),
                  "cpu_ratio_to_first": _ratio(cpu[n][3:], cpu[names[0]][3:]),
                  **{f"{k} ms": median_ms([x[k] for x in split[n][3:]]) for k in phases},
                  f"weights after {steps} steps": "bit-identical" if diff == 0 else f"differ (max |diff| {diff:.3g})"}
    return out


def lever_determinism(params, vocab: int, steps: int) -> dict:
    """`torch.use_deterministic_algorithms(True)` (the stages set it) also fills every new tensor
    with NaN (`torch.utils.deterministic.fill_uninitialized_memory`) unless told not to; and
    without deterministic algorithms at all."""
    import torch

    def mode(deterministic: bool, fill: bool):
        def apply():
            torch.use_deterministic_algorithms(deterministic)
            torch.utils.deterministic.fill_uninitialized_memory = fill
        return apply

    names = {"deterministic, NaN-fill new memory (before)": mode(True, True),
             "deterministic, no fill (now)": mode(True, False),
             "not deterministic": mode(False, False)}
    try:
        return _side_by_side({n: default_trainer(params, vocab) for n in names}, params, vocab, steps, names)
    finally:
        mode(True, False)()


def levers(params, vocab: int, quick: bool, compile_: bool) -> dict:
    import torch

    from mda.train.loop import deterministic

    torch.set_num_threads(params.compute.threads)
    deterministic("cpu")
    load = [load_average()]
    steps, reps = (30, 5) if quick else (100, 15)
    out = {"optimizer": lever_optimizer(params, vocab, steps),
           "determinism_fill": lever_determinism(params, vocab, steps),
           "evaluation_probes_in_one_forward": lever_probe_batch(params, vocab, reps),
           "heldout_chunks": lever_heldout_chunks(params, vocab, reps),
           "sdpa_attention": lever_sdpa(params, vocab, steps)}
    if compile_:
        torch.use_deterministic_algorithms(False)  # Inductor's CPU kernels are not all marked deterministic
        try:
            out["torch_compile"] = lever_compile(params, vocab, steps)
        except Exception as err:  # no compiler, or an Inductor failure: record it
            out["torch_compile"] = {"error": str(err).splitlines()[0][:300]}
    load.append(load_average())
    out["load_average_before_after"] = load
    return out
