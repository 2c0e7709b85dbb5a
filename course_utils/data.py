"""Next-token training data: sliding windows over a tokenized text (chapter 2).

A language model learns to predict token t+1 from tokens up to t. Cutting one long
token stream into fixed-length windows gives (input, target) pairs where the target
is the input shifted one position to the left.
"""
from __future__ import annotations

import operator
from collections.abc import Callable

import tiktoken
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

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


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    drop_last: bool = False,
    *,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    shard: bool | None = None,
) -> DataLoader:
    """The one place the course builds a DataLoader; every loader helper calls it.

    ``shuffle`` draws a new order every epoch from ``generator``, or from a generator
    seeded with ``seed``, or (neither given) from torch's global random state.
    ``drop_last`` drops a final batch shorter than ``batch_size``.

    Sharding: with ``shard=None`` (the default) the loader is sharded exactly when a
    ``torch.distributed`` process group is initialised (under ``torchrun``), so the
    same code trains on a different part of the data in each process. ``shard=True``
    always uses a :class:`~torch.utils.data.DistributedSampler` (with one replica
    outside a process group, which gives the same global order in one process as in
    several); ``shard=False`` never does. A sharded loader gives rank ``r`` of ``N``
    the positions ``r, r + N, ...`` of one order shared by all ranks: the plain order,
    or (``shuffle``) a permutation seeded with ``seed`` (else ``generator``'s initial
    seed, else 0) plus the epoch set by
    :func:`course_utils.distributed.set_epoch`. ``drop_last`` then also makes every
    rank's share equally long by dropping the remainder (without it the sampler
    repeats a few samples to even the shares out).
    """
    try:
        size = None if isinstance(batch_size, bool) else operator.index(batch_size)
    except TypeError:
        size = None
    if size is None or size < 1:
        raise ValueError(f"batch_size must be a positive integer (got {batch_size!r}).")
    if seed is not None and generator is not None:
        raise ValueError("Pass seed or generator, not both.")
    if shard is None:
        shard = dist.is_available() and dist.is_initialized()
    common = dict(batch_size=size, drop_last=drop_last, num_workers=num_workers, collate_fn=collate_fn)
    if shard:
        grouped = dist.is_available() and dist.is_initialized()
        if seed is None:
            seed = generator.initial_seed() if generator is not None else 0
        sampler = DistributedSampler(
            dataset,
            num_replicas=dist.get_world_size() if grouped else 1,
            rank=dist.get_rank() if grouped else 0,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        return DataLoader(dataset, sampler=sampler, **common)
    if generator is None and seed is not None:  # also seeds worker processes' base seed
        generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, shuffle=shuffle, generator=generator, **common)


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
    final batch, which would otherwise give a noisy loss spike. ``generator`` fixes
    the shuffled order. Under ``torchrun`` each process gets its own share of the
    windows (see :func:`build_loader`).
    """
    dataset = SlidingWindowDataset(text, tokenizer or gpt2_tokenizer(), max_length, stride)
    return build_loader(dataset, batch_size, shuffle, drop_last, num_workers=num_workers, generator=generator)


def train_val_split_text(text: str, train_ratio: float = 0.9) -> tuple[str, str]:
    """Split a text into a leading training part and a trailing validation part."""
    cut = int(train_ratio * len(text))
    return text[:cut], text[cut:]
