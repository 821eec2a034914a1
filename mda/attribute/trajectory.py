"""The trajectory estimator (`influence.estimator: trajectory`): every window sample scored with the
state of training at its own step.

The window's saved checkpoints c_0 = start < c_1 < … < c_{L−1} < end cut it into segments
[c_l, c_{l+1}); a sample seen at a step of segment l gets

    score(z) = −⟨∇θₕ L(z; θ_{c_l}), (F_l + λ_l)⁻¹ ∇θₕ f(θ_{c_l})⟩,

the EK-FAC score of `mda.attribute.scoring` with the checkpoint c_l in place of the influence
checkpoint: the probe's gradient, the per-sample gradient and the EK-FAC factors (fitted on
`influence.factor_samples` samples spread over segment l) are all taken at c_l. A window of one
segment is exactly the `ekfac` estimator at that checkpoint (tested).

This is SOURCE's segment-wise EK-FAC (Bae et al. 2024, "Training data attribution via approximate
unrolled differentiation", §3) without its propagation terms: SOURCE also multiplies a segment's
response by (I − exp(−η K_l H_l)) and by exp(−η K_{l'} H_{l'}) for every later segment l' — the
response of *SGD* with learning rate η over K steps on a locally quadratic loss. mda's training is
AdamW, whose per-coordinate preconditioning those factors do not describe (they would weight the
curvature's eigendirections by the wrong rates), so each segment keeps the stationary response
H_l⁻¹ instead. The `exact` estimator (`mda.attribute.metagradient`) differentiates the actual AdamW
trajectory and is the reference this approximation is judged by.
"""

from __future__ import annotations

import os

import pandas as pd

from mda.core.compute import Runtime
from mda.core.config import Influence
from mda.data.stream import Stream
from mda.core.errors import MdaError
from mda.attribute.ekfac import fit_ekfac
from mda.attribute.factors import WindowSource, factor_subset
from mda.attribute.scoring import preconditioned_probe, scores_streaming
from mda.attribute.window import setup
from mda.model.neox import saved_steps


def segments(checkpoint_steps: list[int], start: int, end: int) -> list[tuple[int, int, int]]:
    """(checkpoint, first step, last step) of each segment of the window [start, end): from each
    saved checkpoint in it to the next (the window start must be a checkpoint)."""
    inside = [s for s in checkpoint_steps if start <= s < end]
    if not inside or inside[0] != start:
        raise MdaError(f"trajectory estimator: the window start {start} is not a saved checkpoint")
    bounds = inside + [end]
    return [(c, c, bounds[i + 1] - 1) for i, c in enumerate(inside)]


def trajectory_scores(inf: Influence, checkpoints: str | os.PathLike, targets: dict, stream: Stream,
                      rt: Runtime) -> pd.DataFrame:
    """(sample_id, head, score, checkpoint): each sample's score at its segment's checkpoint."""
    start, end = int(targets["window"]["start"]), int(targets["window"]["end"])
    parts = []
    for checkpoint, first, last in segments(saved_steps(checkpoints), start, end):
        at = {**targets, "influence_step": checkpoint, "window": {**targets["window"], "start": first, "end": last + 1}}
        s = setup(inf, checkpoints, at, rt)
        factors = fit_ekfac(s.model, WindowSource(factor_subset(inf, s, stream), stream), s.all_blocks,
                            fisher=inf.fisher, alpha=inf.damping, seed=inf.label_seed, projector=s.projector,
                            where=s.where, rt=rt)
        raw = scores_streaming(inf, s, stream, preconditioned_probe(inf, s, factors))
        parts.append(raw[["sample_id", "head", "score"]].assign(checkpoint=checkpoint))
        del s, factors
    return pd.concat(parts, ignore_index=True)
