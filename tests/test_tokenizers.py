"""The teaching tokenizer and GPT-2's BPE, compared against tiktoken's own encoding."""
from __future__ import annotations

import hashlib
import shutil

import pytest
import tiktoken
import torch

from course_utils.datasets import ASSETS_DIR, load_the_verdict
from course_utils.tokenizers import (
    ENDOFTEXT,
    UNK,
    SimpleTokenizer,
    build_vocab,
    gpt2_byte_alphabet,
    gpt2_tokenizer,
    load_gpt2_ranks,
    split_text,
)

# The URLs tiktoken's "gpt2" encoding reads; its cache file names are sha1(url).
TIKTOKEN_GPT2_URLS = {
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe": "gpt2/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json": "gpt2/encoder.json",
}

SAMPLES = [
    "Hello, world. Is this-- a test?",
    "I HAD always thought Jack Gisburn rather a cheap genius",
    "Akwirw ier",  # unknown words become sub-word pieces
    "naïve café, Zürich — 東京 🚀 emoji!",
    "tabs\tand   multiple    spaces\n\n\nnew lines   ",
    "numbers 1234567 and 3.14159, contractions: don't, we'll, they've, I'm",
    "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace.",
    "",
    " leading space and trailing ",
    "'s'S 'LL ''''",
]


