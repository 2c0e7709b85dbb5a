"""Next-token training data: sliding windows over a tokenized text (chapter 2).

A language model learns to predict token t+1 from tokens up to t. Cutting one long
token stream into fixed-length windows gives (input, target) pairs where the target
is the input shifted one position to the left.
"""
from __future__ import annotations

import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset

from .tokenizers import gpt2_tokenizer

# A target equal to this id is skipped by F.cross_entropy (its default ignore_index):
# the course marks padding and prompt tokens with it so they add nothing to the loss.
IGNORE_INDEX = -100


class SlidingWindowDataset(Dataset):
    """Windows of ``max_length`` tokens, starting every ``stride`` tokens.

    Item i is ``(input_ids, target_ids)``, both (max_length,), with
    ``target_ids[j] == input_ids[j + 1]``: the target is the next token.
    """

    def __init__(self, text: str, tokenizer: tiktoken.Encoding, max_length: int, stride: int):
        if max_length < 1 or stride < 1:
            raise ValueError(f"max_length and stride must be positive (got {max_length}, {stride}).")
        ids = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
        if len(ids) <= max_length:
            raise ValueError(
                f"The text has {len(ids)} tokens, too few for one window of {max_length} inputs "
                f"plus a target; use a longer text or a smaller max_length."
            )
        self.token_ids = torch.tensor(ids, dtype=torch.long)
        self.max_length = max_length
        # window starts: every stride tokens while a full window + 1 target token fits
        self.starts = range(0, len(ids) - max_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts[i]
        chunk = self.token_ids[start : start + self.max_length + 1]
        return chunk[:-1], chunk[1:]  # inputs, targets shifted by one


def create_dataloader(
    text: str,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    tokenizer: tiktoken.Encoding | None = None,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """A DataLoader of (inputs, targets) batches, each (batch_size, max_length).

    ``stride == max_length`` gives non-overlapping windows (no token is a target
    twice per epoch); a smaller stride overlaps them. ``drop_last`` drops a short
    final batch, which would otherwise give a noisy loss spike.
    """
    dataset = SlidingWindowDataset(text, tokenizer or gpt2_tokenizer(), max_length, stride)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=generator,
    )


def train_val_split_text(text: str, train_ratio: float = 0.9) -> tuple[str, str]:
    """Split a text into a leading training part and a trailing validation part."""
    cut = int(train_ratio * len(text))
    return text[:cut], text[cut:]
