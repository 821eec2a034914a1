"""Token-level attribution: a sample's influence score split exactly over its token positions.

A block's per-sample gradient is G = Σ_t g_t a_tᵀ (`mda.attribute.capture`), so with V = H⁻¹∇f the
block's share of the score −⟨G, V⟩ is a sum over positions, and summed over the head's blocks

    score(z) = Σ_t c_t,    c_t = −Σ_blocks g_tᵀ V a_t.

What c_t means. Position t is an *input* position of the row (0 … seq_len − 1; the row's last token
is only a label and has none). a_t is the block's input at t — the residual stream at t after the
layer norm for W_Q, W_K, W_V; the head's attention-weighted values at t for W_O — and g_t is the
gradient of the row's summed next-token loss with respect to the block's output at t. g_t is not
only the loss of predicting token t + 1: the key and value made at t are read by every later
query of the head, and everything written at t is read by later layers at later positions, so
g_t carries the loss at every position ≥ t that depends on what the head computed *at* t. So c_t is
the part of the score that flows through the head's weights at position t: credit to the token at
t in its context (the tokens up to t), for its effect on the losses at t and after. It is not
"the influence of the loss on token t + 1" alone, and the contributions of one row are computed
together (one forward and backward of the whole row), not by leaving tokens out.

Induction-predictable position t: the token at t occurred earlier in the row, and the token that
followed its latest earlier occurrence is the token at t + 1 (`mda.units.metrics.induction_targets`, the
induction probe's own target) — what an induction head predicts there.

The tables built from the split (a target's contributions, predictable shares, the sum check):
`mda.attribute.token_stats`; the report's view: `mda.report.tokens`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from mda.core.config import Influence
from mda.data.stream import Stream
from mda.attribute.capture import capture_batch
from mda.attribute.window import Setup
from mda.intervene.selection import union_scores
from mda.units.metrics import induction_targets

RANDOM_SEED = (0, 14)  # numpy default_rng seed of the random comparison set (fixed, not a param)
COLUMNS = ["set", "head", "sample_id", "position", "token", "next_token", "predictable", "contribution"]


def token_contributions(s: Setup, ids: torch.Tensor, vectors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Per target head, (rows, positions) float64 c_t = −Σ_blocks g_tᵀ V a_t for the rows of
    `ids` (batch, row_len): one forward and backward of the rows, the capture hooks the gradient
    cache uses (projected alike), and V = H⁻¹∇f per block (`preconditioned_probe`)."""
    with s.rt.autocast():
        captured = capture_batch(s.model, ids, s.all_blocks, "true", projector=s.projector, where=s.where)
    out: dict[str, torch.Tensor] = {}
    for b in s.all_blocks:
        a, g = captured[b.name]
        v = vectors[b.name].to(device=a.device, dtype=torch.float64)
        c = -torch.einsum("bto,oi,bti->bt", g.double(), v, a.double())
        head = b.name.split("/")[0]
        out[head] = out[head] + c if head in out else c
    return {head: c.cpu().numpy() for head, c in out.items()}


def induction_predictable(ids: torch.Tensor) -> torch.Tensor:
    """(rows, row_len − 1) bool: at input position t, an induction head predicts the next token —
    the token at t occurred earlier and the token after its latest earlier occurrence is ids[t + 1]."""
    has_target, target = induction_targets(ids[:, :-1])
    return has_target & (target == ids[:, 1:])


def token_sets(scores: pd.DataFrame, n: int) -> pd.DataFrame:
    """(set, sample_id) of the samples to split: per head `top:<head>` (its n highest scores, ties
    by lower sample_id, as `select` ranks), `top:union` with several heads, and `random` (n window
    samples drawn uniformly, seeded by RANDOM_SEED)."""
    groups = {h: g for h, g in scores.groupby("head")}
    if len(groups) > 1:
        groups["union"] = union_scores(scores)
    parts = [pd.DataFrame({"set": f"top:{target}",
                           "sample_id": g.sort_values(["score", "sample_id"], ascending=[False, True])
                           .sample_id.head(n).to_numpy()}) for target, g in groups.items()]
    window = np.sort(scores.sample_id.unique())
    pick = np.sort(np.random.default_rng(list(RANDOM_SEED)).choice(len(window), size=min(n, len(window)),
                                                                    replace=False))
    parts.append(pd.DataFrame({"set": "random", "sample_id": window[pick]}))
    return pd.concat(parts, ignore_index=True)


def token_table(inf: Influence, s: Setup, stream: Stream, sets: pd.DataFrame,
                vectors: dict[str, torch.Tensor]) -> pd.DataFrame:
    """One row per (set, head, sample, input position): the token at the position, the next token,
    whether it is induction-predictable, and its contribution c_t. A sample in several sets is
    computed once and listed under each."""
    wanted = np.sort(sets.sample_id.unique())
    first, last = s.window
    rows = stream.read(first, last, columns=["sample_id", "input_ids"])
    keep = np.isin(rows.column("sample_id").to_numpy(), wanted)
    rows = rows.filter(keep)
    ids_all = rows.column("input_ids").combine_chunks().flatten().to_numpy().astype(np.int64) \
        .reshape(len(rows), -1)
    sample_ids = rows.column("sample_id").to_numpy()
    parts = []
    for start in range(0, len(sample_ids), inf.batch_size):
        ids = torch.from_numpy(ids_all[start:start + inf.batch_size])
        batch_ids = sample_ids[start:start + inf.batch_size]
        predictable = induction_predictable(ids).numpy()
        positions = predictable.shape[1]
        for head, c in token_contributions(s, ids, vectors).items():
            parts.append(pd.DataFrame({
                "head": head, "sample_id": np.repeat(batch_ids, positions),
                "position": np.tile(np.arange(positions, dtype=np.int32), len(batch_ids)),
                "token": ids[:, :-1].reshape(-1).numpy().astype(np.int32),
                "next_token": ids[:, 1:].reshape(-1).numpy().astype(np.int32),
                "predictable": predictable.reshape(-1), "contribution": c.reshape(-1)}))
    table = pd.concat(parts, ignore_index=True)
    out = sets.merge(table, on="sample_id", how="inner", validate="many_to_many")
    return out[COLUMNS].sort_values(["set", "head", "sample_id", "position"], ignore_index=True)
