"""Catalysts: what the top-k set is made of — each domain's share of it over its share of the
window (with a bootstrap interval), and the top samples decoded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from mda.core.config import Evaluate


def domain_enrichment(window_domains: pd.Series, top_domains: pd.Series, ev: Evaluate) -> pd.DataFrame:
    """Per domain: share of the top-k set, share of the window, their ratio, and a percentile
    bootstrap interval of the ratio (both samples resampled: multinomial draws of their counts)."""
    domains = sorted(set(window_domains))
    n, k = len(window_domains), len(top_domains)
    win = window_domains.value_counts().reindex(domains, fill_value=0).to_numpy()
    top = top_domains.value_counts().reindex(domains, fill_value=0).to_numpy()
    rng = np.random.default_rng([ev.seed, 11])
    win_b = rng.multinomial(n, win / n, size=ev.bootstrap) / n
    top_b = rng.multinomial(k, top / k, size=ev.bootstrap) / k
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio_b = top_b / win_b
    tail = (1 - ev.confidence) / 2 * 100
    low, high = np.nanpercentile(ratio_b, [tail, 100 - tail], axis=0)
    return pd.DataFrame({"domain": domains, "window_count": win, "top_count": top,
                         "window_share": win / n, "top_share": top / k,
                         "enrichment": (top / k) / (win / n), "ci_low": low, "ci_high": high})


def decode_samples(stream, tokenizer_dir: str | os.PathLike, samples: pd.DataFrame) -> pd.DataFrame:
    """`samples` (sample_id, step, …) with the row's text decoded by the corpus tokenizer and
    `pieces`, the text of each of the row's tokens (`token_pieces`; both None where the corpus has
    no tokenizer)."""
    if samples.empty:
        return samples.assign(text=pd.Series(dtype=object), pieces=pd.Series(dtype=object))
    table = pd.concat([stream.read(int(s), int(s), columns=["sample_id", "input_ids"]).to_pandas()
                       for s in sorted(set(samples.step))], ignore_index=True)
    ids = dict(zip(table.sample_id, table.input_ids))
    tokenizer = None
    if (Path(tokenizer_dir) / "tokenizer.json").is_file() or (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    text = [tokenizer.decode(list(ids[s])) if tokenizer is not None else None for s in samples.sample_id]
    pieces = [token_pieces(tokenizer, list(ids[s])) if tokenizer is not None else None for s in samples.sample_id]
    return samples.assign(text=text, pieces=pieces)


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text, such that joined they read as the decoded row: a word-level vocabulary
    decodes tokens on their own and joins them with spaces, so there each piece but the last
    carries its space."""
    pieces = [tokenizer.decode([i]) for i in ids]
    if "".join(pieces) != tokenizer.decode(ids):
        pieces = [p + " " for p in pieces[:-1]] + pieces[-1:]
    return pieces
