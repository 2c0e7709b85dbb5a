"""Assignment ch02's checks against the reference, correct variants, and deliberate mistakes.

As for every assignment: each check (1) passes the ``course_utils`` reference, (2)
passes implementations that are correct but written differently, and (3) fails each
deliberately broken implementation with a message that names the problem (the table
gives its key words). The broken implementations are written here, by hand, not taken
from the diagnoses inside the checks.
"""
from __future__ import annotations

import re

import torch

from course_utils.data import SlidingWindowDataset
from course_utils.grading import ch02
from course_utils.tokenizers import UNK, SimpleTokenizer

from .helpers import Cases, registry_tests, right, stub, wrong


class RegexTokenizer:
    """Correct: a different split (findall) and decode written as a loop."""

    def __init__(self, vocab):
        self.vocab, self.inverse = vocab, {i: s for s, i in vocab.items()}

    def encode(self, text):
        pieces = [p for p in (q.strip() for q in re.split(r'([,.:;?_!"()\']|--|\s)', text)) if p]
        return [self.vocab.get(p, self.vocab[UNK]) for p in pieces]

    def decode(self, ids):
        out = ""
        for token in (self.inverse[i] for i in ids):
            out += token if (out == "" or re.fullmatch(r'[,.:;?_!"()\']', token)) else " " + token
        return out


class NoUnkTokenizer(RegexTokenizer):
    def encode(self, text):
        return [self.vocab[p] for p in (q.strip() for q in re.split(r'([,.:;?_!"()\']|--|\s)', text)) if p]


class NoStripTokenizer(RegexTokenizer):
    def encode(self, text):
        return [self.vocab.get(p, self.vocab[UNK]) for p in re.split(r'([,.:;?_!"()\']|--|\s)', text) if p]


class PlainJoinTokenizer(RegexTokenizer):
    def decode(self, ids):
        return " ".join(self.inverse[i] for i in ids)


def make_dataset(mistake=None):
    class Windows(torch.utils.data.Dataset):
        def __init__(self, text, tokenizer, max_length, stride):
            ids = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
            step = 1 if mistake == "stride" else stride
            stop = len(ids) - max_length + (1 if mistake == "count" else 0)
            self.pairs = []
            for s in range(0, stop, step):
                shift = 0 if mistake == "shift" else 1
                self.pairs.append((ids[s:s + max_length], ids[s + shift:s + shift + max_length]))

        def __len__(self):
            return len(self.pairs)

        def __getitem__(self, i):
            x, y = (torch.tensor(p) for p in self.pairs[i])
            if mistake == "float":
                return x.float(), y.float()
            return x, y

    return Windows


WINDOW_SIZES = {"default": {}, "6_by_2": {"max_length": 6, "stride": 2}, "3_by_5": {"max_length": 3, "stride": 5}}

CASES = {
    "check_tokenizer": Cases(
        right=[right("reference", SimpleTokenizer), right("regex_loop", RegexTokenizer),
               right("other_vocabulary", RegexTokenizer, vocab_text="The cat sat. The dog ran!", texts=["the cat sat", "A bird? Yes."])],
        wrong=[wrong("no_unk", NoUnkTokenizer, "encode raised KeyError", UNK),
               wrong("no_strip", NoStripTokenizer, "wrong token ids", "whitespace"),
               wrong("plain_join", PlainJoinTokenizer, "decode", "spacing differs"),
               wrong("stub", stub, "not implemented yet")],
    ),
    "check_sliding_window_dataset": Cases(
        right=[right(f"{name}-{label}", cls, **kw) for name, cls in (("reference", SlidingWindowDataset), ("by_hand", make_dataset()))
               for label, kw in WINDOW_SIZES.items()],
        wrong=[wrong("shift", make_dataset("shift"), "target_ids", "not shifted", "equal the inputs"),
               wrong("stride", make_dataset("stride"), "wrong number of windows", "stride"),
               wrong("count", make_dataset("count"), "wrong number of windows", "no target", max_length=4, stride=1),
               wrong("float_ids", make_dataset("float"), "dtype torch.long")],
    ),
    "check_embeddings": Cases(
        right=[right("modules", lambda ids, tok, pos: tok(ids) + pos(torch.arange(ids.shape[1]))),
               right("weight_rows", lambda ids, tok, pos: tok.weight[ids] + pos.weight[: ids.shape[-1]], batch_size=3, num_tokens=8)],
        wrong=[wrong("no_positions", lambda ids, tok, pos: tok(ids), "position embeddings were not added"),
               wrong("positions_by_id", lambda ids, tok, pos: tok(ids) + pos(ids.clamp(max=7)), "by token id"),
               wrong("all_positions", lambda ids, tok, pos: tok(ids) + pos(torch.arange(8)), "raised")],
    ),
}

test_correct_passes, test_mistake_fails, test_early_return_is_caught = registry_tests(ch02, CASES)
