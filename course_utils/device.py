"""Where and how tensors run: picking a device, seeding, eval mode, and a one-line environment report."""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import random
import sys
from collections.abc import Iterator

import torch
from torch import nn

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


_allocator_tuned = False


def tune_cpu_allocator() -> bool:
    """Let glibc keep freed memory for reuse instead of handing it back to the OS.

    A training step on the CPU allocates and frees gigabytes of activations and
    gradients. By default glibc serves every large block with a fresh ``mmap`` and
    returns it on free, so the next step pays a page fault (and the kernel zeroes the
    page) for every 4 KiB again: about 440,000 faults per GPT-2-small step at a batch
    of 2 x 256 tokens (more for larger batches). Serving all blocks from the heap and
    never trimming it lets later steps reuse the same memory: after a few steps most
    steps fault no page at all (an occasional block is still placed afresh). The
    costs: the process keeps its peak memory until it exits, and heap fragmentation
    adds some 5-10% to that peak (9% for that GPT-2 step). ``python
    benchmarks/bench_allocator.py`` measures both on your machine. This is the same
    effect people get by preloading jemalloc or tcmalloc. Returns True if the setting
    was applied (Linux with glibc), False elsewhere; calling it again does nothing.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameter numbers from <malloc.h>
    applied = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    _allocator_tuned = applied
    return applied


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with ``model`` in eval mode (dropout off), then restore its mode.

    Every module's own ``training`` flag is put back as it was, so a model that was
    partly frozen in eval mode (e.g. a frozen backbone) comes back unchanged, even
    when the block raises.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, was_training in modes:
            module.training = was_training
