"""Local documents are tokenized, EOS-separated and packed into rows in dataset order,
each row labelled with the domain of its largest document; short data is refused."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mda.core.config import HfCorpus
from mda.data.hf import hf_rows
from mda.core.errors import MdaError

WORDS = ["<eos>", "<unk>"] + [f"w{i}" for i in range(20)]
EOS = 0
DOCS = [  # (text, domain): 3 + 6 + 2 + 4 tokens with EOS = 15
    ("w1 w2", "prose"),
    ("w3 w4 w5 w6 w7", "code"),
    ("w8", "prose"),
    ("w9 w10 w11", "junk"),
]


def ids(text):
    return [WORDS.index(w) for w in text.split()] + [EOS]


@pytest.fixture
def tokenizer_dir(tmp_path):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(tmp_path / "tok")
    return str(tmp_path / "tok")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": t, "meta": {"set": d}}) + "\n" for t, d in DOCS))
    return str(path)


def test_rows_are_packed_documents_in_order(corpus, tokenizer_dir):
    hf = HfCorpus(files=[corpus], text_field="body", tokenizer=tokenizer_dir,
                  domain_field="meta.set")
    rows, domains, tokenizer = hf_rows(hf, n_rows=3, row_len=4)
    stream = sum((ids(t) for t, _ in DOCS), [])
    assert rows.dtype == np.int32
    np.testing.assert_array_equal(rows, np.array(stream[:12]).reshape(3, 4))
    # row 0: prose 3, code 1; row 1: code 4; row 2: code 1, prose 2, junk 1
    assert domains == ["prose", "code", "prose"]
    assert tokenizer.eos_token_id == EOS


def test_without_domain_field_rows_are_hf(corpus, tokenizer_dir):
    hf = HfCorpus(files=[corpus], text_field="body", tokenizer=tokenizer_dir)
    _, domains, _ = hf_rows(hf, n_rows=2, row_len=5)
    assert domains == ["hf", "hf"]


def test_txt_file_is_one_document(tmp_path, tokenizer_dir):
    path = tmp_path / "doc.txt"
    path.write_text("w1 w2\nw3\n")
    rows, _, _ = hf_rows(HfCorpus(files=[str(path)], tokenizer=tokenizer_dir), 1, 4)
    np.testing.assert_array_equal(rows[0], ids("w1 w2 w3"))


def test_not_enough_data(corpus, tokenizer_dir):
    hf = HfCorpus(files=[corpus], text_field="body", tokenizer=tokenizer_dir)
    with pytest.raises(MdaError, match=r"docs\.jsonl: the data gives 3 rows of 5 tokens, 4 are needed"):
        hf_rows(hf, n_rows=4, row_len=5)


def test_missing_text_column(corpus, tokenizer_dir):
    hf = HfCorpus(files=[corpus], text_field="text", tokenizer=tokenizer_dir)
    with pytest.raises(MdaError, match=r"docs\.jsonl: no text column 'text'"):
        hf_rows(hf, 1, 4)


def test_missing_file(tmp_path, tokenizer_dir):
    hf = HfCorpus(files=[str(tmp_path / "absent.jsonl")], tokenizer=tokenizer_dir)
    with pytest.raises(MdaError, match=r"absent\.jsonl: corpus file not found"):
        hf_rows(hf, 1, 4)
