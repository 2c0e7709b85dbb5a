"""Turning text into token ids and back.

Two tokenizers, in the order the course meets them:

* :class:`SimpleTokenizer`, the chapter-2 teaching tokenizer: split on a regular
  expression, look words up in a vocabulary built from a text, map anything unseen
  to ``<|unk|>``.
* :func:`gpt2_tokenizer`, GPT-2's byte-pair encoding as a ``tiktoken.Encoding``, built
  offline from the ``encoder.json``/``vocab.bpe`` files shipped in this package (the
  same bytes tiktoken itself downloads), so it works with no network.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import lru_cache

import tiktoken

from .datasets import asset_path

ENDOFTEXT = "<|endoftext|>"
UNK = "<|unk|>"
GPT2_EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257

# Split on punctuation, double dashes and whitespace, keeping the separators.
SPLIT_PATTERN = re.compile(r'([,.:;?_!"()\']|--|\s)')
# Undo the spaces that joining tokens with " " puts before punctuation.
_SPACE_BEFORE_PUNCT = re.compile(r'\s+([,.:;?_!"()\'])')


def split_text(text: str) -> list[str]:
    """Split text into words and punctuation marks, dropping whitespace."""
    return [piece for piece in (p.strip() for p in SPLIT_PATTERN.split(text)) if piece]


def build_vocab(tokens: Iterable[str], specials: Iterable[str] = (ENDOFTEXT, UNK)) -> dict[str, int]:
    """Vocabulary of the distinct tokens in sorted order, followed by the special tokens."""
    words = sorted(set(tokens))
    words.extend(s for s in specials if s not in words)
    return {word: idx for idx, word in enumerate(words)}


class SimpleTokenizer:
    """Word-level tokenizer with a fixed vocabulary.

    Words missing from the vocabulary become ``<|unk|>`` (when the vocabulary has it);
    ``<|endoftext|>`` is kept whole so documents can be joined with it.
    """

    def __init__(self, vocab: dict[str, int]):
        self.str_to_int = dict(vocab)
        self.int_to_str = {idx: word for word, idx in vocab.items()}

    @classmethod
    def from_text(cls, text: str) -> "SimpleTokenizer":
        """Build the vocabulary from ``text`` (plus the two special tokens)."""
        return cls(build_vocab(split_text(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.str_to_int)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; raises ``KeyError`` for unknown words if there is no ``<|unk|>``."""
        ids = []
        for piece in split_text(text):
            if piece in self.str_to_int:
                ids.append(self.str_to_int[piece])
            elif UNK in self.str_to_int:
                ids.append(self.str_to_int[UNK])
            else:
                raise KeyError(
                    f"{piece!r} is not in the vocabulary and the vocabulary has no {UNK} token; "
                    f"build it with build_vocab(..., specials=({ENDOFTEXT!r}, {UNK!r}))."
                )
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text for ``ids``: tokens joined by spaces, with no space before punctuation."""
        text = " ".join(self.int_to_str[int(i)] for i in ids)
        return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


# --- GPT-2 byte-pair encoding ------------------------------------------------------

# GPT-2's pre-tokenizer: contractions, letters, digits, other symbols, whitespace.
# Written with possessive quantifiers (++), which split text the same way as GPT-2's
# original pattern but never backtrack; it is the form tiktoken itself uses.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's map from the printable character standing for a byte to that byte.

    GPT-2 stores byte strings as text: printable Latin-1 bytes stand for themselves,
    and the remaining 68 bytes (controls, space, ...) are shifted to U+0100 and up.
    The order of this table is also the rank order of the 256 single-byte tokens.
    """
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    alphabet = {chr(b): b for b in printable}
    shifted = [b for b in range(256) if b not in alphabet.values()]
    alphabet.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return alphabet


def load_gpt2_ranks() -> dict[bytes, int]:
    """Byte sequence -> rank for GPT-2's 50,256 mergeable tokens.

    Ranks come from the merge list (``vocab.bpe``: merge i creates token 256 + i) and
    are checked against the ids in ``encoder.json``; a disagreement raises.
    """
    alphabet = gpt2_byte_alphabet()

    def to_bytes(symbol: str) -> bytes:
        return bytes(alphabet[ch] for ch in symbol)

    ranks = {bytes([b]): rank for rank, b in enumerate(alphabet.values())}
    merges = asset_path("gpt2/vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    for line in merges:
        if line:
            first, second = line.split()
            ranks[to_bytes(first) + to_bytes(second)] = len(ranks)

    encoder = json.loads(asset_path("gpt2/encoder.json").read_text(encoding="utf-8"))
    from_encoder = {to_bytes(tok): idx for tok, idx in encoder.items() if tok != ENDOFTEXT}
    if from_encoder != ranks:
        raise ValueError("encoder.json and vocab.bpe disagree; the shipped GPT-2 files are inconsistent.")
    return ranks


@lru_cache(maxsize=1)
def gpt2_tokenizer() -> tiktoken.Encoding:
    """GPT-2's tokenizer (50,257 tokens, ``<|endoftext|>`` = 50256), built offline.

    Equal token for token to ``tiktoken.get_encoding("gpt2")``, which would download
    these same files. Remember ``allowed_special={"<|endoftext|>"}`` when encoding
    text that contains the end-of-text marker.
    """
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=load_gpt2_ranks(),
        special_tokens={ENDOFTEXT: GPT2_EOT_ID},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )
