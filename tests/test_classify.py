"""The content classifier labels hand-written documents of each kind, and picks the document
that contributes most tokens to a packed row.

The snippets under tests/data/classify/ are real-looking text written by hand: `fit/` set the
thresholds, `holdout/` was written after the rules were fixed and never tuned on."""

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mda.data.classify import CLASSES, classify_text, infer_domains, longest_documents

SNIPPETS = Path(__file__).parent / "data" / "classify"
FILES = sorted(SNIPPETS.glob("*/*/*.txt"))


def test_every_class_has_snippets():
    for subset in ("fit", "holdout"):
        kinds = {f.parent.name for f in FILES if f.parts[-3] == subset}
        assert kinds == set(CLASSES), subset
    assert min(sum(f.parent.name == c for f in FILES) for c in CLASSES) >= 8


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parts[-3]}/{p.parent.name}/{p.name}")
def test_snippet_is_classified_as_its_kind(path):
    assert classify_text(path.read_text()) == path.parent.name


def test_empty_text_is_prose():
    assert classify_text("") == "prose"


def test_longest_document_of_each_row():
    eos = 0
    rows = np.array([[5, 6, 0, 7, 8, 9, 0, 1],    # middle document is longest
                     [5, 6, 7, 0, 8, 9, 4, 0],    # a tie: the earlier one
                     [5, 6, 7, 8, 9, 1, 2, 3],    # one document, no EOS
                     [0, 0, 5, 0, 6, 7, 0, 0]])   # EOS runs leave empty documents
    got = [d.tolist() for d in longest_documents(rows, eos)]
    assert got == [[7, 8, 9], [5, 6, 7], [5, 6, 7, 8, 9, 1, 2, 3], [6, 7]]
    assert [d.tolist() for d in longest_documents(rows[:1], None)] == [rows[0].tolist()]


def word_tokenizer(texts):
    """A word-level tokenizer whose vocabulary covers `texts` (decoding joins words by spaces)."""
    words = ["<eos>", "<unk>"] + sorted({w for t in texts for w in t.split()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def test_rows_get_the_class_of_their_main_document():
    docs = {kind: (SNIPPETS / "fit" / kind / name).read_text()
            for kind, name in [("latex", "theorem.txt"), ("prose", "legal.txt"),
                               ("code", "server.go.txt")]}
    tok = word_tokenizer(docs.values())
    ids = {k: tok(t, add_special_tokens=False)["input_ids"] for k, t in docs.items()}
    rows, expected = [], []
    for main, other in [("latex", "prose"), ("prose", "code"), ("code", "latex"), ("prose", "latex")]:
        # 8 tokens of another document's tail, EOS, then 40 tokens of the main one.
        rows.append(ids[other][-8:] + [tok.eos_token_id] + ids[main][:40])
        expected.append(main)
    assert infer_domains(np.array(rows), tok, chunk=3) == expected
