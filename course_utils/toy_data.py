"""Small synthetic datasets for appendix A (PyTorch basics and the DDP demo)."""
from __future__ import annotations

import math

import torch


def make_moons(n: int, noise: float = 0.15, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaving half circles: points (n, 2) and labels (n,) 0/1.

    Drawn from a private generator seeded with ``seed``, so the data never depends on
    (or disturbs) the global random state. Not linearly separable: a good first task
    for a small MLP.
    """
    generator = torch.Generator().manual_seed(seed)
    n0 = n // 2
    n1 = n - n0
    angle0 = torch.rand(n0, generator=generator) * math.pi
    angle1 = torch.rand(n1, generator=generator) * math.pi
    upper = torch.stack([torch.cos(angle0), torch.sin(angle0)], dim=1)  # (n0, 2)
    lower = torch.stack([1 - torch.cos(angle1), 0.5 - torch.sin(angle1)], dim=1)  # (n1, 2)
    points = torch.cat([upper, lower]) + noise * torch.randn(n, 2, generator=generator)
    labels = torch.cat([torch.zeros(n0, dtype=torch.long), torch.ones(n1, dtype=torch.long)])
    return points, labels
