"""Low-rank adaptation, LoRA (appendix E).

Fine-tuning changes a weight matrix ``W`` (out x in) by some ``dW``. LoRA bets that a
useful ``dW`` has low rank and learns it as a product of two thin matrices,
``dW = (A @ B).T`` with ``A`` (in x r) and ``B`` (r x out), while ``W`` stays frozen.
For GPT-2 small and r = 16, adapting every ``nn.Linear`` trains 2,654,208 numbers in
the 12 transformer blocks plus those of the output head: 2,666,528 in all (2.67M) for
chapter 6's two-class classifier head, 3,470,608 (3.47M) with the language-model head
(768 x 50,257, tied or not), instead of the base model's 124M (163M with an untied
head). The adapters can be stored (and swapped) separately from the base model.

Choices made here:

* **Scaling ``alpha / rank``**, as in the LoRA paper (Hu et al., 2021) and most
  libraries: the update is ``(alpha / rank) * x @ A @ B``. Changing the rank then
  keeps the update's size roughly unchanged, so ``alpha`` need not be retuned.
  (The book multiplies by ``alpha`` alone; its ``rank=16, alpha=16`` corresponds
  to our ``rank=16, alpha=256``.)
* **Initialisation**: ``A`` as ``nn.Linear(in_dim, rank)`` initialises its weight
  (Kaiming-uniform, bound ``1/sqrt(in_dim)``), ``B`` zeros. The product is zero, so
  the adapted model starts out computing exactly what the base model computes.
* **Freezing**: :func:`replace_linear_with_lora` freezes everything except the new
  LoRA matrices by default (``freeze=True``); :func:`freeze_for_lora` does the same
  for a model built by hand.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class LoRALayer(nn.Module):
    """The low-rank update alone: ``x -> (alpha / rank) * x @ A @ B``."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank}.")
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.A = nn.Parameter(torch.empty(in_dim, rank))  # (in, r)
        self.B = nn.Parameter(torch.zeros(rank, out_dim))  # (r, out): zero, so the update starts at zero
        # A.T has nn.Linear(in_dim, rank).weight's shape (r, in): same fan-in, same init
        nn.init.kaiming_uniform_(self.A.T, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return self.scaling * (x @ self.A @ self.B)

    def extra_repr(self) -> str:
        return f"in_dim={self.A.shape[0]}, out_dim={self.B.shape[1]}, rank={self.rank}, alpha={self.alpha}"


class LinearWithLoRA(nn.Module):
    """A frozen-able ``nn.Linear`` plus a trainable low-rank update: ``linear(x) + lora(x)``."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha).to(
            device=linear.weight.device, dtype=linear.weight.dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.lora(x)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (out, in), so code that reads ``.weight`` keeps working."""
        return self.linear.weight

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features


def freeze_for_lora(model: nn.Module) -> nn.Module:
    """Make only the LoRA matrices trainable; returns the same model."""
    for param in model.parameters():
        param.requires_grad = False
    for module in model.modules():
        if isinstance(module, LoRALayer):
            for param in module.parameters():
                param.requires_grad = True
    return model


def _swap_linears(module: nn.Module, rank: int, alpha: float) -> None:
    for name, child in module.named_children():
        if isinstance(child, LinearWithLoRA):
            continue  # already adapted
        if isinstance(child, nn.Linear):
            setattr(module, name, LinearWithLoRA(child, rank, alpha))
        else:
            _swap_linears(child, rank, alpha)


def replace_linear_with_lora(model: nn.Module, rank: int, alpha: float, freeze: bool = True) -> nn.Module:
    """Wrap every ``nn.Linear`` in ``model`` (at any depth) in :class:`LinearWithLoRA`.

    Changes ``model`` in place and returns it. With ``freeze=True`` all original
    parameters are frozen and only the LoRA matrices train; with ``freeze=False``
    trainability is left as it was (new LoRA matrices are trainable). A tied output
    head keeps sharing its (frozen) weight with the embedding.
    """
    _swap_linears(model, rank, alpha)
    if freeze:
        freeze_for_lora(model)
    return model


def count_trainable(model: nn.Module) -> int:
    """Number of trainable parameters (a shared tensor counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
