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

Memory is bounded by checkpointing: the forward replay keeps the (θ, m, v) state only at every
`segment`-th step; the reverse pass recomputes one segment's states from its first one and walks
back through it, so at most one segment of states (and one step's autograd graph) is held, never
the whole trajectory's activations. Both forward passes are the Trainer's own steps (its fused
multi-tensor kernels, as fast as training); the reverse pass differentiates `step`, the same
update written out tensor by tensor (equal to the Trainer's up to summation order, tested).

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


def step(replay: Replay, state: State, t: int, ids: torch.Tensor, weights: torch.Tensor,
         create_graph: bool = False) -> State:
    """The update at stream step `t` (the (t − first_step + 1)-th of the window): loss gradient,
    `clip_grad_norm_`, then torch's AdamW (single-tensor arithmetic). Differentiable in θ, the
    moments and `weights` when `create_graph`."""
    theta, m, v = state
    r = replay.recipe
    loss_module = _StepLoss(replay.model)
    loss = functional_call(loss_module, {f"model.{n}": p for n, p in zip(replay.names, theta)}, (ids, weights))
    grads = torch.autograd.grad(loss, theta, create_graph=create_graph)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = torch.clamp(r.grad_clip / (norm + 1e-6), max=1.0)  # torch.nn.utils.clip_grad_norm_
    lr, (beta1, beta2) = replay.lr(t), r.betas
    k = replay.adam_step + (t - replay.first_step) + 1
    bc1, bc2 = 1 - beta1 ** k, 1 - beta2 ** k
    out_theta, out_m, out_v = [], [], []
    for p, m_p, v_p, g, decays in zip(theta, m, v, grads, replay.decay):
        g = g * coef
        p = p * (1 - lr * r.weight_decay) if decays else p
        m_p = m_p + (1 - beta1) * (g - m_p)          # exp_avg.lerp_(grad, 1 − β1)
        v_p = v_p * beta2 + (1 - beta2) * g * g
        denom = _sqrt(v_p) / math.sqrt(bc2) + r.eps
        out_theta.append(p - (lr / bc1) * m_p / denom)
        out_m.append(m_p)
        out_v.append(v_p)
    return out_theta, out_m, out_v


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
                  desc: str = "exact: forward") -> tuple[State, dict[int, State]]:
    """(the state after the last step, the states at every segment start) of the window's
    training, run by the Trainer itself (the reverse pass differentiates `step`, the same update
    in single-tensor arithmetic: equal to the Trainer's up to summation order, tested)."""
    set_state(replay, start, steps[0])
    saved = {}
    for i, t in enumerate(tqdm(steps, desc=desc, unit="step")):
        if i % segment == 0:
            saved[t] = state_of(replay.trainer)
        replay.trainer.step(batches[t][0])
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
    end, saved = replay_window(replay, start, batches, steps, segment)
    theta_bar = probe_gradient(replay, end[0], probe, tokens, head)
    bar = (theta_bar, [torch.zeros_like(x) for x in end[1]], [torch.zeros_like(x) for x in end[2]])
    out = {}
    progress = tqdm(total=len(steps), desc=f"exact: reverse ({head.name})", unit="step")
    for seg_start in sorted(saved, reverse=True):
        seg = steps[steps.index(seg_start):steps.index(seg_start) + segment]
        states = []
        set_state(replay, saved[seg_start], seg_start)
        for t in seg:  # recompute the segment's states (the one before each of its steps)
            states.append(state_of(replay.trainer))
            if t != seg[-1]:
                replay.trainer.step(batches[t][0])
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