@pytest.fixture(scope="module")
def tiktoken_reference(tmp_path_factory) -> tiktoken.Encoding:
    """tiktoken's own gpt2 encoding, fed from a cache dir we fill with the shipped files."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for url, name in TIKTOKEN_GPT2_URLS.items():
        shutil.copy(ASSETS_DIR / name, cache / hashlib.sha1(url.encode()).hexdigest())
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    try:
        import tiktoken.registry

        tiktoken.registry.ENCODINGS.pop("gpt2", None)  # force a fresh build from our cache
        yield tiktoken.get_encoding("gpt2")
    finally:
        tiktoken.registry.ENCODINGS.pop("gpt2", None)
        mp.undo()


def test_gpt2_tokenizer_shape():
    enc = gpt2_tokenizer()
    assert enc.n_vocab == 50257
    assert enc.eot_token == 50256
    assert enc.encode(ENDOFTEXT, allowed_special={ENDOFTEXT}) == [50256]


def test_gpt2_tokenizer_has_same_ranks_as_tiktoken(tiktoken_reference):
    ours = gpt2_tokenizer()
    assert ours._mergeable_ranks == tiktoken_reference._mergeable_ranks
    assert ours._special_tokens == tiktoken_reference._special_tokens
    assert ours._pat_str == tiktoken_reference._pat_str


@pytest.mark.parametrize("text", SAMPLES)
def test_gpt2_tokenizer_matches_tiktoken(tiktoken_reference, text):
    ours = gpt2_tokenizer()
    expected = tiktoken_reference.encode(text, allowed_special={ENDOFTEXT})
    assert ours.encode(text, allowed_special={ENDOFTEXT}) == expected
    assert ours.decode(expected) == text


def test_gpt2_tokenizer_matches_tiktoken_on_the_verdict(tiktoken_reference):
    text = load_the_verdict()
    ids = gpt2_tokenizer().encode(text)
    assert ids == tiktoken_reference.encode(text)
    assert len(ids) == 5145


def test_known_gpt2_ids():
    # Well-known ids: "Hello" = 15496, "," = 11, " world" = 995.
    assert gpt2_tokenizer().encode("Hello, world") == [15496, 11, 995]


def test_special_token_refused_unless_allowed():
    with pytest.raises(ValueError):
        gpt2_tokenizer().encode("a <|endoftext|> b")


def test_split_text_keeps_punctuation_and_drops_spaces():
    assert split_text("Hello, world. Is this-- a test?") == [
        "Hello", ",", "world", ".", "Is", "this", "--", "a", "test", "?",
    ]


def test_simple_tokenizer_round_trip_on_the_verdict():
    text = load_the_verdict()
    tok = SimpleTokenizer.from_text(text)
    assert tok.vocab_size == 1132  # 1,130 distinct tokens + 2 special tokens
    passage = "It was the last he painted, you know, Mrs. Gisburn said with pardonable pride."
    ids = tok.encode(passage)
    assert tok.decode(ids) == passage
    assert UNK not in [tok.int_to_str[i] for i in ids]


def test_simple_tokenizer_decode_is_stable_when_spacing_is_lossy():
    tok = SimpleTokenizer.from_text(load_the_verdict())
    quoted = '"It\'s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    ids = tok.encode(quoted)
    # Quotes and apostrophes lose their exact spacing, but no token is lost or changed.
    assert tok.encode(tok.decode(ids)) == ids


def test_simple_tokenizer_unknown_words_and_endoftext():
    tok = SimpleTokenizer(build_vocab(split_text("the cat sat on the mat.")))
    text = "the dog sat. <|endoftext|> the cat"
    ids = tok.encode(text)
    assert tok.int_to_str[ids[1]] == UNK  # "dog" is unknown
    assert ENDOFTEXT in [tok.int_to_str[i] for i in ids]
    assert tok.decode(ids) == "the <|unk|> sat. <|endoftext|> the cat"


def test_simple_tokenizer_without_unk_raises_clear_error():
    tok = SimpleTokenizer(build_vocab(["a", "b"], specials=()))
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.encode("a c")


def test_build_vocab_sorted_with_specials_last():
    vocab = build_vocab(["b", "a", "b"])
    assert list(vocab) == ["a", "b", ENDOFTEXT, UNK]
    assert list(vocab.values()) == [0, 1, 2, 3]


def test_gpt2_byte_alphabet_layout():
    alphabet = gpt2_byte_alphabet()
    assert len(alphabet) == 256 and sorted(alphabet.values()) == list(range(256))
    assert alphabet["!"] == 33 and alphabet["A"] == 65 and alphabet["\u00e9"] == 0xE9  # printable: themselves
    assert alphabet["\u0120"] == 32 and alphabet["\u010a"] == 10  # space and newline: shifted ("Ġ", "Ċ")
    assert alphabet["\u0100"] == 0 and " " not in alphabet
    assert list(alphabet.values())[:3] == [33, 34, 35], "printable bytes first, in byte order: the rank order"
    assert len([ch for ch in alphabet if ord(ch) >= 256]) == 68


def test_load_gpt2_ranks_refuses_inconsistent_files(tmp_path, monkeypatch):
    import course_utils.tokenizers as tokenizers

    merges = (ASSETS_DIR / "gpt2" / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    merges[1], merges[2] = merges[2], merges[1]  # two merges swapped: their ranks no longer match encoder.json
    (tmp_path / "vocab.bpe").write_text("\n".join(merges), encoding="utf-8")
    shutil.copy(ASSETS_DIR / "gpt2" / "encoder.json", tmp_path / "encoder.json")
    monkeypatch.setattr(tokenizers, "asset_path", lambda name: tmp_path / name.split("/")[-1])
    with pytest.raises(ValueError, match="disagree"):
        tokenizers.load_gpt2_ranks()


def test_load_gpt2_ranks_counts():
    ranks = load_gpt2_ranks()
    assert len(ranks) == 50256 and sorted(ranks.values()) == list(range(50256))
    assert ranks[b"!"] == 0 and ranks[b" the"] == 262


def test_build_vocab_custom_and_present_specials():
    assert build_vocab(["b", UNK, "a"]) == {UNK: 0, "a": 1, "b": 2, ENDOFTEXT: 3}  # UNK sorted in, not repeated
    assert build_vocab(["x"], specials=("<|pad|>",)) == {"x": 0, "<|pad|>": 1}
    assert build_vocab([], specials=()) == {}


def test_simple_tokenizer_decode_joins_and_fixes_punctuation_spacing():
    vocab = build_vocab(split_text('Hello, world. "Yes" (no) -- done!'))
    tok = SimpleTokenizer(vocab)
    assert tok.vocab_size == len(vocab)
    ids = tok.encode("Hello, world.")
    assert tok.decode(ids) == "Hello, world."
    assert tok.decode(torch.tensor(ids)) == "Hello, world.", "tensors of ids decode too"
    assert tok.decode([vocab["Hello"], vocab["--"], vocab["done"], vocab["!"]]) == "Hello -- done!"
    assert tok.str_to_int == vocab and tok.int_to_str == {i: w for w, i in vocab.items()}


def test_split_text_separators():
    assert split_text('a--b (c) "d"\t e\n\nf_g') == ["a", "--", "b", "(", "c", ")", '"', "d", '"', "e", "f", "_", "g"]
    assert split_text("   ") == []
