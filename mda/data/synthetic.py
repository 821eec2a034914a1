"""A deterministic, domain-labelled synthetic "mini-Pile".

Each training row is one document from one domain, generated token by token from a
fixed word-level vocabulary (so the tokenizer is exact and every row decodes back to
readable text). The domains imitate the Pile's mix: prose, source code, XML/HTML,
LaTeX, tables/records and repetitive junk strings.

What matters for mechanistic data attribution is the *in-context repetition* the
domains carry, because that is what makes induction heads pay off:

- every document draws its own multi-token entities (names, identifiers, tag values,
  LaTeX symbols, junk strings) from large pools, so which token follows an entity's
  first token is unpredictable from global statistics and only learnable from context;
- entities recur at geometric (varied, often long) distances, never at a fixed period,
  so a fixed-offset copy does not solve them but a content-based lookup does;
- prose copies whole earlier phrases verbatim, tables repeat row values, markup
  repeats its record templates, junk repeats its string with noise in between.

The amount of repetition differs by domain (junk and tables most, prose least), which
is what the catalyst analysis later measures.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

EOS = "<|endoftext|>"
PAD = "<|padding|>"
NEWLINE = "\u21b5"  # "↵": a visible newline token, so decoded rows stay on one line

DOMAINS = ("prose", "code", "markup", "latex", "table", "junk")

_VOCAB_SEED = 20260126  # the vocabulary is part of the format, not of the corpus seed

_PUNCT = [".", ",", ";", ":", "(", ")", "{", "}", "[", "]", "<", ">", "/", "=", '"',
          "'", "+", "-", "*", "_", "^", "$", "&", "#", "|", "!", "?", "%", "@", NEWLINE]
_CODE_KEYWORDS = ["def", "return", "if", "else", "elif", "for", "in", "while", "class",
                  "import", "from", "self", "None", "True", "False", "not", "and", "or",
                  "print", "len", "range", "int", "str", "list", "dict", "yield", "with",
                  "as", "try", "except", "raise", "lambda", "pass", "break", "continue"]
_TAGS = ["div", "span", "p", "a", "li", "ul", "ol", "table", "tr", "td", "th", "item",
         "record", "entry", "name", "value", "title", "body", "head", "section", "field",
         "row", "node", "meta", "link", "img", "code", "pre", "em", "strong", "author",
         "date", "id", "key", "label", "note", "ref", "group", "list", "data"]
_ATTRS = ["class", "id", "href", "src", "type", "name", "value", "style", "lang", "rel",
          "key", "ref", "width", "height", "alt", "title", "role", "for", "data", "index"]
_LATEX_CMDS = ["\\frac", "\\sum", "\\int", "\\alpha", "\\beta", "\\gamma", "\\delta",
               "\\lambda", "\\mu", "\\sigma", "\\theta", "\\phi", "\\psi", "\\omega",
               "\\partial", "\\nabla", "\\infty", "\\mathbf", "\\mathcal", "\\mathbb",
               "\\left", "\\right", "\\cdot", "\\times", "\\leq", "\\geq", "\\neq",
               "\\sqrt", "\\log", "\\exp", "\\sin", "\\cos", "\\label", "\\ref", "\\cite",
               "\\begin", "\\end", "\\section", "\\item", "\\textbf", "\\emph", "\\hat",
               "\\tilde", "\\bar", "\\prod", "\\lim", "\\to", "\\in", "\\subset"]
_LATEX_ENVS = ["equation", "align", "itemize", "enumerate", "theorem", "proof", "lemma",
               "figure", "table", "array", "matrix", "cases"]
_LATEX_VARS = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"]
_DIGITS = [str(i) for i in range(100)]

_ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v",
           "w", "z", "br", "cl", "dr", "fl", "gr", "kr", "pl", "st", "tr", "sh", "th", "ch"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "s", "l", "x", "m", "th", "nd", "st"]


def _pseudo_words(rng: np.random.Generator, n: int, syllables: tuple[int, int],
                  taken: set[str], transform=lambda w: w) -> list[str]:
    words: list[str] = []
    while len(words) < n:
        k = int(rng.integers(syllables[0], syllables[1] + 1))
        w = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                    + _CODAS[rng.integers(len(_CODAS))] for _ in range(k))
        w = transform(w)
        if w not in taken:
            taken.add(w)
            words.append(w)
    return words


@dataclass(frozen=True)
class Vocabulary:
    """The fixed token inventory, grouped by role. Ids are positions in `tokens`."""

    tokens: tuple[str, ...]
    groups: dict[str, tuple[int, ...]]
    skip_bigram: tuple[int, ...]
    """For prose: the word that agrees with the token two positions back."""

    @property
    def size(self) -> int:
        return len(self.tokens)

    def ids(self, group: str) -> np.ndarray:
        return np.asarray(self.groups[group], dtype=np.int64)


def build_vocabulary(n_words: int = 900, n_names: int = 320, n_idents: int = 320,
                     n_junk: int = 200) -> Vocabulary:
    rng = np.random.default_rng(_VOCAB_SEED)
    taken: set[str] = set()
    groups: dict[str, list[str]] = {}
    groups["special"] = [EOS, PAD]
    fixed = {
        "punct": _PUNCT, "keyword": _CODE_KEYWORDS, "tag": _TAGS, "attr": _ATTRS,
        "latex_cmd": _LATEX_CMDS, "latex_env": _LATEX_ENVS, "latex_var": _LATEX_VARS,
        "digit": _DIGITS,
    }
    for name, toks in fixed.items():
        groups[name] = [t for t in toks if t not in taken]
        taken.update(groups[name])
    # Function words first: prose draws them far more often (Zipf).
    groups["word"] = _pseudo_words(rng, n_words, (1, 3), taken)
    groups["name"] = _pseudo_words(rng, n_names, (2, 3), taken, str.capitalize)
    groups["ident"] = _pseudo_words(rng, n_idents, (1, 2), taken, lambda w: w + "_")
    groups["junk"] = _pseudo_words(rng, n_junk, (1, 2), taken, str.upper)
    tokens = list(itertools.chain.from_iterable(groups.values()))
    assert len(tokens) == len(set(tokens))
    index = {t: i for i, t in enumerate(tokens)}
    words = [index[t] for t in groups["word"]]
    skip = rng.choice(words, size=len(tokens))
    return Vocabulary(tuple(tokens), {g: tuple(index[t] for t in ts) for g, ts in groups.items()},
                      tuple(int(i) for i in skip))


class _Doc:
    """Builds one document of token ids, with a document-level pool of recurring spans."""

    def __init__(self, vocab: Vocabulary, rng: np.random.Generator, length: int,
                 repeat_rate: float):
        self.v, self.rng, self.length, self.repeat_rate = vocab, rng, length, repeat_rate
        self.out: list[int] = []
        self.tok = {t: i for i, t in enumerate(vocab.tokens)}
        self.skip_bigram = vocab.skip_bigram
        self.agreement = 0.5
        self.any_groups = tuple(g for g in vocab.groups if g != "special")

    def done(self) -> bool:
        return len(self.out) >= self.length

    def emit(self, *tokens) -> None:
        for t in tokens:
            self.out.append(self.tok[t] if isinstance(t, str) else int(t))

    def pick(self, group: str, zipf: float = 0.0) -> int:
        ids = self.v.groups[group]
        if zipf:
            r = self.rng.zipf(zipf)
            return ids[(r - 1) % len(ids)]
        return ids[int(self.rng.integers(len(ids)))]

    def span(self, groups: tuple[str, ...], lo: int, hi: int) -> list[int]:
        """A fresh multi-token entity: uniformly drawn tokens, unpredictable beyond its first."""
        n = int(self.rng.integers(lo, hi + 1))
        return [self.pick(groups[int(self.rng.integers(len(groups)))]) for _ in range(n)]

    def entities(self, groups: tuple[str, ...], lo: int, hi: int, n_lo: int, n_hi: int):
        return [self.span(groups, lo, hi) for _ in range(int(self.rng.integers(n_lo, n_hi + 1)))]

    def maybe_copy_earlier(self, lo: int = 3, hi: int = 10) -> bool:
        """Copy a verbatim span from anywhere earlier in the document (long-range repeat)."""
        if len(self.out) < 2 * hi or self.rng.random() >= self.repeat_rate:
            return False
        n = int(self.rng.integers(lo, hi + 1))
        start = int(self.rng.integers(0, len(self.out) - n))
        self.out.extend(self.out[start:start + n])
        return True

    def tokens(self) -> list[int]:
        return self.out[: self.length]


def _prose(d: _Doc) -> None:
    people = d.entities(("name",), 2, 3, 2, 5)
    while not d.done():
        for _ in range(int(d.rng.integers(4, 14))):
            if d.maybe_copy_earlier():
                continue
            if d.rng.random() < 0.18:
                d.emit(*people[int(d.rng.integers(len(people)))])
            elif len(d.out) >= 2 and d.rng.random() < d.agreement:
                # Agreement: the word two back fixes this one, so attending to the
                # previous token pays off on its own (real text's local syntax).
                d.emit(d.skip_bigram[d.out[-2]])
            else:
                d.emit(d.pick("word", zipf=1.3))
            if d.rng.random() < 0.08:
                d.emit(",")
        d.emit(".")


def _code(d: _Doc) -> None:
    names = d.entities(("ident",), 2, 3, 3, 6)
    while not d.done():
        fn, args = names[int(d.rng.integers(len(names)))], d.rng.permutation(len(names))[:2]
        d.emit("def", *fn, "(", *names[args[0]], ",", *names[args[1]], ")", ":", NEWLINE)
        for _ in range(int(d.rng.integers(2, 5))):
            if d.maybe_copy_earlier(4, 12):
                d.emit(NEWLINE)
                continue
            a, b, c = (names[i] for i in d.rng.integers(len(names), size=3))
            kind = d.rng.random()
            if kind < 0.4:
                d.emit(*a, "=", *b, d.rng.choice(["+", "-", "*"]), *c, NEWLINE)
            elif kind < 0.7:
                d.emit("if", *a, ":", "return", *b, "(", *c, ")", NEWLINE)
            else:
                d.emit("for", *a, "in", "range", "(", *b, ")", ":", "print", "(", *c, ")", NEWLINE)
        d.emit("return", *fn, NEWLINE, NEWLINE)


def _markup(d: _Doc) -> None:
    values = d.entities(("name", "word"), 1, 3, 3, 6)
    outer, inner = d.pick("tag"), [d.pick("tag") for _ in range(int(d.rng.integers(2, 4)))]
    attr = d.pick("attr")
    while not d.done():
        d.emit("<", outer, attr, "=", '"', d.pick("digit"), '"', ">")
        for tag in inner:
            d.emit("<", tag, ">", *values[int(d.rng.integers(len(values)))], "<", "/", tag, ">")
        d.emit("<", "/", outer, ">", NEWLINE)
        d.maybe_copy_earlier(4, 12)


def _latex(d: _Doc) -> None:
    symbols = d.entities(("latex_cmd", "latex_var"), 2, 4, 3, 5)
    env = d.pick("latex_env")
    while not d.done():
        d.emit("\\begin", "{", env, "}")
        for _ in range(int(d.rng.integers(2, 6))):
            if d.maybe_copy_earlier(3, 8):
                continue
            s = symbols[int(d.rng.integers(len(symbols)))]
            if d.rng.random() < 0.5:
                d.emit(*s, "_", "{", d.pick("latex_var"), "}")
            else:
                t = symbols[int(d.rng.integers(len(symbols)))]
                d.emit("\\frac", "{", *s, "}", "{", *t, "}")
            d.emit(d.rng.choice(["=", "+", "\\leq", "\\cdot"]))
        d.emit("\\end", "{", env, "}", NEWLINE)
        d.emit(*(d.pick("word", zipf=1.3) for _ in range(int(d.rng.integers(2, 8)))))


def _table(d: _Doc) -> None:
    n_cols = int(d.rng.integers(3, 6))
    columns = [d.entities(("name", "word", "digit"), 1, 2, 2, 5) for _ in range(n_cols)]
    header = [d.pick("word") for _ in range(n_cols)]
    d.emit("|", *itertools.chain.from_iterable((h, "|") for h in header), NEWLINE)
    row = 0
    while not d.done():
        if not d.maybe_copy_earlier(4, 12):
            d.emit("|", str(row % 100), "|")
            for col in columns:
                d.emit(*col[int(d.rng.integers(len(col)))], "|")
        d.emit(NEWLINE)
        row += 1


def _junk(d: _Doc) -> None:
    # Hashes, base64 blobs, repeated boilerplate: spans over the whole vocabulary.
    strings = d.entities(d.any_groups, 4, 16, 1, 3)
    while not d.done():
        d.emit(*strings[int(d.rng.integers(len(strings)))])
        # Noise of varied length between repeats: a fixed period would teach offset copying.
        d.emit(*(d.pick("junk") for _ in range(int(d.rng.geometric(0.25)))))


_GENERATORS = {"prose": _prose, "code": _code, "markup": _markup, "latex": _latex,
               "table": _table, "junk": _junk}


def generate_document(vocab: Vocabulary, domain: str, rng: np.random.Generator,
                      length: int, repeat_rate: float) -> list[int]:
    doc = _Doc(vocab, rng, length, repeat_rate)
    _GENERATORS[domain](doc)
    return doc.tokens()


def generate_rows(vocab: Vocabulary, n_rows: int, row_len: int, mix: dict[str, float],
                  seed: int, repeat_rate: float) -> tuple[np.ndarray, list[str]]:
    """`n_rows` documents of exactly `row_len` tokens, and each row's domain."""
    rng = np.random.default_rng(seed)
    names = list(mix)
    p = np.asarray([mix[n] for n in names], dtype=np.float64)
    domains = [names[i] for i in rng.choice(len(names), size=n_rows, p=p / p.sum())]
    rows = np.empty((n_rows, row_len), dtype=np.int32)
    for i, dom in enumerate(domains):
        rows[i] = generate_document(vocab, dom, rng, row_len, repeat_rate)
    return rows, domains
