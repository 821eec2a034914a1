"""Training rows from a 🤗 dataset or local text/jsonl/parquet files, packed GPT-style.

Documents are read in dataset order, tokenized without special tokens, each followed by
the tokenizer's EOS id, concatenated and cut into consecutive rows of `row_len` tokens
(documents cross row boundaries, no padding). Reading stops as soon as the rows are
full, and datasets are streamed, so a large corpus is never downloaded or tokenized in full.

A `.txt` file is one document (its whole text): splitting prose at newlines would cut
paragraphs and code apart. Use `.jsonl` or `.parquet` for many documents per file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from mda.core.config import HfCorpus
from mda.core.errors import MdaError

NO_DOMAIN = "hf"
_TOKENIZE_BATCH = 64
"""Documents tokenized per call: fast batched tokenization, little overshoot at the end."""
_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def _records(hf: HfCorpus) -> Iterator[tuple[str, dict]]:
    """(source name for messages, document record) in dataset order."""
    if not hf.files:
        name = hf.dataset + (f"/{hf.dataset_config}" if hf.dataset_config else "") + f"[{hf.split}]"
        yield from _dataset_records(name, hf.dataset, name=hf.dataset_config, split=hf.split)
        return
    for file in map(Path, hf.files):
        if not file.is_file():
            raise MdaError(f"{file}: corpus file not found")
        suffix = file.suffix.lower()
        if suffix == ".txt":
            yield str(file), {hf.text_field: file.read_text(encoding="utf-8")}
        elif suffix in _LOADERS:
            yield from _dataset_records(str(file), _LOADERS[suffix], data_files=str(file),
                                        split="train")
        else:
            raise MdaError(f"{file}: unsupported corpus file type (use .txt, .jsonl, .json "
                           f"or .parquet)")


def _dataset_records(source: str, path: str, **kwargs) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        data = iter(datasets.load_dataset(path, streaming=True, **kwargs))
        while True:
            try:
                record = next(data)
            except StopIteration:
                return
            yield source, record
    except Exception as err:  # datasets/pyarrow/fsspec raise many types for bad inputs
        raise MdaError(f"{source}: cannot read dataset ({_first_line(err)})") from None


def _field(record: dict, key: str, source: str, what: str):
    """`record[key]`, where a dotted key reaches into nested records (e.g. `meta.pile_set_name`)."""
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise MdaError(f"{source}: no {what} column '{key}' "
                           f"(columns: {', '.join(map(str, record))})")
        value = value[part]
    return value


def _documents(hf: HfCorpus) -> Iterator[tuple[str, str, str]]:
    """(source, text, domain) per document."""
    for source, record in _records(hf):
        text = _field(record, hf.text_field, source, "text")
        if not isinstance(text, str):
            raise MdaError(f"{source}: text column '{hf.text_field}' holds "
                           f"{type(text).__name__}, expected strings")
        domain = str(_field(record, hf.domain_field, source, "domain")) if hf.domain_field else NO_DOMAIN
        yield source, text, domain


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as err:  # hub, file and parsing errors come in many types
        raise MdaError(f"{name}: cannot load tokenizer ({_first_line(err)})") from None
    if tokenizer.eos_token_id is None:
        raise MdaError(f"{name}: tokenizer has no EOS token to separate documents")
    return tokenizer


def _token_docs(hf: HfCorpus, tokenizer) -> Iterator[tuple[list[int], str]]:
    """(token ids + EOS, domain) per document, tokenized a batch of documents at a time."""
    batch: list[tuple[str, str]] = []

    def flush():
        ids = tokenizer([text for text, _ in batch], add_special_tokens=False,
                        verbose=False)["input_ids"]
        for doc_ids, (_, domain) in zip(ids, batch):
            yield doc_ids + [tokenizer.eos_token_id], domain
        batch.clear()

    for _, text, domain in _documents(hf):
        batch.append((text, domain))
        if len(batch) == _TOKENIZE_BATCH:
            yield from flush()
    if batch:
        yield from flush()


def hf_rows(hf: HfCorpus, n_rows: int, row_len: int) -> tuple[np.ndarray, list[str], object]:
    """The first `n_rows` packed rows (n_rows, row_len) int32, each row's domain, and the tokenizer.

    A row's domain is that of the document contributing most of its tokens (the earlier
    document on a tie), or "hf" without `hf.domain_field`.
    """
    tokenizer = load_tokenizer(hf.tokenizer)
    flat = np.empty(n_rows * row_len, np.int32)
    best = np.zeros(n_rows, np.int64)  # most tokens one document gives each row so far
    domains = [NO_DOMAIN] * n_rows
    pos = 0
    for ids, domain in _token_docs(hf, tokenizer):
        take = min(len(ids), flat.size - pos)
        flat[pos:pos + take] = ids[:take]
        for row in range(pos // row_len, (pos + take - 1) // row_len + 1):
            count = min(pos + take, (row + 1) * row_len) - max(pos, row * row_len)
            if count > best[row]:
                best[row], domains[row] = count, domain
        pos += take
        if pos == flat.size:
            return flat.reshape(n_rows, row_len), domains, tokenizer
    source = ", ".join(hf.files) if hf.files else hf.dataset
    raise MdaError(f"{source}: the data gives {pos // row_len} rows of {row_len} tokens, "
                   f"{n_rows} are needed")
