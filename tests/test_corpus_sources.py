"""build_corpus on unlabelled sources: a Pythia stream is written in parts of whole steps (not a
file per step) and read back in step order; domains are inferred from decoded text when a
tokenizer can decode the rows, and meta.json says so."""

import json
import math

import numpy as np

from mda.core.config import Corpus
from mda.data.classify import VERSION
from mda.data.corpus import build_corpus
from mda.data.pythia import write_megatron
from mda.data.stream import STEPS_PER_FILE, Stream
from tests.test_classify import SNIPPETS, word_tokenizer


def test_pythia_stream_is_parts_of_whole_steps(tmp_path):
    batch, row_len, steps = 2, 5, STEPS_PER_FILE * 2 + 88
    n = (steps + 3) * batch  # rows to hold out after the stream
    rows = np.arange(n)[:, None] * row_len + np.arange(row_len)  # each token names its row
    write_megatron(tmp_path / "pile", rows)
    corpus = Corpus(source="pythia", pythia={"path": str(tmp_path / "pile")}, seq_len=row_len - 1,
                    batch_size=batch, steps=steps, start_step=1, heldout_rows=4)
    meta = build_corpus(corpus, tmp_path / "out")
    parts = sorted((tmp_path / "out" / "stream").glob("part-*.parquet"))
    assert len(parts) == math.ceil(steps / STEPS_PER_FILE) == 3
    stream = Stream(tmp_path / "out" / "stream")
    assert (stream.first_step, stream.last_step) == (1, steps)
    table = stream.read(1, steps)
    np.testing.assert_array_equal(np.stack(table.column("input_ids").to_numpy(zero_copy_only=False)),
                                  rows[batch:(steps + 1) * batch])
    assert table.column("sample_id").to_pylist() == list(range(batch, (steps + 1) * batch))
    assert set(table.column("domain").to_pylist()) == {"pile"}
    assert meta["domain_inference"]["inferred"] is False
    assert "corpus.pythia.tokenizer" in meta["domain_inference"]["reason"]


def test_pythia_domains_are_inferred_with_a_tokenizer(tmp_path):
    kinds = [("latex", "theorem.txt"), ("prose", "fiction.txt"), ("code", "list.c.txt")]
    texts = [(SNIPPETS / "fit" / k / name).read_text() for k, name in kinds]
    tok = word_tokenizer(texts)
    tok.save_pretrained(tmp_path / "tok")
    docs = [tok(t, add_special_tokens=False)["input_ids"][:40] for t in texts]
    # Row r is document r % 3 (40 tokens) after EOS; 4 steps of 3 rows, 2 rows held out.
    rows = np.array([[tok.eos_token_id] + docs[r % 3] for r in range(14)])
    write_megatron(tmp_path / "pile", rows)
    corpus = Corpus(source="pythia", seq_len=40, batch_size=3, steps=4, heldout_rows=2,
                    pythia={"path": str(tmp_path / "pile"), "tokenizer": str(tmp_path / "tok")})
    meta = build_corpus(corpus, tmp_path / "out")
    domains = Stream(tmp_path / "out" / "stream").read(0, 3).column("domain").to_pylist()
    assert domains == [kinds[r % 3][0] for r in range(12)]
    assert meta["domain_counts"] == {"code": 4, "latex": 4, "prose": 4}
    assert meta["domain_inference"]["inferred"] is True
    assert meta["domain_inference"]["version"] == VERSION
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["domain_inference"] == \
        meta["domain_inference"]


def test_hf_source_infers_domains_only_without_labels(tmp_path):
    kinds = [("markup", "page.txt"), ("prose", "news.txt")]
    texts = [(SNIPPETS / "fit" / k / name).read_text() for k, name in kinds]
    word_tokenizer(texts).save_pretrained(tmp_path / "tok")
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": k}) + "\n"
                            for (k, _), t in zip(kinds, texts)))
    hf = {"files": [str(path)], "tokenizer": str(tmp_path / "tok")}
    corpus = Corpus(source="hf", hf=hf, seq_len=31, batch_size=1, steps=2, heldout_rows=1)
    meta = build_corpus(corpus, tmp_path / "inferred")
    # page.txt is 44 words + EOS: row 0 is all page, row 1 holds 13 of its tokens and 19 of news.
    assert domains(tmp_path / "inferred") == ["markup", "prose"]
    assert meta["domain_inference"]["inferred"] is True
    labelled = build_corpus(corpus.model_copy(update={"hf": corpus.hf.model_copy(
        update={"domain_field": "label"})}), tmp_path / "labelled")
    assert domains(tmp_path / "labelled") == ["markup", "prose"]
    assert "domain_inference" not in labelled


def domains(corpus_dir):
    return Stream(corpus_dir / "stream").read(0, 1).column("domain").to_pylist()
