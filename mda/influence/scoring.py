"""The three influence phases over a formation window, each saving its own artefact:

- `fit_factors`   → `factors/<head>/<block>.safetensors` (EK-FAC of each target block);
- `cache_gradients` → `shard-NNNNN.parquet` + `manifest.json` (per-sample training gradients);
- `compute_scores` → one row per (sample, head): score(z) = −⟨∇θₕ L(z), H⁻¹ ∇θₕ f_probe⟩.

Sign: positive = one gradient step on z is predicted to *raise* the probe (the step
−η H⁻¹∇L(z) changes f by −η ∇fᵀ H⁻¹ ∇L(z) = η · score).
The window is the stream's steps [start, end): the updates between the checkpoint at the
window start and the one at its end. Gradients are taken at the influence checkpoint.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from mda.config import Influence, ProbeSettings
from mda.data.stream import Stream
from mda.errors import MdaError
from mda.heads import Block, Head, check_head, head_blocks
from mda.influence.ekfac import BlockFactors, fit_ekfac
from mda.influence.grads import Projector, capture_batch, per_sample_gradients
from mda.influence.probes import probe_gradient
from mda.io import atomic_file, read_json, write_json
from mda.model import load_model, step_dir

UNIT_PROBE = {"induction": "induction", "previous_token": "prev_token"}
MANIFEST = "manifest.json"


@dataclass
class Setup:
    """Everything the three phases share: model at the influence step, heads, blocks, window."""

    model: torch.nn.Module
    step: int
    heads: list[Head]
    blocks: dict[str, list[Block]]  # head name → its blocks
    window: tuple[int, int]         # stream steps [first, last] inclusive
    projector: Projector | None
    probe: str

    @property
    def all_blocks(self) -> list[Block]:
        return [b for h in self.heads for b in self.blocks[h.name]]


def read_targets(path: str | os.PathLike) -> dict:
    return read_json(path, "run the locate stage first")


def setup(inf: Influence, checkpoints: str | os.PathLike, targets: dict,
          dtype: torch.dtype = torch.float32) -> Setup:
    step = int(targets["influence_step"])
    model = load_model(step_dir(checkpoints, step), dtype=dtype)
    heads = []
    for h in targets["heads"]:
        head = Head(int(h["layer"]), int(h["head"]))
        try:
            check_head(model.config.num_hidden_layers, model.config.num_attention_heads, head,
                       "targets.json: head")
        except ValueError as err:
            raise MdaError(str(err)) from None
        heads.append(head)
    start, end = int(targets["window"]["start"]), int(targets["window"]["end"])
    if end <= start:
        raise MdaError(f"targets.json: window {start}..{end} is empty")
    probe = UNIT_PROBE[targets["unit"]] if inf.probe == "auto" else inf.probe
    return Setup(model, step, heads, {h.name: head_blocks(model.config, h, inf.blocks) for h in heads},
                 (start, end - 1), Projector(inf.projection, inf.projection_seed) if inf.projection else None,
                 probe)


def window_batches(stream: Stream, first: int, last: int, rows: int,
                   stride: int = 1) -> Iterator[tuple[torch.Tensor, pa.Table]]:
    """(input_ids (≤rows, row_len) int64, rows' sample_id/step/domain) over every `stride`-th
    step of [first, last], in stream order; only one row group is in memory at a time."""
    ids, meta = [], []
    for step, step_ids, table in stream.batches(first, last):
        if (step - first) % stride:
            continue
        ids.append(step_ids)
        meta.append(table.select(["sample_id", "step", "domain"]))
        while sum(len(x) for x in ids) >= rows:
            all_ids, all_meta = np.concatenate(ids), pa.concat_tables(meta)
            yield torch.from_numpy(all_ids[:rows]), all_meta.slice(0, rows)
            ids, meta = [all_ids[rows:]], [all_meta.slice(rows)]
    if ids and sum(len(x) for x in ids):
        yield torch.from_numpy(np.concatenate(ids)), pa.concat_tables(meta)


def _where(s: Setup) -> str:
    return f" at step {s.step}"


# ----------------------------------------------------------------------------- factors
def fit_factors(inf: Influence, s: Setup, stream: Stream, out: Path) -> dict:
    """EK-FAC factors of every target block over (a spread subset of) the window."""
    first, last = s.window
    window_samples = (last - first + 1) * stream.batch_size
    stride = 1 if not inf.factor_samples else max(1, math.ceil(window_samples / inf.factor_samples))
    n_steps = len(range(first, last + 1, stride))
    total = math.ceil(n_steps * stream.batch_size / inf.batch_size)
    batches = lambda: (ids for ids, _ in window_batches(stream, first, last, inf.batch_size, stride))
    factors = fit_ekfac(s.model, batches, s.all_blocks, fisher=inf.fisher, alpha=inf.damping,
                        seed=inf.label_seed, projector=s.projector, total=total, where=_where(s))
    summary = {}
    for name, f in factors.items():
        head, block = name.split("/")
        (out / head).mkdir(parents=True, exist_ok=True)
        f.meta.update(step=s.step, projection=inf.projection)
        f.save(out / head / f"{block}.safetensors")
        summary[name] = {"damping": f.damping, "eigenvalue_mean": f.eigenvalues.mean().item(),
                         "eigenvalue_max": f.eigenvalues.max().item(), "shape": list(f.eigenvalues.shape)}
    return {"step": s.step, "window": list(s.window), "samples": factors[s.all_blocks[0].name].meta["samples"],
            "stride": stride, "blocks": summary}


def load_factors(directory: str | os.PathLike, s: Setup) -> dict[str, BlockFactors]:
    out = {}
    for b in s.all_blocks:
        head, block = b.name.split("/")
        out[b.name] = BlockFactors.load(Path(directory) / head / f"{block}.safetensors")
        if int(out[b.name].meta.get("step", s.step)) != s.step:
            raise MdaError(f"{directory}/{head}/{block}.safetensors: fitted at step "
                           f"{out[b.name].meta['step']}, targets ask for {s.step}; rerun factors")
    return out


# ----------------------------------------------------------------------------- gradients
def _shard_plan(first: int, last: int, steps_per_shard: int) -> list[tuple[int, int]]:
    return [(a, min(a + steps_per_shard - 1, last)) for a in range(first, last + 1, steps_per_shard)]


def _block_rows(s: Setup, grads: dict[str, torch.Tensor], sample_ids: np.ndarray, dtype) -> pa.Table:
    """One row per (block, sample), blocks contiguous (the order the scorer reads them in)."""
    parts = []
    for b in s.all_blocks:
        head, block = b.name.split("/")
        g = grads[b.name].reshape(len(sample_ids), -1).to(torch.float32).numpy().astype(dtype, copy=False)
        size = g.shape[1]
        values = pa.array(g.reshape(-1))
        parts.append(pa.table({
            "sample_id": pa.array(sample_ids, pa.int64()),
            "head": pa.array([head] * len(sample_ids), pa.string()),
            "block": pa.array([block] * len(sample_ids), pa.string()),
            "grad": pa.ListArray.from_arrays(pa.array(np.arange(0, (len(sample_ids) + 1) * size, size,
                                                                dtype=np.int32)), values)}))
    return pa.concat_tables(parts)


def batch_gradients(s: Setup, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample training-loss gradients (true labels, summed over tokens) of every target
    block, from one backward pass: name → (batch, out, in)."""
    captured = capture_batch(s.model, ids, s.all_blocks, "true", projector=s.projector, where=_where(s))
    return {name: per_sample_gradients(a, g) for name, (a, g) in captured.items()}


def grad_shape(s: Setup, b: Block) -> list[int]:
    """(out, in) of a block's stored gradient: the block's, or the projection's rank per side."""
    rank = s.projector.rank if s.projector else 0
    return [rank if 0 < rank < dim else dim for dim in b.shape(s.model)]


def cache_gradients(inf: Influence, s: Setup, stream: Stream, out: Path) -> dict:
    """Write `shard-NNNNN.parquet` (complete shards are kept on a rerun) and the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first, last = s.window
    steps_per_shard = max(1, inf.shard_samples // stream.batch_size)
    plan = _shard_plan(first, last, steps_per_shard)
    for stale in set(out.glob("shard-*.parquet")) - {out / f"shard-{i:05d}.parquet" for i in range(len(plan))}:
        stale.unlink()  # from an earlier, longer window
    dtype = np.float16 if inf.dtype == "float16" else np.float32
    shapes = {b.name: grad_shape(s, b) for b in s.all_blocks}
    shards, skipped = [], 0
    bar = tqdm(total=(last - first + 1) * stream.batch_size, desc="gradients", unit="sample")
    for i, (a, b) in enumerate(plan):
        path = out / f"shard-{i:05d}.parquet"
        expected = (b - a + 1) * stream.batch_size * len(s.all_blocks)
        if path.is_file() and _complete(path, expected, s.step, a, b):
            skipped += 1
            bar.update((b - a + 1) * stream.batch_size)
        else:
            metadata = {"mda.step": str(s.step), "mda.first_step": str(a), "mda.last_step": str(b)}
            writer = None
            with atomic_file(path) as tmp:
                # Batch by batch into row groups: a shard is never held in memory whole. No
                # dictionary or statistics on the gradient column: float noise gains nothing from
                # them and they cost 6× the write time and 50 % more disk.
                for ids, meta in window_batches(stream, a, b, inf.batch_size):
                    table = _block_rows(s, batch_gradients(s, ids), meta.column("sample_id").to_numpy(), dtype)
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, table.schema.with_metadata(metadata),
                                                  use_dictionary=["head", "block"], write_statistics=["sample_id"])
                    writer.write_table(table.replace_schema_metadata(metadata))
                    bar.update(len(ids))
                writer.close()
        shards.append({"file": path.name, "first_step": a, "last_step": b,
                       "samples": (b - a + 1) * stream.batch_size})
    bar.close()
    manifest = {"step": s.step, "window": list(s.window), "heads": [h.name for h in s.heads],
                "blocks": inf.blocks, "shapes": shapes, "dtype": inf.dtype,
                "projection": {"rank": inf.projection, "seed": inf.projection_seed} if inf.projection else None,
                "loss": "next-token cross-entropy, true labels, summed over the sequence's tokens",
                "samples": sum(x["samples"] for x in shards), "shards": shards, "reused_shards": skipped}
    write_json(out / MANIFEST, manifest)
    return manifest


def _complete(path: Path, rows: int, step: int, first: int, last: int) -> bool:
    try:
        meta = pq.read_metadata(path)
        kv = meta.metadata or {}
        return (meta.num_rows == rows and kv.get(b"mda.step") == str(step).encode()
                and kv.get(b"mda.first_step") == str(first).encode()
                and kv.get(b"mda.last_step") == str(last).encode())
    except Exception:
        return False


def read_manifest(directory: str | os.PathLike, s: Setup) -> dict:
    path = Path(directory) / MANIFEST
    manifest = read_json(path, "run the gradients stage")
    if manifest["step"] != s.step or manifest["window"] != list(s.window):
        raise MdaError(f"{path}: gradients are for step {manifest['step']}, window {manifest['window']}; "
                       f"targets ask for step {s.step}, window {list(s.window)}; rerun gradients")
    return manifest


# ----------------------------------------------------------------------------- scores
def preconditioned_probe(inf: Influence, s: Setup, factors: dict[str, BlockFactors]) -> dict[str, torch.Tensor]:
    """H⁻¹ ∇θₕ f per block (float64), each head's probe gradient taken w.r.t. its own blocks."""
    from mda.locate import probe_tokens

    tokens = probe_tokens(ProbeSettings(sequences=inf.probe_sequences, half_len=inf.probe_half_len,
                                        seed=inf.probe_seed), s.model.config, None)
    out = {}
    for head in s.heads:
        grads = probe_gradient(s.model, s.probe, tokens, head, s.blocks[head.name], s.projector)
        for name, g in grads.items():
            if not torch.isfinite(g).all():
                raise MdaError(f"{name}{_where(s)}: non-finite probe gradient")
            out[name] = factors[name].precondition(g)
    return out


def scores_from_cache(s: Setup, directory: str | os.PathLike, vectors: dict[str, torch.Tensor],
                      read_rows: int = 4096) -> pd.DataFrame:
    """(sample_id, head, score) streamed from the shards, `read_rows` rows at a time."""
    manifest = read_manifest(directory, s)
    flat = {name: v.reshape(-1).numpy() for name, v in vectors.items()}
    parts = []
    for shard in tqdm(manifest["shards"], desc="scores", unit="shard"):
        path = Path(directory) / shard["file"]
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
                    parts.append(pd.DataFrame({"sample_id": ids[rows], "head": name.split("/")[0],
                                               "score": -(values.astype(np.float64) @ flat[name])}))
        except MdaError:
            raise
        except Exception as err:
            raise MdaError(f"{path}: unreadable gradient shard ({str(err).splitlines()[0]})") from None
    frame = pd.concat(parts, ignore_index=True)
    return frame.groupby(["sample_id", "head"], as_index=False, sort=True)["score"].sum()


def scores_streaming(inf: Influence, s: Setup, stream: Stream, vectors: dict[str, torch.Tensor]) -> pd.DataFrame:
    """The same scores with no cache: per-sample gradients dotted with H⁻¹∇f as they are made."""
    first, last = s.window
    parts = []
    bar = tqdm(total=(last - first + 1) * stream.batch_size, desc="scores (streaming)", unit="sample")
    for ids, meta in window_batches(stream, first, last, inf.batch_size):
        grads = batch_gradients(s, ids)
        sample_ids = meta.column("sample_id").to_numpy()
        for b in s.all_blocks:
            # Stored as the cache would store it, so both modes score the same numbers.
            g = grads[b.name].reshape(len(ids), -1).to(torch.float32).numpy()
            g = g.astype(np.float16 if inf.dtype == "float16" else np.float32, copy=False)
            parts.append(pd.DataFrame({"sample_id": sample_ids, "head": b.name.split("/")[0],
                                       "score": -(g.astype(np.float64) @ vectors[b.name].reshape(-1).numpy())}))
        bar.update(len(ids))
    bar.close()
    return pd.concat(parts, ignore_index=True).groupby(["sample_id", "head"], as_index=False, sort=True)["score"].sum()


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
    from mda import plots

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
