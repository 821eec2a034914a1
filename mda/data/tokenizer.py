"""The synthetic corpus's tokenizer: an exact word-level vocabulary, saved as a 🤗 tokenizer."""

from __future__ import annotations

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mda.data.synthetic import EOS, PAD, Vocabulary


def word_level_tokenizer(vocab: Vocabulary) -> PreTrainedTokenizerFast:
    """Whitespace-separated tokens map one-to-one onto the vocabulary (no merges, no unknowns
    in generated text), so `decode(encode(text)) == text` for every generated row."""
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab.tokens)}, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="\u0000", cleanup=False)  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   unk_token=PAD)


def save_tokenizer(tokenizer, directory: str | os.PathLike) -> None:
    tokenizer.save_pretrained(str(directory))
