"""Phase 3 of influence: score(z) = −⟨∇θₕ L(z), H⁻¹ ∇θₕ f_probe⟩ for every window sample z
and target head h, from the gradient cache (`gradients`) or streamed without one.

The three phases each save their own artefact: `mda.attribute.factors` (EK-FAC per block),
`mda.attribute.gradient_cache` (per-sample gradient shards + manifest), and this module's scores.

Sign: positive = one gradient step on z is predicted to *raise* the probe (the step
−η H⁻¹∇L(z) changes f by −η ∇fᵀ H⁻¹ ∇L(z) = η · score).
The window is the stream's steps [start, end): the updates between the checkpoint at the
window start and the one at its end. Gradients are taken at the influence checkpoint.
Distributed: rank r scores its shards (or batches); every rank returns the gathered scores.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from mda.core.config import Influence
from mda.data.stream import Stream
from mda.core.errors import MdaError
from mda.attribute.ekfac import BlockFactors
from mda.attribute.gradient_cache import batch_gradients, gradient_identity, read_manifest
from mda.attribute.probe_gradient import probe_gradient
from mda.attribute.window import Setup, WindowBatches


# ----------------------------------------------------------------------------- scores
def preconditioned_probe(inf: Influence, s: Setup, factors: dict[str, BlockFactors]) -> dict[str, torch.Tensor]:
    """H⁻¹ ∇θₕ f per block (float64, CPU), each head's probe gradient taken w.r.t. its own blocks."""
    from mda.units.probes import influence_probe

    tokens = influence_probe(inf, s.model.config)
    out = {}
    for head in s.heads:
        with s.rt.autocast():
            grads = probe_gradient(s.model, s.probe, tokens.to(s.rt.device), head, s.blocks[head.name], s.projector)
        for name, g in grads.items():
            if not torch.isfinite(g).all():
                raise MdaError(f"{name}{s.where}: non-finite probe gradient")
            out[name] = factors[name].precondition(g.cpu())
    return out


def scores_from_cache(inf: Influence, s: Setup, stream: Stream, directory: str | os.PathLike,
                      vectors: dict[str, torch.Tensor], read_rows: int = 4096,
                      draws: dict[str, dict[str, torch.Tensor]] | None = None) -> pd.DataFrame:
    """(sample_id, head, score) streamed from the shards, `read_rows` rows at a time. The cache
    must have been made from this checkpoint, window, blocks, projection and dtype. `draws`
    (column name → vectors of another probe draw) adds one score column per draw, from the same
    pass over the shards."""
    manifest = read_manifest(directory, gradient_identity(inf, s, stream))
    columns = probe_columns(vectors, draws)
    shards = manifest["shards"]
    mine = s.rt.shard(len(shards))
    parts = [part for shard in tqdm(shards[mine.start:mine.stop], desc="scores", unit="shard", disable=not s.rt.is_main)
             for part in shard_scores(Path(directory) / shard["file"], columns, read_rows)]
    return _gathered(s, parts)


