"""What the checks build to run a student's code on: small models and data loaders.

* :func:`grading_config`: the small GPT configuration of the model checks (dropout on,
  untied head); keyword arguments override fields.
* ``_tiny_gpt(cfg, seed)``: a reference ``GPTModel`` with seeded weights.
* ``_token_pairs`` and :func:`token_loader`: random (input, target) token sequences,
  the targets shifted by one, in a fixed-order ``DataLoader`` whose last batch may be
  short.
* ``_masked_copy``: a loader's batches with about a third of the targets -100;
  ``_AdamWKeepingGrads`` (AdamW without ``zero_grad``) and ``_no_random_state_kept``, for
  the training loop's diagnoses.
* ``DEVICE``: the checks run where the grader runs, on the CPU.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..data import IGNORE_INDEX
from ..gpt import GPTConfig
from ..gpt import GPTModel as _RefGPTModel
from .core import _seeded, _seeded_ints

__all__ = ["grading_config", "token_loader", "DEVICE"]


def grading_config(**overrides: Any) -> GPTConfig:
    """The small GPT configuration the chapter-4 checks build (dropout on, untied head)."""
    fields = dict(vocab_size=97, context_length=12, emb_dim=16, n_heads=4, n_layers=2, drop_rate=0.1,
                  qkv_bias=False, tie_weights=False)
    return GPTConfig(**{**fields, **overrides})


DEVICE = "cpu"  # the checks run where the grader runs


def _tiny_gpt(cfg: GPTConfig, seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A reference GPT with seeded, deliberately large weights (the global random state is untouched).

    GPT-2's initialisation (std 0.02) makes a fresh model's predictions nearly uniform,
    so many mistakes (a mean over the wrong axis, per-sequence averaging, a missing
    mask) would change a result by less than the tolerance. PyTorch's layer defaults
    (``reset_parameters``: N(0, 1) embeddings, uniform Linear weights) give every
    position clearly different logits, which is what a check needs to tell answers apart.
    """
    with _seeded(seed):
        model = _RefGPTModel(cfg)
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.reset_parameters()
    return model.to(dtype)


def _token_pairs(vocab_size: int, num_sequences: int, num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of shape (N, T): random token sequences, the targets shifted by one."""
    ids = _seeded_ints(vocab_size, num_sequences, num_tokens + 1, seed=seed)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def token_loader(vocab_size: int, num_sequences: int, num_tokens: int, batch_size: int, seed: int = 0) -> DataLoader:
    """A fixed-order DataLoader of random (input, target) token sequences, the last batch possibly short."""
    inputs, targets = _token_pairs(vocab_size, num_sequences, num_tokens, seed)
    # a private generator: even an unshuffled loader draws a seed for each pass over it
    return DataLoader(TensorDataset(inputs, targets), batch_size=batch_size, shuffle=False, drop_last=False,
                      generator=torch.Generator().manual_seed(seed))


def _masked_copy(loader: DataLoader, seed: int) -> DataLoader:
    """The same batches with about a third of the targets set to -100 (each sequence keeps one)."""
    inputs, targets = loader.dataset.tensors
    g = torch.Generator().manual_seed(seed)
    drop = torch.rand(targets.shape, generator=g) < 0.35
    drop[:, 0] = False
    return DataLoader(TensorDataset(inputs, targets.masked_fill(drop, IGNORE_INDEX)), batch_size=loader.batch_size,
                      shuffle=False, drop_last=False, generator=torch.Generator().manual_seed(seed))


@contextmanager
def _no_random_state_kept(*args: Any, **kwargs: Any) -> Iterator[None]:
    yield


class _AdamWKeepingGrads(torch.optim.AdamW):
    """AdamW whose zero_grad does nothing: the loop a student gets without zero_grad."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None
