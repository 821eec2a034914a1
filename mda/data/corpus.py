"""Build the training stream (`data/corpus/`) from the source chosen in params."""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from mda.core.config import Corpus
from mda.core.errors import MdaError
from mda.data import classify
from mda.data.stream import StreamWriter, stream_table
from mda.core.io import read_json, write_json, write_parquet

HELDOUT = "heldout.parquet"
NO_DOMAIN = "pile"
"""The domain of every Pythia row when there is no tokenizer to infer one with."""

# Synthetic rows are generated this many steps at a time, so memory stays flat.
_CHUNK_STEPS = 256


def build_corpus(corpus: Corpus, out: str | os.PathLike) -> dict:
    """Write `stream/`, `tokenizer/` and `meta.json` under `out`; return the meta dict.

    A source without domain labels (`pythia`; `hf` without `domain_field`) gets domains inferred
    from the decoded text by `mda.data.classify`, and `meta.json` says so (`domain_inference`).
    """
    out = Path(out)
    build = {"synthetic": _synthetic, "pythia": _pythia, "hf": _hf}[corpus.source]
    with StreamWriter(out / "stream", corpus.batch_size) as writer, \
            tqdm(total=corpus.steps, desc=f"corpus ({corpus.source})", unit="step") as bar:
        source = build(corpus, writer, bar)

    write_parquet(out / HELDOUT, pa.table({
        "domain": pa.array(source.heldout_domains, pa.string()),
        "input_ids": pa.array(list(np.asarray(source.heldout, np.int32)), pa.list_(pa.int32()))}))
    if source.tokenizer is not None:
        source.tokenizer.save_pretrained(str(out / "tokenizer"))
    meta = {
        "source": corpus.source,
        "seed": corpus.seed,
        "seq_len": corpus.seq_len,
        "row_len": corpus.seq_len + 1,
        "batch_size": corpus.batch_size,
        "first_step": corpus.start_step,
        "last_step": corpus.start_step + corpus.steps - 1,
        "rows": corpus.steps * corpus.batch_size,
        "tokens": corpus.steps * corpus.batch_size * (corpus.seq_len + 1),
        "heldout_rows": len(source.heldout),
        "vocab_size": source.vocab_size,
        "domain_counts": dict(sorted(source.domain_counts.items())),
    }
    if source.domain_inference is not None:  # absent for labelled sources: their meta is unchanged
        meta["domain_inference"] = source.domain_inference
    write_json(out / "meta.json", meta)
    return meta


@dataclass
class _Source:
    """What a source hands back besides the stream it wrote."""

    domain_counts: collections.Counter
    heldout: np.ndarray
    heldout_domains: list[str]
    tokenizer: object | None
    vocab_size: int | None
    domain_inference: dict | None = None


def _synthetic(corpus: Corpus, writer: StreamWriter, bar: tqdm) -> _Source:
    from mda.data.synthetic import build_vocabulary, generate_rows
    from mda.data.tokenizer import word_level_tokenizer

    vocab = build_vocabulary()
    counts: collections.Counter[str] = collections.Counter()
    stop = corpus.start_step + corpus.steps
    for first in range(corpus.start_step, stop, _CHUNK_STEPS):
        n = min(_CHUNK_STEPS, stop - first)
        # One seed per chunk: any chunk can be regenerated alone, bytes never depend on chunking.
        rows, domains = generate_rows(vocab, n * corpus.batch_size, corpus.seq_len + 1,
                                      dict(corpus.synthetic.mix),
                                      seed=_chunk_seed(corpus.seed, first),
                                      repeat_rate=corpus.synthetic.repeat_rate)
        writer.write(stream_table(rows, domains, first, corpus.batch_size))
        counts.update(domains)
        bar.update(n)
    heldout, heldout_domains = generate_rows(
        vocab, corpus.heldout_rows, corpus.seq_len + 1, dict(corpus.synthetic.mix),
        seed=_heldout_seed(corpus.seed), repeat_rate=corpus.synthetic.repeat_rate)
    return _Source(counts, heldout, heldout_domains, word_level_tokenizer(vocab), vocab.size)


