#!/usr/bin/env python
"""Benchmark (not a test): how well and how fast `mda.data.classify` labels unlabelled rows.

Usage, from the repository root:

    python benchmarks/classifier.py                                  # writes benchmarks/results/classifier.json
    python benchmarks/classifier.py --json other.json --speed-rows 512   # quicker

Three measurements:

1. Agreement with the synthetic corpus's true labels. Rows come from
   `mda.data.synthetic.generate_rows` with the default mix and repeat rate, are decoded with the
   corpus's word-level tokenizer (`mda.data.tokenizer`) and classified like any unlabelled row.
   Two row lengths: 65 tokens (the default corpus) and 2,049 (Pythia's). Two decodings: as the
   tokenizer returns the text ("raw": newlines are the visible token "↵", every token is
   space-separated), and with "↵" read as a newline ("newlines"), the one fact about the
   synthetic format the line-based table rule needs. Reported: accuracy, per-class precision,
   recall and support, the confusion matrix (rows: true domain, columns: predicted), and the
   median of each rule feature per true domain (why a class is or is not recognised).
2. Agreement with the hand-written snippets (`tests/data/classify/`): `fit` (which set the
   thresholds) and `holdout` (written after the rules were fixed, never tuned on).
3. Speed at Pythia's shape: rows of 2,049 tokens of real-looking text (the snippets, shuffled
   and repeated), tokenized by a byte-level BPE trained here on the snippets (the GPT-NeoX
   tokenizer is byte-level BPE too; it is not downloaded), through `infer_domains` (cut at EOS,
   decode the longest document, classify) on one process. Two layouts: one document per row
   (the whole row is decoded and classified: the worst case) and snippets packed EOS-separated
   (only the longest is). Reported: rows/s of wall time and of CPU time (this process; the
   tokenizer's decode may use more than one thread), and the hours one process needs for a
   1,024,000-row window (Pythia-14M's 1,000 steps x 1,024 rows). On a shared machine the wall
   rate is only as good as the machine was quiet: the JSON records the load average.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mda.core.config import Corpus  # noqa: E402
from mda.data.classify import (CLASSES, VERSION, Features, classify_texts, features,  # noqa: E402
                                infer_domains)
from mda.data.synthetic import NEWLINE, build_vocabulary, generate_rows  # noqa: E402
from mda.data.tokenizer import word_level_tokenizer  # noqa: E402

SNIPPETS = ROOT / "tests" / "data" / "classify"
PYTHIA_ROW = 2049
PYTHIA_WINDOW_ROWS = 1_024_000


def agreement(true: list[str], pred: list[str]) -> dict:
    labels = list(CLASSES)
    confusion = collections.Counter(zip(true, pred))
    per_class = {}
    for c in labels:
        tp = confusion[(c, c)]
        predicted = sum(confusion[(t, c)] for t in labels)
        actual = sum(confusion[(c, p)] for p in labels)
        per_class[c] = {"precision": round(tp / predicted, 4) if predicted else None,
                        "recall": round(tp / actual, 4) if actual else None,
                        "support": actual}
    return {
        "rows": len(true),
        "accuracy": round(float(np.mean([t == p for t, p in zip(true, pred)])), 4),
        "per_class": per_class,
        "confusion": {"labels": labels,
                      "rows_true_columns_predicted": [[confusion[(t, p)] for p in labels]
                                                      for t in labels]},
    }


def synthetic_agreement(row_len: int, n_rows: int, seed: int) -> dict:
    corpus = Corpus()
    vocab = build_vocabulary()
    tokenizer = word_level_tokenizer(vocab)
    rows, domains = generate_rows(vocab, n_rows, row_len, dict(corpus.synthetic.mix), seed=seed,
                                  repeat_rate=corpus.synthetic.repeat_rate)
    raw = tokenizer.batch_decode(rows.tolist())
    out = {}
    for name, texts in [("raw", raw), ("newlines", [t.replace(NEWLINE, "\n") for t in raw])]:
        out[name] = agreement(domains, classify_texts(texts))
        out[name]["feature_medians"] = feature_medians(domains, texts)
    return out


def feature_medians(domains: list[str], texts: list[str]) -> dict:
    """Median of each rule feature per true domain: why a class is (not) recognised."""
    by_domain = collections.defaultdict(list)
    for d, t in zip(domains, texts):
        by_domain[d].append(features(t))
    names = [f.name for f in fields(Features) if f.name != "chars"]
    return {d: {n: round(float(np.median([getattr(f, n) for f in fs])), 3) for n in names}
            for d, fs in sorted(by_domain.items())}


def snippet_agreement() -> dict:
    out = {}
    for subset in ("fit", "holdout"):
        files = sorted((SNIPPETS / subset).glob("*/*.txt"))
        true = [f.parent.name for f in files]
        pred = classify_texts([f.read_text() for f in files])
        out[subset] = {"documents": len(files),
                       "accuracy": round(float(np.mean([t == p for t, p in zip(true, pred)])), 4),
                       "errors": [f"{f.parent.name}/{f.name} -> {p}"
                                  for f, t, p in zip(files, true, pred) if t != p]}
    return out


def bpe_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def speed(n_rows: int, seed: int) -> dict:
    texts = [f.read_text() for f in sorted(SNIPPETS.glob("*/*/*.txt"))]
    tokenizer = bpe_tokenizer(texts)
    eos = tokenizer.eos_token_id
    rng = random.Random(seed)
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def stream(with_eos: bool):
        while True:
            order = list(range(len(docs)))
            rng.shuffle(order)
            for i in order:
                yield from docs[i]
                if with_eos:
                    yield eos

    out = {"tokenizer": "byte-level BPE, 4,096 tokens, trained on the snippets",
           "row_len": PYTHIA_ROW, "rows": n_rows}
    for layout, with_eos in [("one_document_per_row", False), ("packed_documents", True)]:
        it = stream(with_eos)
        rows = np.array([[next(it) for _ in range(PYTHIA_ROW)] for _ in range(n_rows)], np.int32)
        decoded = tokenizer.batch_decode(rows[:64].tolist())
        wall, cpu = time.perf_counter(), time.process_time()
        infer_domains(rows, tokenizer)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rate = n_rows / wall
        out[layout] = {"seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
                       "rows_per_s": round(rate, 1), "rows_per_cpu_s": round(n_rows / cpu, 1),
                       "tokens_per_s": round(rate * PYTHIA_ROW),
                       "chars_per_row": round(float(np.mean([len(t) for t in decoded]))),
                       "hours_per_1024000_rows": round(PYTHIA_WINDOW_ROWS / rate / 3600, 2)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "classifier.json"))
    parser.add_argument("--short-rows", type=int, default=6000, help="synthetic rows of 65 tokens")
    parser.add_argument("--long-rows", type=int, default=1200, help="synthetic rows of 2,049 tokens")
    parser.add_argument("--speed-rows", type=int, default=2048, help="rows timed at Pythia's shape")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    result = {
        "classifier": {"module": "mda.data.classify", "version": VERSION},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_1min_before": round(os.getloadavg()[0], 2)},
        "snippets": snippet_agreement(),
        "synthetic": {
            "mix": dict(Corpus().synthetic.mix),
            "row_len_65": synthetic_agreement(65, args.short_rows, args.seed),
            f"row_len_{PYTHIA_ROW}": synthetic_agreement(PYTHIA_ROW, args.long_rows, args.seed),
        },
        "speed": speed(args.speed_rows, args.seed),
    }
    result["machine"]["load_1min_after"] = round(os.getloadavg()[0], 2)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    for name, a in [(k, v) for k, v in result["synthetic"].items() if k != "mix"]:
        for decoding, r in a.items():
            recall = " ".join(f"{c}={r['per_class'][c]['recall']}" for c in CLASSES)
            print(f"synthetic {name} {decoding:8s} accuracy {r['accuracy']:.3f}  recall {recall}")
    for subset, r in result["snippets"].items():
        print(f"snippets {subset}: accuracy {r['accuracy']:.3f} of {r['documents']}; errors {r['errors']}")
    for layout in ("one_document_per_row", "packed_documents"):
        s = result["speed"][layout]
        print(f"speed {layout}: {s['rows_per_s']} rows/s ({s['rows_per_cpu_s']} per CPU s), "
              f"{s['tokens_per_s']} tokens/s, "
              f"{s['hours_per_1024000_rows']} h per 1,024,000 rows")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
