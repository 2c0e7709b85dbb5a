"""Shared test set-up: everything offline, deterministic, and on the CPU."""
from __future__ import annotations

import os

# Never let transformers / huggingface_hub reach for the network (each miss retries ~26 s).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
