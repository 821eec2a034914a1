"""Phase 1: EK-FAC factors of every target block → `factors/<head>/<block>.safetensors`.

Each file records the identity of its inputs (checkpoint, stream parts, blocks, the fit's
settings, code version); `load_factors` refuses factors fitted for other inputs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from mda.core.identity import code_version, describe_mismatch
from mda.core.config import Influence
from mda.data.stream import Stream
from mda.core.errors import MdaError
from mda.attribute.ekfac import BlockFactors, fit_ekfac
from mda.attribute.window import Setup, WindowBatches, stream_key


class WindowSource:
    """A window's numbered batches as an EK-FAC batch source (`mda.attribute.ekfac`)."""

    def __init__(self, batches: WindowBatches, stream: Stream):
        self.batches, self.stream = batches, stream

    def __len__(self) -> int:
        return len(self.batches)

    def tokens(self, index: int) -> int:
        return self.batches.size(index) * (self.stream.row_len - 1)

    def read(self, part: range):
        for i, ids, _ in self.batches.read(self.stream, part):
            yield i, ids


def factor_subset(inf: Influence, s: Setup, stream: Stream) -> WindowBatches:
    """`factor_samples` window samples, evenly spread: every `stride`-th step of the window."""
    first, last = s.window
    window_samples = (last - first + 1) * stream.batch_size
    stride = 1 if not inf.factor_samples else max(1, math.ceil(window_samples / inf.factor_samples))
    return WindowBatches(first, last, inf.batch_size, stream.batch_size, stride)


def factors_identity(inf: Influence, s: Setup, stream: Stream) -> dict:
    subset = factor_subset(inf, s, stream)
    return {"checkpoint": s.checkpoint, "stream": stream_key(stream, *s.window), "blocks": s.blocks_key(),
            "subset": [subset.first, subset.last, subset.stride, subset.rows],
            "fisher": inf.fisher, "damping": inf.damping, "label_seed": inf.label_seed,
            "projection": [inf.projection, inf.projection_seed] if inf.projection else None,
            "code": code_version("mda.attribute.factors")}


def fit_factors(inf: Influence, s: Setup, stream: Stream, out: Path) -> dict:
    """EK-FAC factors of every target block over (a spread subset of) the window. Every rank
    takes part; rank 0 writes the files."""
    subset = factor_subset(inf, s, stream)
    factors = fit_ekfac(s.model, WindowSource(subset, stream), s.all_blocks, fisher=inf.fisher,
                        alpha=inf.damping, seed=inf.label_seed, projector=s.projector, where=s.where, rt=s.rt)
    identity = factors_identity(inf, s, stream)
    summary = {}
    for name, f in factors.items():
        head, block = name.split("/")
        f.meta.update(step=s.step, projection=inf.projection, identity=json.dumps(identity, sort_keys=True))
        if s.rt.is_main:
            (out / head).mkdir(parents=True, exist_ok=True)
            f.save(out / head / f"{block}.safetensors")
        summary[name] = {"damping": f.damping, "eigenvalue_mean": f.eigenvalues.mean().item(),
                         "eigenvalue_max": f.eigenvalues.max().item(), "shape": list(f.eigenvalues.shape)}
    return {"step": s.step, "window": list(s.window), "samples": factors[s.all_blocks[0].name].meta["samples"],
            "stride": subset.stride, "blocks": summary, "identity": identity}


def load_factors(directory: str | os.PathLike, s: Setup) -> dict[str, BlockFactors]:
    """Every target block's factors, checked to be fitted at this checkpoint, for these blocks
    and this projection (the components scoring depends on)."""
    out = {}
    for b in s.all_blocks:
        head, block = b.name.split("/")
        path = Path(directory) / head / f"{block}.safetensors"
        factors = BlockFactors.load(path)
        stored = json.loads(factors.meta.get("identity", "{}"))
        current = {"checkpoint": s.checkpoint, "blocks": s.blocks_key(),
                   "projection": [s.projector.rank, s.projector.seed] if s.projector else None}
        relevant = {k: stored.get(k) for k in current}
        if relevant != current:
            raise MdaError(f"{path}: fitted for other inputs ({describe_mismatch(relevant, current)} differ); "
                           "rerun the factors stage")
        out[b.name] = factors
    return out