def _pythia(corpus: Corpus, writer: StreamWriter, bar: tqdm) -> _Source:
    from mda.data.hf import load_tokenizer
    from mda.data.pythia import MegatronDataset

    data = MegatronDataset(corpus.pythia.path)
    # Held out: the rows right after the stream, unseen until that step (checked before streaming).
    stop = (corpus.start_step + corpus.steps) * corpus.batch_size
    if stop >= len(data):
        raise MdaError(f"{data.idx_path}: no rows after step {corpus.start_step + corpus.steps - 1} "
                       f"to hold out")
    tokenizer = load_tokenizer(corpus.pythia.tokenizer) if corpus.pythia.tokenizer else None

    def label(rows: np.ndarray) -> list[str]:  # the pre-shuffled Pile carries no labels
        return classify.infer_domains(rows, tokenizer) if tokenizer else [NO_DOMAIN] * len(rows)

    counts: collections.Counter[str] = collections.Counter()
    for step, rows in data.iter_steps(corpus.start_step, corpus.steps, corpus.batch_size,
                                      corpus.seq_len + 1):
        domains = label(rows)
        writer.write(stream_table(rows, domains, step, corpus.batch_size))
        counts.update(domains)
        bar.update(1)
    heldout = data.rows(stop, min(stop + corpus.heldout_rows, len(data)))
    inference = (classify.description() if tokenizer else
                 {"inferred": False, "reason": "corpus.pythia.tokenizer is null: rows cannot be decoded"})
    return _Source(counts, heldout, label(heldout), tokenizer,
                   len(tokenizer) if tokenizer is not None else None, inference)


def _hf(corpus: Corpus, writer: StreamWriter, bar: tqdm) -> _Source:
    from mda.data.hf import hf_rows

    n_train = corpus.steps * corpus.batch_size
    rows, domains, tokenizer = hf_rows(corpus.hf, n_train + corpus.heldout_rows, corpus.seq_len + 1)
    infer = corpus.hf.domain_field is None

    def label(rows: np.ndarray, labels: list[str]) -> list[str]:
        return classify.infer_domains(rows, tokenizer) if infer else labels

    counts: collections.Counter[str] = collections.Counter()
    for first in range(0, corpus.steps, _CHUNK_STEPS):  # a chunk at a time: one copy in Arrow
        n = min(_CHUNK_STEPS, corpus.steps - first)
        sl = slice(first * corpus.batch_size, (first + n) * corpus.batch_size)
        chunk_domains = label(rows[sl], domains[sl])
        writer.write(stream_table(rows[sl], chunk_domains, corpus.start_step + first,
                                  corpus.batch_size))
        counts.update(chunk_domains)
        bar.update(n)
    # Held out: the rows packed after the training ones.
    heldout = rows[n_train:]
    return _Source(counts, heldout, label(heldout, domains[n_train:]), tokenizer, len(tokenizer),
                   classify.description() if infer else None)


def _heldout_seed(seed: int) -> int:
    # Three entropy words: never equal to a chunk's [seed, first_step].
    return int(np.random.SeedSequence([seed, 0, 1]).generate_state(1)[0])


def _chunk_seed(seed: int, first_step: int) -> int:
    return int(np.random.SeedSequence([seed, first_step]).generate_state(1)[0])


def read_heldout(corpus_dir: str | os.PathLike, rows: int) -> np.ndarray:
    """The first `rows` held-out rows, (rows, row_len) int64."""
    import pyarrow.parquet as pq

    path = Path(corpus_dir) / HELDOUT
    if not path.is_file():
        raise MdaError(f"{path}: missing; rerun the corpus stage")
    try:
        column = pq.read_table(path, columns=["input_ids"]).column("input_ids")
    except Exception as err:
        raise MdaError(f"{path}: cannot read ({str(err).splitlines()[0]})") from None
    ids = np.array(column.to_pylist()[:rows], dtype=np.int64)
    if ids.ndim != 2 or len(ids) == 0:
        raise MdaError(f"{path}: no rows of one length")
    return ids


def read_corpus_meta(corpus_dir: str | os.PathLike) -> dict:
    """The corpus stage's `meta.json` (vocabulary size, domains, …), read by every stage that needs it."""
    return read_json(Path(corpus_dir) / "meta.json", "run the corpus stage first")
