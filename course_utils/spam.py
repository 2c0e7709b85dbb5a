"""SMS spam classification data (chapter 6): balance, split, tokenize, pad.

The raw collection has 4,827 ham and 747 spam messages. We undersample ham to 747 so
that a classifier cannot score 87% by always answering "ham", then split 70/10/20
into train/validation/test with a fixed seed.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset

from .data import build_loader
from .datasets import load_sms_spam
from .tokenizers import GPT2_EOT_ID, gpt2_tokenizer

LABELS = {"ham": 0, "spam": 1}
Example = tuple[str, str]  # (label, text)


def balance_classes(rows: Sequence[Example], seed: int = 123) -> list[Example]:
    """Undersample every label to the count of the rarest one (seeded, order shuffled)."""
    by_label: dict[str, list[Example]] = {}
    for row in rows:
        by_label.setdefault(row[0], []).append(row)
    smallest = min(len(group) for group in by_label.values())
    rng = random.Random(seed)
    balanced = [row for label in sorted(by_label) for row in rng.sample(by_label[label], smallest)]
    rng.shuffle(balanced)
    return balanced


def split_examples(
    rows: Sequence, train_frac: float = 0.7, val_frac: float = 0.1, seed: int = 123
) -> tuple[list, list, list]:
    """Shuffle (seeded) and split into train, validation and test.

    The train and validation sizes are ``len(rows) * fraction`` rounded down; test
    gets the remainder (20% with the defaults).
    """
    if not (0 < train_frac and 0 <= val_frac and train_frac + val_frac <= 1):
        raise ValueError(f"Need 0 < train_frac, 0 <= val_frac, sum <= 1 (got {train_frac}, {val_frac}).")
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    n_train = int(len(shuffled) * train_frac)
    n_val = int(len(shuffled) * val_frac)
    return shuffled[:n_train], shuffled[n_train : n_train + n_val], shuffled[n_train + n_val :]


def load_spam_splits(seed: int = 123) -> tuple[list[Example], list[Example], list[Example]]:
    """Balanced SMS spam data split 70/10/20: 1,045 / 149 / 300 messages."""
    return split_examples(balance_classes(load_sms_spam(), seed), 0.7, 0.1, seed)


class SpamDataset(Dataset):
    """Token ids of each message, padded (or cut) to one length, with a 0/1 label.

    ``max_length=None`` pads to the longest message in this dataset; pass the training
    set's ``max_length`` to the validation and test sets so all three agree.
    """

    def __init__(
        self,
        rows: Sequence[Example],
        tokenizer: tiktoken.Encoding | None = None,
        max_length: int | None = None,
        pad_token_id: int = GPT2_EOT_ID,
    ):
        tokenizer = tokenizer or gpt2_tokenizer()
        unknown = {label for label, _ in rows} - set(LABELS)
        if unknown:
            raise ValueError(f"Unknown labels {sorted(unknown)}; expected {sorted(LABELS)}.")
        encoded = [tokenizer.encode(text) for _, text in rows]
        self.max_length = max_length if max_length is not None else max(len(ids) for ids in encoded)
        self.pad_token_id = pad_token_id
        self.input_ids = torch.tensor(
            [ids[: self.max_length] + [pad_token_id] * (self.max_length - len(ids[: self.max_length])) for ids in encoded],
            dtype=torch.long,
        )  # (N, max_length)
        self.labels = torch.tensor([LABELS[label] for label, _ in rows], dtype=torch.long)  # (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[i], self.labels[i]


def create_spam_dataloaders(
    batch_size: int = 8, seed: int = 123, num_workers: int = 0, tokenizer: tiktoken.Encoding | None = None
) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train (shuffled with ``seed``, drop_last), validation and test loaders over the balanced split.

    All three are padded to the training set's longest message. Under ``torchrun``
    each process gets its own share of every split (see :func:`course_utils.data.build_loader`).
    """
    train_rows, val_rows, test_rows = load_spam_splits(seed)
    train_set = SpamDataset(train_rows, tokenizer)
    val_set = SpamDataset(val_rows, tokenizer, max_length=train_set.max_length)
    test_set = SpamDataset(test_rows, tokenizer, max_length=train_set.max_length)
    return (
        build_loader(train_set, batch_size, shuffle=True, drop_last=True, num_workers=num_workers, seed=seed),
        build_loader(val_set, batch_size, num_workers=num_workers),
        build_loader(test_set, batch_size, num_workers=num_workers),
    )
