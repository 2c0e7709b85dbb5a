"""Training on several processes with PyTorch's DistributedDataParallel (appendix A).

The idea: start one process per device (``torchrun --nproc_per_node=N script.py``),
give every process a full copy of the model, feed each a different slice of every
batch, and average the gradients after ``backward()`` so that all copies take the
same optimizer step. PyTorch's :class:`~torch.nn.parallel.DistributedDataParallel`
(DDP) does the averaging; :class:`~torch.utils.data.DistributedSampler` does the
slicing. This module wraps both so that one training script runs unchanged in a
single process (every helper below is then a no-op) and under ``torchrun``.

Typical use::

    device = setup_distributed()                 # reads torchrun's environment
    model = wrap_model(GPTModel(cfg), device)    # DDP when distributed
    loader = distributed_loader(dataset, batch_size=8, shuffle=True, seed=123)
    ...                                          # train as usual
    cleanup_distributed()

Why the sampler keeps results comparable: :class:`DistributedSampler` orders the
dataset (a seeded permutation, or the plain order when ``shuffle=False``) and gives
rank ``r`` the positions ``r, r + N, r + 2N, ...``. Batch ``k`` of every rank together
therefore holds exactly the samples of batch ``k`` of a single process that uses the
same sampler with ``N`` times the batch size. Single-process runs here use that same
sampler (with one replica), so the two set-ups see the same global batches.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .data import build_loader
from .device import best_device

# Environment variables torchrun sets in every process it starts.
TORCHRUN_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    """True inside an initialised process group (after :func:`setup_distributed`)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's index among all processes (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes taking part (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Index of this process on its own machine: which GPU it should use."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main_process() -> bool:
    """True on rank 0, the one process that prints, plots and saves."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when torchrun's environment variables are present."""
    return all(name in os.environ for name in TORCHRUN_ENV_VARS)


def setup_distributed(backend: str | None = None) -> torch.device:
    """Join the process group torchrun prepared and return this process's device.

    ``backend=None`` picks ``"nccl"`` when CUDA is available (one GPU per process,
    chosen by ``LOCAL_RANK``) and ``"gloo"`` otherwise (CPU processes). Outside
    torchrun, or when the group already exists, nothing is initialised and the
    device is returned all the same, so scripts can call this unconditionally.
    """
    if not launched_by_torchrun():
        return best_device()
    if not dist.is_available():
        raise RuntimeError(
            "torch.distributed is not available in this PyTorch build; run the script "
            "without torchrun, or install a PyTorch build with distributed support."
        )
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        # env:// reads MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE set by torchrun
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    return device


def cleanup_distributed() -> None:
    """Leave the process group (a no-op when not distributed)."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process reaches this line (a no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def wrap_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Move ``model`` to ``device`` and wrap it in DDP when distributed.

    Outside a process group the model itself comes back, so the same script runs in
    one process. Buffers are not re-sent before every forward pass
    (``forward_sync_buffers=False``; ``broadcast_buffers=False`` before PyTorch 2.13):
    the course's models have no buffers that change in training (``GPTModel`` has
    none at all, it builds its causal mask per call; chapter 3's ``CausalAttention``
    keeps a constant mask). With PyTorch 2.13 and later DDP still copies rank 0's
    buffers to every process once, when it wraps the model; older releases skip that
    too. A model whose buffers change in ``forward`` (BatchNorm's running statistics)
    would drift apart between processes: wrap such a model in DDP yourself, keeping
    buffer syncing on.
    """
    device = torch.device(device)
    model = model.to(device)
    if not is_distributed():
        return model
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    # PyTorch 2.13 renamed the option (broadcast_buffers is deprecated there); older releases only know broadcast_buffers
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        no_buffer_sync = {"forward_sync_buffers": False}
    else:
        no_buffer_sync = {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP (or ``torch.compile``) wrapper.

    Use it for anything only one process does (generation, saving) and for
    evaluation without gradients: the wrapper's forward takes part in collective
    communication, which hangs if the other processes do not call it too.
    """
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def distributed_loader(
    dataset: Dataset | DataLoader,
    batch_size: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool | None = None,
    num_workers: int | None = None,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A DataLoader over this process's share of ``dataset`` (all of it in one process).

    ``dataset`` may also be an existing DataLoader: its dataset, batch size,
    ``drop_last``, worker count and collate function are reused unless given here
    (its shuffling is not: pass ``shuffle``). ``batch_size`` is per process; the
    global batch is ``batch_size * world_size()``.

    A :class:`DistributedSampler` is used in every case (with a single replica
    outside a process group), so the order is the same seeded permutation
    (``shuffle=True``) or the plain order (``shuffle=False``) either way. Call
    :func:`set_epoch` at the start of every epoch to get a new permutation.
    ``drop_last`` (default True for a dataset) applies to the sampler (all ranks get
    equally many samples) and to the loader (no short final batch). Built by
    :func:`course_utils.data.build_loader` with ``shard=True``.
    """
    if isinstance(dataset, DataLoader):
        loader = dataset
        dataset = loader.dataset
        batch_size = batch_size if batch_size is not None else loader.batch_size
        drop_last = drop_last if drop_last is not None else loader.drop_last
        num_workers = num_workers if num_workers is not None else loader.num_workers
        collate_fn = collate_fn if collate_fn is not None else loader.collate_fn
    return build_loader(
        dataset,
        batch_size,
        shuffle,
        drop_last if drop_last is not None else True,
        num_workers=num_workers or 0,
        collate_fn=collate_fn,
        seed=seed,
        shard=True,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell a DistributedSampler which epoch starts, so it shuffles differently.

    Without this every epoch repeats the first epoch's order. Loaders with any other
    sampler are left alone, so training loops can call it on every loader.
    """
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def _reduce(value: float | int | torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    """All-reduce a scalar or tensor in float64 on the device the backend needs."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.as_tensor(value, dtype=torch.float64).detach().to(device).clone()
    dist.all_reduce(tensor, op=op)
    return tensor


def all_reduce_sum(value: float | int | torch.Tensor) -> float:
    """Sum of ``value`` over all processes (``value`` itself when not distributed)."""
    if not is_distributed():
        return float(value)
    return float(_reduce(value, dist.ReduceOp.SUM))


def all_reduce_mean(value: float | torch.Tensor) -> float:
    """Mean of a scalar ``value`` over all processes (``value`` itself when not distributed).

    Every process must call it (it is a collective operation), e.g. to log the
    same averaged loss everywhere.
    """
    if not is_distributed():
        return float(value)
    return float(_reduce(value, dist.ReduceOp.SUM)) / world_size()


def all_reduce_tensor_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of a tensor over all processes, as a new float64 CPU tensor."""
    if not is_distributed():
        return tensor.detach().to("cpu", torch.float64, copy=True)  # a copy even when already float64 on the CPU
    return _reduce(tensor, dist.ReduceOp.SUM).cpu()
