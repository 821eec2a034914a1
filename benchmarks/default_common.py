"""What the default-profile benchmarks share (`benchmarks/default.py`): the default model and
trainer, random rows, timing helpers."""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


RESULTS = ROOT / "benchmarks" / "results" / "default-profile.json"


OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


SETTINGS = {
    "unset (libgomp default)": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "OMP_WAIT_POLICY=ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "GOMP_SPINCOUNT=3000": {"GOMP_SPINCOUNT": "3000"},
    "GOMP_SPINCOUNT=10000 (mda default)": {"GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=100000": {"GOMP_SPINCOUNT": "100000"},
    "GOMP_SPINCOUNT=0": {"GOMP_SPINCOUNT": "0"},
    "KMP_BLOCKTIME=0": {"KMP_BLOCKTIME": "0"},
}


QUICK_SETTINGS = ("unset (libgomp default)", "OMP_WAIT_POLICY=PASSIVE", "GOMP_SPINCOUNT=1000",
                  "GOMP_SPINCOUNT=3000", "GOMP_SPINCOUNT=10000 (mda default)")


def default_params():
    from mda.core.config import load_params

    return load_params(ROOT / "params.yaml")


def vocab_size() -> int:
    """The synthetic corpus tokenizer's vocabulary (what `data/corpus/meta.json` records)."""
    from mda.data.synthetic import build_vocabulary

    return build_vocabulary().size


def default_trainer(params, vocab: int, **kwargs):
    from mda.model.neox import neox_config, new_model
    from mda.train.loop import Trainer

    model = new_model(neox_config(params.model, vocab), params.model.init_seed)
    return Trainer(model, params.pretrain, total_steps=params.corpus.steps, **kwargs)


def random_rows(params, vocab: int, n: int, seed: int):
    """`n` rows of `corpus.seq_len + 1` tokens (the arithmetic does not depend on the tokens)."""
    import torch

    return torch.randint(2, vocab, (n, params.corpus.seq_len + 1), generator=torch.Generator().manual_seed(seed))


def median_ms(seconds: list[float]) -> float:
    return round(1e3 * statistics.median(seconds), 3)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired(fns: dict, reps: int) -> dict:
    """Run each of `fns` once per round, in a rotating order (so that load drift hits all alike);
    median wall and process-CPU ms per name, and the medians over rounds of each one's ratios
    to the first."""
    names = list(fns)
    for f in fns.values():  # warm-up
        f()
    wall, cpu = {n: [] for n in names}, {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            c, w = time.process_time(), time.perf_counter()
            fns[n]()
            wall[n].append(time.perf_counter() - w)
            cpu[n].append(time.process_time() - c)
    first = names[0]
    return {"median_ms": {n: median_ms(t) for n, t in wall.items()},
            "median_cpu_ms": {n: median_ms(t) for n, t in cpu.items()},
            "wall_ratio_to_first": {n: _ratio(wall[n], wall[first]) for n in names},
            "cpu_ratio_to_first": {n: _ratio(cpu[n], cpu[first]) for n in names},
            "rounds": reps}


def _ratio(a: list[float], b: list[float]) -> float:
    return round(statistics.median(x / y for x, y in zip(a, b) if y > 0), 3)


class StepClock:
    """Timestamps inside the real `Trainer.step`, from hooks (the training code is unchanged):
    forward start (the model's pre-hook), backward start (the unembedding's gradient arrives),
    backward end (the input embedding's gradient, the last one computed), optimizer start/end."""

    def __init__(self, trainer):
        model, self.t = trainer.model, {}

        def mark(key):
            return lambda *args, **kwargs: self.t.__setitem__(key, time.perf_counter())

        self.handles = [
            model.register_forward_pre_hook(mark("forward")),
            model.get_output_embeddings().register_full_backward_pre_hook(mark("backward")),
            model.get_input_embeddings().weight.register_post_accumulate_grad_hook(mark("backward_end")),
            trainer.optimizer.register_step_pre_hook(mark("optimizer")),
            trainer.optimizer.register_step_post_hook(mark("optimizer_end")),
        ]

    def phases(self, start: float, end: float) -> dict[str, float]:
        t = self.t
        return {"setup (zero_grad, train mode)": t["forward"] - start,
                "forward (+ loss)": t["backward"] - t["forward"],
                "backward": t["backward_end"] - t["backward"],
                "clip (+ loss sum)": t["optimizer"] - t["backward_end"],
                "optimizer": t["optimizer_end"] - t["optimizer"],
                "schedule, rest": end - t["optimizer_end"]}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
