"""The exact estimator (`influence.estimator: exact`): the metagradient d f(θ_end) / d w_z of the
probe at the window end with respect to every window sample's loss weight w_z (all 1 in training).

The window's training is the function w ↦ θ_end: from the trainer state saved at the window
start, each step t takes the batch's loss L_t(θ, w) = Σ_i w_i ℓ_i(θ) / (all target tokens of the
batch) (`mda.train.loop.batch_loss`), clips its gradient to norm `pretrain.grad_clip` and makes
torch's AdamW update with the schedule's learning rate, decoupled weight decay on matrices only,
and bias corrections — the loop every retraining arm runs (`mda.train.loop.Trainer`). Reverse-mode
differentiation of that function (MAGIC: Ilyas & Engstrom 2025, "Magic: near-optimal data
attribution for deep learning") carries the adjoint (θ̄, m̄, v̄) of the parameters and both AdamW
moments back from θ̄ = ∇f(θ_end), one step at a time; each step's vector-Jacobian product also
gives ∂f/∂w_i for the rows of that step — the metagradient of the samples there.

Memory is bounded by checkpointing: the forward replay — the Trainer's own steps, its fused
multi-tensor kernels, as fast as training — keeps the (θ, m, v) state only at every `segment`-th
step, and writes each step's clipped gradient to a temporary file (`GradientStore`: steps ×
parameters × 4 bytes, 4 GB on the default's window, deleted at the end). The reverse pass rebuilds
one segment's states from its first one with the AdamW arithmetic alone (`adamw`: elementwise, no
model pass — so the window is run forward once, not twice) and walks back through it, so at most
one segment of states (and one step's autograd graph) is held in memory, never the whole
trajectory's activations. The reverse pass differentiates `step`, the same update written out
tensor by tensor (equal to the Trainer's up to summation order, tested).

Sign: the project's — positive means more of z raises the probe (as an influence score's
positive means a gradient step on z raises it). Scale: f per unit of loss weight, unlike the
EK-FAC scores; rankings, LDS (Spearman) and top-k sets compare either way. The predicted change of
f from removing a set S (w_z: 1 → 0) is −Σ_{z∈S} metagradient(z), the LDS stage's rule.

The losses are full-vocabulary cross-entropies (double backward through the chunked loss of
`mda.model.losses` is not implemented), so the model's batch logits must fit `mda.model.losses.LOGIT_BUDGET`: the
estimator is for models of the default's size, not Pythia's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.func import functional_call
from tqdm import tqdm

from mda.core.config import Pretrain
from mda.data.stream import Stream
from mda.core.errors import MdaError
from mda.model.heads import Head
from mda.units.probes import PROBES
from mda.model.losses import fits
from mda.train.loop import Trainer, batch_loss, lr_factor

State = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]  # θ, AdamW exp_avg, exp_avg_sq


@dataclass
class Replay:
    """The window's training as a function: the model (its structure; its parameters are passed
    in), which parameters decay, the recipe, the schedule, and the AdamW step count at the start."""

    model: torch.nn.Module
    names: list[str]
    decay: list[bool]
    recipe: Pretrain
    total_steps: int
    first_step: int   # stream step of the first update
    adam_step: int    # AdamW updates made before the window start (for the bias corrections)
    trainer: Trainer  # runs the forward passes (its own kernels: as fast as training)

    def lr(self, step: int) -> float:
        """The learning rate of the update at stream step `step` (`Trainer`'s schedule)."""
        r = self.recipe
        return r.lr * lr_factor(step, r.warmup_steps, self.total_steps, r.min_lr_ratio)


def from_trainer(trainer: Trainer, first_step: int) -> tuple[Replay, State]:
    """The replay and its start state (copies) of a trainer resumed at the window start."""
    model = trainer.model
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    state = trainer.optimizer.state
    if any(p not in state for p in params):
        raise MdaError("exact estimator: the window start's optimizer state has no AdamW moments for every "
                       "parameter (a fresh optimizer); it needs a checkpoint saved during training")
    steps = {int(state[p]["step"]) for p in params}
    if len(steps) != 1:
        raise MdaError(f"exact estimator: parameters have different AdamW step counts {sorted(steps)}")
    decay_ids = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    replay = Replay(model, names, [id(p) in decay_ids for p in params], trainer.recipe, trainer.total_steps,
                    first_step, steps.pop(), trainer)
    if not math.isclose(trainer.lr, replay.lr(first_step), rel_tol=1e-12):
        raise MdaError(f"exact estimator: the schedule gives lr {replay.lr(first_step):.6g} at step {first_step}, "
                       f"the trainer {trainer.lr:.6g}")
    start = ([p.detach().clone() for p in params], [state[p]["exp_avg"].detach().clone() for p in params],
             [state[p]["exp_avg_sq"].detach().clone() for p in params])
    return replay, start


# ----------------------------------------------------------------------------- one step, as a function
class _StepLoss(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, weights):
        return batch_loss(self.model, ids, weights, ids.shape[0] * (ids.shape[1] - 1))


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """√x with a zero derivative at x = 0 (a parameter that never had a gradient: its moments are 0
    and it does not depend on any loss weight), where √'s derivative is infinite."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def adamw(replay: Replay, state: State, t: int, grads: list[torch.Tensor]) -> State:
    """torch's AdamW update at stream step `t` (single-tensor arithmetic) from the step's clipped
    gradients: decoupled weight decay on matrices, both moments, bias corrections."""
    theta, m, v = state
    r = replay.recipe
    lr, (beta1, beta2) = replay.lr(t), r.betas
    k = replay.adam_step + (t - replay.first_step) + 1
    bc1, bc2 = 1 - beta1 ** k, 1 - beta2 ** k
    out_theta, out_m, out_v = [], [], []
    for p, m_p, v_p, g, decays in zip(theta, m, v, grads, replay.decay):
        p = p * (1 - lr * r.weight_decay) if decays else p
        m_p = m_p + (1 - beta1) * (g - m_p)          # exp_avg.lerp_(grad, 1 − β1)
        v_p = v_p * beta2 + (1 - beta2) * g * g
        denom = _sqrt(v_p) / math.sqrt(bc2) + r.eps
        out_theta.append(p - (lr / bc1) * m_p / denom)
        out_m.append(m_p)
        out_v.append(v_p)
    return out_theta, out_m, out_v


def step(replay: Replay, state: State, t: int, ids: torch.Tensor, weights: torch.Tensor,
         create_graph: bool = False) -> State:
    """The update at stream step `t` (the (t − first_step + 1)-th of the window): loss gradient,
    `clip_grad_norm_`, then torch's AdamW (`adamw`). Differentiable in θ, the moments and
    `weights` when `create_graph`."""
    theta = state[0]
    loss = functional_call(_StepLoss(replay.model), {f"model.{n}": p for n, p in zip(replay.names, theta)},
                           (ids, weights))
    grads = torch.autograd.grad(loss, theta, create_graph=create_graph)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = torch.clamp(replay.recipe.grad_clip / (norm + 1e-6), max=1.0)  # torch.nn.utils.clip_grad_norm_
    return adamw(replay, state, t, [g * coef for g in grads])


class GradientStore:
    """Each step's clipped gradients, flat, in a temporary file (one row per step): what the
    reverse pass needs to rebuild a segment's states without running the model again."""

    def __init__(self, params: list[torch.Tensor], steps: list[int]):
        import shutil
        import tempfile

        self.shapes = [p.shape for p in params]
        self.sizes = [p.numel() for p in params]
        self.dtype = params[0].dtype
        self.row = {t: i for i, t in enumerate(steps)}
        need = len(steps) * sum(self.sizes) * params[0].element_size()
        self.dir = tempfile.TemporaryDirectory(prefix="mda-exact-")
        free = shutil.disk_usage(self.dir.name).free
        if need > free:
            self.dir.cleanup()
            raise MdaError(f"exact estimator: the window's gradients need {need / 2**30:.1f} GiB in "
                           f"{tempfile.gettempdir()} (TMPDIR), {free / 2**30:.1f} GiB are free")
        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        self.rows = np.lib.format.open_memmap(f"{self.dir.name}/gradients.npy", mode="w+", dtype=np_dtype,
                                              shape=(len(steps), sum(self.sizes)))

    def write(self, t: int, grads: list[torch.Tensor]) -> None:
        if any(g is None for g in grads):
            raise MdaError(f"exact estimator: a parameter has no gradient at step {t}")
        self.rows[self.row[t]] = torch.cat([g.detach().reshape(-1) for g in grads]).cpu().numpy()

    def read(self, t: int) -> list[torch.Tensor]:
        flat = torch.from_numpy(np.array(self.rows[self.row[t]]))
        return [x.view(shape) for x, shape in zip(flat.split(self.sizes), self.shapes)]

    def close(self) -> None:
        del self.rows
        self.dir.cleanup()


def _leaves(state: State) -> State:
    return tuple([x.detach().requires_grad_(True) for x in part] for part in state)


# ----------------------------------------------------------------------------- the window
def window_batches(stream: Stream, first: int, last: int) -> dict[int, tuple[torch.Tensor, np.ndarray]]:
    """step → (input_ids int64, sample ids) of the stream steps first..last."""
    return {int(s): (torch.as_tensor(ids), table.column("sample_id").to_numpy())
            for s, ids, table in stream.batches(first, last)}


def state_of(trainer: Trainer) -> State:
    """Copies of the trainer's parameters and AdamW moments (in `named_parameters` order)."""
    params = list(trainer.model.parameters())
    opt = trainer.optimizer.state
    return ([p.detach().clone() for p in params], [opt[p]["exp_avg"].clone() for p in params],
            [opt[p]["exp_avg_sq"].clone() for p in params])


def set_state(replay: Replay, state: State, t: int) -> None:
    """Put the trainer at `state`, ready for the update at stream step `t` (AdamW's step count
    and the schedule's learning rate included)."""
    trainer = replay.trainer
    opt = trainer.optimizer.state
    with torch.no_grad():
        for p, theta, m, v in zip(trainer.model.parameters(), *state):
            p.copy_(theta)
            opt[p]["exp_avg"].copy_(m)
            opt[p]["exp_avg_sq"].copy_(v)
            opt[p]["step"].fill_(replay.adam_step + (t - replay.first_step))
    trainer.seek(t)


def replay_window(replay: Replay, start: State, batches: dict, steps: list[int], segment: int,
                  store: GradientStore | None = None, desc: str = "exact: forward") -> tuple[State, dict[int, State]]:
    """(the state after the last step, the states at every segment start) of the window's
    training, run by the Trainer itself; each step's clipped gradients go into `store`."""
    set_state(replay, start, steps[0])
    saved = {}
    for i, t in enumerate(tqdm(steps, desc=desc, unit="step")):
        if i % segment == 0:
            saved[t] = state_of(replay.trainer)
        replay.trainer.step(batches[t][0], observe=None if store is None else lambda grads: store.write(t, grads))
    return state_of(replay.trainer), saved


def probe_gradient(replay: Replay, theta: list[torch.Tensor], probe: str, tokens: torch.Tensor,
                   head: Head) -> list[torch.Tensor]:
    """∇_θ f(θ) for every parameter (f: the influence probe of `head`)."""

    class _Probe(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, tokens):
            return PROBES[probe](self.model, tokens, head)

    leaves = [p.detach().requires_grad_(True) for p in theta]
    value = functional_call(_Probe(replay.model), {f"model.{n}": p for n, p in zip(replay.names, leaves)}, (tokens,))
    return list(torch.autograd.grad(value, leaves, allow_unused=True, materialize_grads=True))


def metagradients(replay: Replay, start: State, batches: dict, probe: str, tokens: torch.Tensor, head: Head,
                  segment: int = 50) -> dict[int, np.ndarray]:
    """step → d f(θ_end) / d w for that step's rows (one per batch position), by reverse-mode
    differentiation through the window's updates (the module docstring)."""
    if not fits(replay.model, next(iter(batches.values()))[0].numel()):
        raise MdaError("exact estimator: a batch's logits exceed mda.model.losses.LOGIT_BUDGET; the exact estimator "
                       "needs full-vocabulary losses (a model of the default's size)")
    steps = sorted(batches)
    store = GradientStore(start[0], steps)
    try:
        return _reverse(replay, start, batches, steps, store, probe, tokens, head, segment)
    finally:
        store.close()


def _reverse(replay: Replay, start: State, batches: dict, steps: list[int], store: GradientStore, probe: str,
             tokens: torch.Tensor, head: Head, segment: int) -> dict[int, np.ndarray]:
    end, saved = replay_window(replay, start, batches, steps, segment, store)
    theta_bar = probe_gradient(replay, end[0], probe, tokens, head)
    bar = (theta_bar, [torch.zeros_like(x) for x in end[1]], [torch.zeros_like(x) for x in end[2]])
    out = {}
    progress = tqdm(total=len(steps), desc=f"exact: reverse ({head.name})", unit="step")
    for seg_start in sorted(saved, reverse=True):
        seg = steps[steps.index(seg_start):steps.index(seg_start) + segment]
        states = [saved[seg_start]]
        with torch.no_grad():  # the segment's states (the one before each of its steps), from the stored gradients
            for t in seg[:-1]:
                states.append(adamw(replay, states[-1], t, store.read(t)))
        for t, before in zip(reversed(seg), reversed(states)):
            ids, _ = batches[t]
            leaves = _leaves(before)
            weights = torch.ones(len(ids), dtype=before[0][0].dtype, requires_grad=True)
            after = step(replay, leaves, t, ids, weights, create_graph=True)
            inputs = [*leaves[0], *leaves[1], *leaves[2], weights]
            grads = torch.autograd.grad([*after[0], *after[1], *after[2]], inputs,
                                        grad_outputs=[*bar[0], *bar[1], *bar[2]], allow_unused=True,
                                        materialize_grads=True)
            n = len(replay.names)
            bar = (list(grads[:n]), list(grads[n:2 * n]), list(grads[2 * n:3 * n]))
            out[t] = grads[-1].detach().cpu().numpy().astype(np.float64)
            if not np.isfinite(out[t]).all():
                raise MdaError(f"exact estimator: non-finite metagradient at step {t}")
            progress.update(1)
    progress.close()
    return out


def exact_scores(replay: Replay, start: State, batches: dict, probe: str, tokens: torch.Tensor,
                 heads: list[Head], segment: int = 50) -> pd.DataFrame:
    """(sample_id, head, score): every window sample's metagradient, per target head."""
    parts = []
    for head in heads:
        meta = metagradients(replay, start, batches, probe, tokens, head, segment)
        ids = np.concatenate([batches[t][1] for t in sorted(meta)])
        values = np.concatenate([meta[t] for t in sorted(meta)])
        parts.append(pd.DataFrame({"sample_id": ids, "head": head.name, "score": values}))
    return pd.concat(parts, ignore_index=True)


def window_metagradients(params, checkpoints, targets: dict, stream: Stream, s) -> pd.DataFrame:
    """The scores stage's `exact` estimator: (sample_id, head, score) for every window sample,
    replaying the window from its start checkpoint's trainer state (one process)."""
    from mda.units.probes import influence_probe
    from mda.model.neox import step_dir
    from mda.train.loop import resume

    if s.rt.world_size > 1:
        raise MdaError("influence.estimator: exact runs in one process (compute.procs: 1)")
    start, end = int(targets["window"]["start"]), int(targets["window"]["end"])
    trainer, next_step = resume(step_dir(checkpoints, start), params.pretrain, s.rt)
    if next_step != start:
        raise MdaError(f"{step_dir(checkpoints, start)}: data cursor at step {next_step}, expected {start}")
    replay, state = from_trainer(trainer, start)
    inf = params.influence
    tokens = influence_probe(inf, replay.model.config)
    return exact_scores(replay, state, window_batches(stream, start, end - 1), s.probe, tokens.to(s.rt.device),
                        s.heads, inf.exact_segment)
