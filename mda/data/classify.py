"""A content classifier for sources without domain labels (the pre-shuffled Pile, unlabelled text).

Each decoded document gets one of `CLASSES`, the domains the synthetic corpus imitates: LaTeX,
XML/HTML markup, source code, tables/records, repeated junk strings, and prose (the default).
The rules are hand-set thresholds on a few regex and counting features, fitted on hand-written
snippets (`tests/data/classify/`), so they are fast (no model, one pass of a few regexes over
the text) and readable; `benchmarks/classifier.py` measures speed and agreement.

A training row of a packed source holds several documents, separated by the tokenizer's EOS
token. Like a labelled source's rows (`mda.data.hf.hf_rows`), a row's domain is the domain of
the document contributing most of its tokens: only that span is decoded and classified.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

CLASSES = ("latex", "markup", "code", "table", "junk", "prose")
VERSION = "1"
"""Bump when a rule changes: `meta.json` records which rules labelled a corpus."""

_LATEX_COMMAND = re.compile(r"\\[A-Za-z]{2,}")  # \frac, \begin; not \n or \t in code strings
_TAG = re.compile(r"</?[A-Za-z][\w:.-]*(?:\s[^<>]{0,400})?/?>|<!--|-->|<!DOCTYPE|<\?xml")
_CODE_SYMBOLS = "{}();=[]"
_CODE_PATTERN = re.compile(
    r"[;{][ \t]*$"                             # a line ending a statement or opening a block
    r"|^[ \t]*#[ \t]*(?:include|define|ifn?def|endif)\b"  # the C preprocessor
    r"|==|!=|->|=>|&&|\|\||::|\+=|\+\+",       # operators prose does not use
    re.MULTILINE)
_CALL = re.compile(r"\w\(")  # a call or definition: name( without a space (apart: it is slow
                             # in an alternation)
_CODE_WORDS = frozenset("def elif lambda self func fn impl const let var void struct typedef "
                        "namespace nullptr printf println esac fi async await import return".split())
_LONG_WORD = 24
"""Characters from which an unbroken string is looked at as a possible blob or run."""
_BLOB = re.compile(r"[A-Za-z0-9+/=_-]{24,}")  # hashes, base64, keys: no spaces, dots or colons
_RUN = re.compile(r"(.{1,4}?)\1{7,}")  # a unit of 1-4 characters, 8+ times in a row
_GAP = re.compile(r"  +|\t")  # between aligned columns, when text is on both sides
_DELIMITERS = {d: re.compile(re.escape(d)) for d in ("|", "\t", ",")}
_RECORD_LINE = re.compile(r"^[ \t]*[A-Za-z][\w .()/-]{0,30}:[ \t]+\S", re.MULTILINE)
_TABLE_RULE = re.compile(r"^[ \t]*[+|]?[-=:+| ]{6,}[ \t]*$", re.MULTILINE)  # +---+---+, |--|--:|


@dataclass(frozen=True)
class Features:
    """What the rules threshold: densities per 100 characters, or shares in [0, 1]."""

    chars: int
    latex: float       # LaTeX commands per 100 characters
    markup: float      # share of characters inside tags
    code: float        # code symbols and patterns per 100 characters, outside tags and junk
    table: float       # share of lines laid out as table rows, if the rows differ
    repeated: float    # share of word 4-grams seen before in the document
    junk_chars: float  # share of characters in blobs and runs within long unbroken strings


def features(text: str) -> Features:
    chars = max(len(text), 1)
    words = text.split()
    grams = list(zip(words, words[1:], words[2:], words[3:]))
    tags = [m.end() - m.start() for m in _TAG.finditer(text)]
    junk = [w for w in words if len(w) >= _LONG_WORD and (_BLOB.search(w) or _RUN.search(w))]
    # Code is counted where it can be: not in tag attributes (`=`, quotes), blobs or runs.
    rest = _TAG.sub(" ", text) if tags else text
    for w in set(junk):
        rest = rest.replace(w, " ")
    code = (sum(map(rest.count, _CODE_SYMBOLS)) + len(_CODE_PATTERN.findall(rest))
            + len(_CALL.findall(rest)) + sum(map(_CODE_WORDS.__contains__, words)))
    return Features(
        chars=len(text),
        latex=100 * len(_LATEX_COMMAND.findall(text)) / chars,
        markup=sum(tags) / chars,
        code=100 * code / chars,
        table=_table_share(text),
        repeated=1 - len(set(grams)) / len(grams) if grams else 0.0,
        junk_chars=min(sum(map(_junk_chars, junk)) / chars, 1.0),
    )


def _junk_chars(word: str) -> int:
    """Characters of an unbroken string that are junk: all of it if it holds a run, else its blobs."""
    if _RUN.search(word):
        return len(word)
    return sum(len(m) for m in _BLOB.findall(word))


def _table_share(text: str) -> float:
    """Share of non-empty lines laid out as table rows: the same number (>= 2) of one delimiter
    as most lines, aligned columns of 2+ spaces, `key: value` records, or table rules. Zero when
    most lines repeat one another (a table's rows differ; repeated lines are boilerplate)."""
    lines = text.split("\n")
    filled = np.array([bool(line) and not line.isspace() for line in lines])
    n = int(filled.sum())
    if n < 3 or len({line for line, f in zip(lines, filled) if f}) < n / 2:
        return 0.0
    starts = np.cumsum([0] + [len(line) + 1 for line in lines[:-1]])

    def per_line(at: list[int]) -> np.ndarray:  # how many of the positions `at` each line holds
        return np.bincount(np.searchsorted(starts, at, side="right") - 1, minlength=len(lines))

    def found(pattern: re.Pattern) -> list[int]:
        return [m.start() for m in pattern.finditer(text)]

    end = len(text) - 1
    gaps = [m.start() for m in _GAP.finditer(text) if 0 < m.start() and m.end() <= end
            and not text[m.start() - 1].isspace() and not text[m.end()].isspace()]
    rows = (per_line(gaps) >= 2) | (per_line(found(_RECORD_LINE)) > 0)
    best = int(np.sum(rows & filled))
    rules = per_line(found(_TABLE_RULE)) > 0
    for delimiter, pattern in _DELIMITERS.items():
        counts = per_line(found(pattern))
        mode = np.bincount(counts[filled]).argmax()
        if mode >= 2:
            is_row = (counts == mode) | (rules if delimiter == "|" else False)
            best = max(best, int(np.sum(is_row & filled)))
    return best / n


# The value at which a document clearly is of a class: between the highest value among the
# other classes' snippets and the lowest among the class's own (tests/data/classify/fit).
_CLEAR = {"latex": 1.0, "markup": 0.15, "code": 2.0, "table": 0.6}
_SOME_JUNK = 0.25


def classify_text(text: str) -> str:
    """The class of one document (see `CLASSES`).

    The most specific evidence decides first: LaTeX commands and tags are rare outside their
    formats; then a table's layout or code's symbols, whichever is clearer; then repetition,
    blobs and character runs (junk); what is left is prose.
    """
    f = features(text)
    clear = {k: getattr(f, k) / t for k, t in _CLEAR.items()}  # >= 1: clearly of the class
    for group in (("latex", "markup"), ("table", "code")):
        best = max(group, key=clear.get)
        if clear[best] >= 1:
            return best
    if f.repeated >= _SOME_JUNK or f.junk_chars >= _SOME_JUNK:
        return "junk"
    return "prose"


def classify_texts(texts: list[str]) -> list[str]:
    return [classify_text(t) for t in texts]


def longest_documents(rows: np.ndarray, eos_id: int | None) -> list[np.ndarray]:
    """Per row, the tokens of the document contributing most of them (EOS-separated; the
    earlier one on a tie), without its EOS."""
    if eos_id is None:
        return list(rows)
    out = []
    for row in rows:
        cuts = np.flatnonzero(row == eos_id)
        starts = np.concatenate([[0], cuts + 1])
        stops = np.concatenate([cuts, [len(row)]])
        i = int(np.argmax(stops - starts))
        out.append(row[starts[i]:stops[i]])
    return out


def infer_domains(rows: np.ndarray, tokenizer, chunk: int = 1024) -> list[str]:
    """The inferred domain of each row (n, row_len) of token ids, decoded with `tokenizer`
    `chunk` rows at a time (a million Pythia rows are 8 GB of text)."""
    out: list[str] = []
    for start in range(0, len(rows), chunk):
        docs = longest_documents(np.asarray(rows[start:start + chunk]), tokenizer.eos_token_id)
        texts = tokenizer.batch_decode([d.tolist() for d in docs], skip_special_tokens=True)
        out.extend(classify_texts(texts))
    return out


def description() -> dict:
    """What `meta.json` records about inferred domains."""
    return {"inferred": True, "classifier": "mda.data.classify", "version": VERSION,
            "classes": list(CLASSES),
            "unit": "the document contributing most tokens to the row (EOS-separated)"}
