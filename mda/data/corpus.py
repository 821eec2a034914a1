"""Build the training stream (`data/corpus/`) from the source chosen in params."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from mda.config import Corpus
from mda.errors import MdaError
from mda.data.stream import StreamWriter, stream_table
from mda.io import write_json, write_parquet

HELDOUT = "heldout.parquet"

# Synthetic rows are generated this many steps at a time, so memory stays flat.
_CHUNK_STEPS = 256


def build_corpus(corpus: Corpus, out: str | os.PathLike) -> dict:
    """Write `stream/`, `tokenizer/` and `meta.json` under `out`; return the meta dict."""
    out = Path(out)
    row_len = corpus.seq_len + 1
    writer = StreamWriter(out / "stream", corpus.batch_size)
    domain_counts: collections.Counter[str] = collections.Counter()
    steps = range(corpus.start_step, corpus.start_step + corpus.steps)
    bar = tqdm(total=corpus.steps, desc=f"corpus ({corpus.source})", unit="step")

    if corpus.source == "synthetic":
        from mda.data.synthetic import build_vocabulary, generate_rows
        from mda.data.tokenizer import word_level_tokenizer

        vocab = build_vocabulary()
        tokenizer = word_level_tokenizer(vocab)
        for first in range(steps.start, steps.stop, _CHUNK_STEPS):
            n = min(_CHUNK_STEPS, steps.stop - first)
            # One seed per chunk: any chunk can be regenerated alone, bytes never depend on chunking.
            rows, domains = generate_rows(vocab, n * corpus.batch_size, row_len,
                                          dict(corpus.synthetic.mix),
                                          seed=_chunk_seed(corpus.seed, first),
                                          repeat_rate=corpus.synthetic.repeat_rate)
            writer.write(stream_table(rows, domains, first, corpus.batch_size))
            domain_counts.update(domains)
            bar.update(n)
        heldout, heldout_domains = generate_rows(
            vocab, corpus.heldout_rows, row_len, dict(corpus.synthetic.mix),
            seed=_heldout_seed(corpus.seed), repeat_rate=corpus.synthetic.repeat_rate)
        vocab_size = vocab.size
    elif corpus.source == "pythia":
        from transformers import AutoTokenizer

        from mda.data.pythia import MegatronDataset

        data = MegatronDataset(corpus.pythia.path)
        for step, rows in data.iter_steps(steps.start, corpus.steps, corpus.batch_size, row_len):
            writer.write(stream_table(rows, ["pile"] * len(rows), step, corpus.batch_size))
            domain_counts["pile"] += len(rows)
            bar.update(1)
        # Held out: the rows right after the stream, unseen until that step.
        stop = (steps.stop) * corpus.batch_size
        if stop >= len(data):
            raise MdaError(f"{data.idx_path}: no rows after step {steps.stop - 1} to hold out")
        heldout = data.rows(stop, min(stop + corpus.heldout_rows, len(data)))
        heldout_domains = ["pile"] * len(heldout)
        tokenizer = AutoTokenizer.from_pretrained(corpus.pythia.tokenizer) if corpus.pythia.tokenizer else None
        vocab_size = len(tokenizer) if tokenizer is not None else None
    else:
        from mda.data.hf import hf_rows

        n_train = corpus.steps * corpus.batch_size
        rows, domains, tokenizer = hf_rows(corpus.hf, n_train + corpus.heldout_rows, row_len)
        # Held out: the rows packed after the training ones.
        rows, heldout = rows[:n_train], rows[n_train:]
        domains, heldout_domains = domains[:n_train], domains[n_train:]
        writer.write(stream_table(rows, domains, steps.start, corpus.batch_size))
        domain_counts.update(domains)
        bar.update(corpus.steps)
        vocab_size = len(tokenizer)
    bar.close()
    writer.close()  # the last, possibly short, part

    write_parquet(out / HELDOUT, pa.table({
        "domain": pa.array(heldout_domains, pa.string()),
        "input_ids": pa.array(list(np.asarray(heldout, np.int32)), pa.list_(pa.int32()))}))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out / "tokenizer"))
    meta = {
        "source": corpus.source,
        "seed": corpus.seed,
        "seq_len": corpus.seq_len,
        "row_len": row_len,
        "batch_size": corpus.batch_size,
        "first_step": steps.start,
        "last_step": steps.stop - 1,
        "rows": corpus.steps * corpus.batch_size,
        "tokens": corpus.steps * corpus.batch_size * row_len,
        "heldout_rows": len(heldout),
        "vocab_size": vocab_size,
        "domain_counts": dict(sorted(domain_counts.items())),
    }
    write_json(out / "meta.json", meta)
    return meta


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