def probe_columns(vectors: dict[str, torch.Tensor],
                  draws: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Score column → block → flattened H⁻¹∇f (float64): `score` for `vectors`, one per draw."""
    return {column: {name: v.reshape(-1).numpy() for name, v in vecs.items()}
            for column, vecs in {"score": vectors, **(draws or {})}.items()}


def shard_scores(path: Path, columns: dict[str, dict[str, np.ndarray]], read_rows: int = 4096) -> list[pd.DataFrame]:
    """Per-block partial scores −⟨g, v⟩ of one gradient shard's rows, one column per probe column
    (blocks absent from `columns` are skipped). Reads only the shard, so it also serves caches
    whose manifest predates the identity check (benchmarks/probe_overlap.py)."""
    flat = next(iter(columns.values()))
    parts = []
    try:
        reader = pq.ParquetFile(path)
        for batch in reader.iter_batches(batch_size=read_rows):
            heads = batch.column("head").to_numpy(zero_copy_only=False)
            blocks = batch.column("block").to_numpy(zero_copy_only=False)
            ids = batch.column("sample_id").to_numpy()
            grads = batch.column("grad")
            names = np.char.add(np.char.add(heads.astype(str), "/"), blocks.astype(str))
            for name in np.unique(names):
                if name not in flat:
                    continue
                rows = np.flatnonzero(names == name)
                values = grads.take(pa.array(rows)).flatten().to_numpy().reshape(len(rows), -1)
                if not np.isfinite(values).all():
                    raise MdaError(f"{path}: non-finite gradient for {name}")
                values = values.astype(np.float64)
                parts.append(pd.DataFrame({"sample_id": ids[rows], "head": name.split("/")[0],
                                           **{c: -(values @ vecs[name]) for c, vecs in columns.items()}}))
    except MdaError:
        raise
    except Exception as err:
        raise MdaError(f"{path}: unreadable gradient shard ({str(err).splitlines()[0]})") from None
    return parts


def scores_streaming(inf: Influence, s: Setup, stream: Stream, vectors: dict[str, torch.Tensor],
                     draws: dict[str, dict[str, torch.Tensor]] | None = None) -> pd.DataFrame:
    """The same scores with no cache: per-sample gradients dotted with H⁻¹∇f as they are made."""
    first, last = s.window
    batches = WindowBatches(first, last, inf.batch_size, stream.batch_size)
    mine = s.rt.shard(len(batches))
    columns = probe_columns(vectors, draws)
    parts = []
    bar = tqdm(total=sum(batches.size(i) for i in mine), desc="scores (streaming)", unit="sample",
               disable=not s.rt.is_main)
    for _, ids, meta in batches.read(stream, mine):
        sample_ids = meta.column("sample_id").to_numpy()
        grads = stored_gradients(inf, s, ids)
        for name, g in grads.items():
            parts.append(pd.DataFrame({"sample_id": sample_ids, "head": name.split("/")[0],
                                       **{c: -(g @ vecs[name]) for c, vecs in columns.items()}}))
        bar.update(len(ids))
    bar.close()
    return _gathered(s, parts)


def stored_gradients(inf: Influence, s: Setup, ids: torch.Tensor) -> dict[str, np.ndarray]:
    """Per block, each row's flattened gradient (batch, size) in float64, rounded as the cache
    would store it (so both modes score the same numbers): one backward pass."""
    grads = batch_gradients(s, ids)
    out = {}
    for b in s.all_blocks:
        g = grads[b.name].reshape(len(ids), -1).to(torch.float32).cpu().numpy()
        out[b.name] = g.astype(np.float16 if inf.dtype == "float16" else np.float32, copy=False).astype(np.float64)
    return out


def score_batch(inf: Influence, s: Setup, ids: torch.Tensor, vectors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Per block, −⟨g, H⁻¹∇f⟩ of each row of `ids`: one backward pass, the gradients rounded as
    the cache would store them, float64 dot products."""
    return {name: -(g @ vectors[name].reshape(-1).numpy()) for name, g in stored_gradients(inf, s, ids).items()}


def _gathered(s: Setup, parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Every rank's partial scores, summed over blocks per (sample, head), on every rank."""
    parts = [p for rank_parts in s.rt.gather_objects(parts) for p in rank_parts]
    if not parts:
        raise MdaError("scores: the window has no samples to score")
    frame = pd.concat(parts, ignore_index=True)
    columns = [c for c in frame.columns if c not in ("sample_id", "head")]
    return frame.groupby(["sample_id", "head"], as_index=False, sort=True)[columns].sum()


def attach_samples(scores: pd.DataFrame, stream: Stream, s: Setup, probe: str) -> pd.DataFrame:
    """Add each sample's step and domain from the stream; order by head, sample."""
    first, last = s.window
    rows = stream.read(first, last, columns=["sample_id", "step", "domain"]).to_pandas()
    out = scores.merge(rows, on="sample_id", how="left", validate="many_to_one")
    if out.step.isna().any():
        raise MdaError("scores: some scored samples are not in the window of the stream")
    out["probe"] = probe
    out = out[["sample_id", "step", "domain", "head", "probe", "score"]]
    out["step"] = out.step.astype("int64")
    return out.sort_values(["head", "sample_id"], ignore_index=True)


def concentration(scores: pd.Series) -> dict:
    """Share of the total positive influence held by the top 1 % and 10 % of samples."""
    values = np.sort(scores.to_numpy())[::-1]
    positive = values[values > 0].sum()
    share = lambda frac: float(values[:max(1, int(round(frac * len(values))))].clip(min=0).sum() / positive) \
        if positive > 0 else float("nan")
    return {"top1pct_positive_share": share(0.01), "top10pct_positive_share": share(0.10),
            "positive_fraction": float((values > 0).mean()), "samples": int(len(values)),
            "mean": float(values.mean()), "std": float(values.std())}


def plot_scores(scores: pd.DataFrame, path) -> None:
    from mda.core import plots

    heads = sorted(scores["head"].unique())
    fig, axes = plots.plt.subplots(1, 2, figsize=(12, 4.5))
    for head in heads:
        v = scores[scores["head"] == head].score.to_numpy()
        axes[0].hist(v, bins=80, histtype="step", lw=1.5, label=head)
        axes[1].plot(np.arange(1, len(v) + 1) / len(v) * 100, np.sort(v)[::-1], lw=1.5, label=head)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("influence score (positive: raises the probe)")
    axes[0].set_ylabel("samples")
    axes[0].set_title("Distribution of influence scores")
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].axvline(10, color="tab:orange", ls="--", label="top 10 %")
    axes[1].set_xlabel("rank (% of window samples)")
    axes[1].set_ylabel("influence score")
    axes[1].set_title("Sorted influence")
    for ax in axes:
        ax.legend(fontsize=8)
    plots.save(fig, path)
