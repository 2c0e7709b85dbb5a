"""Checks of assignment ch02 (working with text data).

:func:`check_tokenizer` (the regex tokenizer with ``<|unk|>``),
:func:`check_sliding_window_dataset` (input/target windows every ``stride`` tokens),
:func:`check_embeddings` (token plus position embeddings).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..data import SlidingWindowDataset as _RefSlidingWindowDataset
from ..tokenizers import UNK, SimpleTokenizer, build_vocab, gpt2_tokenizer, split_text
from .core import CheckFailed, _call, _fmt_shape, _message, _seeded_ints, check_function

__all__ = ["check_tokenizer", "check_sliding_window_dataset", "check_embeddings"]


# --- the tokenizer --------------------------------------------------------------------


_DEFAULT_TOKENIZER_TEXTS = (
    "I HAD always thought Jack Gisburn rather a cheap genius--though a good fellow enough.",
    '"Oh, I never said that!" she laughed; (and then: silence.)',
    "Good morning, robots! Are the spreadsheets ready? <|endoftext|> The villa was quiet.",
)


def check_tokenizer(
    cls: Callable,
    *,
    vocab_text: str | None = None,
    texts: Sequence[str] | None = None,
) -> None:
    """Grade a chapter-2 regex tokenizer ``cls(vocab)`` with ``encode(text)`` and ``decode(ids)``.

    The vocabulary is built as in the chapter: the sorted distinct tokens of
    ``vocab_text`` (default: "The Verdict") followed by ``<|endoftext|>`` and ``<|unk|>``.
    Each text's ids must equal the reference's (unknown words become ``<|unk|>``), and
    decoding the reference ids must give the reference's text.
    """
    if vocab_text is None:
        from ..datasets import load_the_verdict
        vocab_text = load_the_verdict()
    vocab = build_vocab(split_text(vocab_text))
    reference = SimpleTokenizer(vocab)
    student = _call(cls, dict(vocab), what="your tokenizer's __init__", case="the chapter's vocabulary")
    texts = list(texts) if texts is not None else list(_DEFAULT_TOKENIZER_TEXTS)
    for text in texts:
        expected = reference.encode(text)
        got = _call(student.encode, text, what="encode", case=repr(text),
                    hint=f"words missing from the vocabulary must become the {UNK} token's id.")
        got_list = [int(i) for i in (got.tolist() if isinstance(got, torch.Tensor) else got)]
        if got_list != expected:
            pieces = split_text(text)
            at = next((i for i, (a, b) in enumerate(zip(got_list, expected)) if a != b), min(len(got_list), len(expected)))
            lines = [f"expected {len(expected)} ids: {expected[:12]}{' ...' if len(expected) > 12 else ''}",
                     f"got      {len(got_list)} ids: {got_list[:12]}{' ...' if len(got_list) > 12 else ''}"]
            if at < len(expected):
                lines.append(f"first difference at position {at}: expected {expected[at]} "
                             f"({reference.int_to_str[expected[at]]!r}), got "
                             f"{got_list[at] if at < len(got_list) else 'nothing'}")
            cause = None
            unk_id = vocab[UNK]
            if len(got_list) > len(expected) and any(not p.strip() for p in _raw_split(text)):
                cause = "whitespace or empty strings were kept as tokens: strip the pieces and drop empty ones."
            elif any(p not in vocab for p in pieces) and unk_id not in got_list:
                cause = f"unknown words were not replaced by {UNK} (id {unk_id})."
            raise CheckFailed(_message("encode: wrong token ids.", case=repr(text), lines=lines, cause=cause,
                                          hint="split with the chapter's regular expression, strip each piece, "
                                               "drop empty pieces, then look each one up in the vocabulary."))
        decoded = _call(student.decode, list(expected), what="decode", case=f"the ids of {text!r}")
        want = reference.decode(expected)
        if decoded != want:
            cause = None
            if decoded.replace(" ", "") == want.replace(" ", ""):
                cause = "the spacing differs: remove the space that joining with ' ' puts before punctuation."
            raise CheckFailed(_message(
                "decode: wrong text.", case=f"the ids of {text!r}",
                lines=[f"expected {want!r}", f"got      {decoded!r}"], cause=cause,
                hint="join the tokens with spaces, then remove the spaces before every punctuation mark that "
                     "SPLIT_PATTERN splits off: , . : ; ? _ ! \" ( ) ' (all of them, not only the common ones).",
            ))


def _raw_split(text: str) -> list[str]:
    from ..tokenizers import SPLIT_PATTERN
    return SPLIT_PATTERN.split(text)


# --- sliding windows ------------------------------------------------------------------


def check_sliding_window_dataset(
    cls: Callable,
    *,
    text: str | None = None,
    max_length: int = 4,
    stride: int = 4,
) -> None:
    """Grade a dataset ``cls(text, tokenizer, max_length, stride)`` of (input, target) windows.

    Uses GPT-2's tokenizer and the first 2,000 characters of "The Verdict" by default.
    Length and every item must equal the reference's; targets are the inputs shifted
    by one token.
    """
    if text is None:
        from ..datasets import load_the_verdict
        text = load_the_verdict()[:2000]
    tokenizer = gpt2_tokenizer()
    case = f"max_length={max_length}, stride={stride}, {len(text)} characters of text"
    reference = _RefSlidingWindowDataset(text, tokenizer, max_length, stride)
    student = _call(cls, text, tokenizer, max_length, stride, what="your dataset's __init__", case=case)
    n = _call(len, student, what="len(dataset)", case=case)
    ids = reference.token_ids
    if n != len(reference):
        cause = None
        if n == len(range(0, len(ids) - max_length + 1, stride)):
            cause = "the last window has no target for its last token: stop while start + max_length < number of tokens."
        elif n == len(range(0, len(ids) - max_length, 1)):
            cause = "windows start every token: step the start by `stride`."
        raise CheckFailed(_message(
            "len(dataset): wrong number of windows.", case=case,
            lines=[f"the text has {len(ids)} tokens; expected {len(reference)} windows, got {n}"], cause=cause,
            hint="windows start at 0, stride, 2*stride, ... as long as max_length inputs plus one more token "
                 "(the last target) fit.",
        ))
    for i in sorted({0, 1, len(reference) // 2, len(reference) - 1}):
        exp_in, exp_tg = reference[i]
        item = _call(student.__getitem__, i, what=f"dataset[{i}]", case=case)
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise CheckFailed(_message(f"dataset[{i}]: expected an (input_ids, target_ids) pair, got {type(item).__name__}.",
                                          case=case))
        got_in, got_tg = (torch.as_tensor(t) for t in item)
        for what, got, exp in (("input_ids", got_in, exp_in), ("target_ids", got_tg, exp_tg)):
            if got.dtype != torch.long:
                raise CheckFailed(_message(f"dataset[{i}] {what}: expected a tensor of dtype torch.long, got {got.dtype}.",
                                              case=case, hint="build it with torch.tensor(ids) (integer ids give torch.long)."))
            if tuple(got.shape) != tuple(exp.shape) or not torch.equal(got, exp):
                cause = None
                if what == "target_ids" and torch.equal(got, exp_in):
                    cause = "the targets are not shifted: they equal the inputs, but target j must be the token after input j (ids[start+1 : start+max_length+1])."
                elif what == "input_ids" and i > 0 and torch.equal(got, ids[i: i + max_length]):
                    cause = "window i starts at token i: it must start at i * stride."
                raise CheckFailed(_message(
                    f"dataset[{i}] {what}: wrong token ids.", case=case,
                    lines=[f"expected {exp.tolist()}", f"got      {got.tolist()}"], cause=cause,
                    hint="window i starts at token i * stride: max_length tokens as the input, and the same "
                         "number starting one token later as the target.",
                ))


# --- embeddings -----------------------------------------------------------------------


def _ref_embed(token_ids: torch.Tensor, tok_emb: nn.Embedding, pos_emb: nn.Embedding) -> torch.Tensor:
    positions = torch.arange(token_ids.shape[-1], device=token_ids.device)
    return tok_emb(token_ids) + pos_emb(positions)


def check_embeddings(
    fn: Callable,
    *,
    vocab_size: int = 50,
    context_length: int = 8,
    emb_dim: int = 6,
    batch_size: int = 2,
    num_tokens: int = 5,
    seed: int = 0,
) -> None:
    """Grade ``fn(token_ids, tok_emb, pos_emb)``: token embeddings plus position embeddings.

    token_ids: (B, T) with T <= context_length; the result is (B, T, emb_dim), the
    embedding of each token plus the embedding of its position 0..T-1.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tok_emb = nn.Embedding(vocab_size, emb_dim)
        pos_emb = nn.Embedding(context_length, emb_dim)
    ids = _seeded_ints(vocab_size, batch_size, num_tokens, seed=seed + 1)
    case = f"token_ids of shape {_fmt_shape(ids.shape)}, vocab_size={vocab_size}, context_length={context_length}, emb_dim={emb_dim}"

    def diagnoses(token_ids, tok, pos):
        return [
            (tok(token_ids), "the position embeddings were not added."),
            (pos(token_ids.clamp(max=context_length - 1)) + tok(token_ids), "positions were looked up by token id instead of 0..T-1."),
        ]

    with torch.no_grad():
        check_function(fn, _ref_embed, [(case, (ids, tok_emb, pos_emb))], name="your embedding function",
                       diagnoses=diagnoses,
                       hint="look up the token embeddings (B, T, emb) and the embeddings of the positions 0..T-1 "
                            "(T, emb), then add them (broadcasting over the batch).")
