"""Where tensors live: picking a device, seeding, and a one-line environment report."""
from __future__ import annotations

import os
import platform
import random

import torch

from .settings import smoke_mode

DEVICE_ENV_VAR = "COURSE_DEVICE"
# MPS had silent numerical bugs in older releases (e.g. wrong results from some
# reductions and masked ops); we only pick it automatically from this release on.
_MIN_RELIABLE_MPS = (2, 5)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def mps_is_reliable() -> bool:
    """True when Apple's MPS backend is present and recent enough to trust."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available() and _torch_version() >= _MIN_RELIABLE_MPS)


def best_device() -> torch.device:
    """The fastest trustworthy device: CUDA, then Apple MPS, then the CPU.

    Set ``COURSE_DEVICE=cpu`` (or ``cuda:1``, ``mps``) to override the choice.
    """
    forced = os.environ.get(DEVICE_ENV_VAR, "").strip()
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if mps_is_reliable():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int = 123) -> None:
    """Seed Python, torch (CPU and every GPU) and numpy if present, for repeatable runs."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is optional for the package
        pass


def environment_report(device: torch.device | None = None) -> str:
    """One line naming the versions, device and mode, for the top of every notebook."""
    device = device or best_device()
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        import tiktoken

        parts.append(f"tiktoken {tiktoken.__version__}")
    except ImportError:
        pass
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)})"
    elif device.type == "cpu":
        where = f"cpu ({torch.get_num_threads()} threads)"
    else:
        where = device.type
    parts.append(f"device {where}")
    parts.append("quick mode ON" if smoke_mode() else "quick mode off")
    return " | ".join(parts)
