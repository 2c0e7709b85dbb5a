"""Appendix A's data-parallel demo: train a small MLP on the two-moons data with DDP.

One script, three ways to run it (from the ``book/`` folder):

    python ddp_demo.py                                     # one process, no torch.distributed
    torchrun --nproc_per_node=2 ddp_demo.py --backend gloo # two CPU processes
    torchrun --nproc_per_node=gpu ddp_demo.py              # one process per GPU, NCCL

It uses :mod:`course_utils.distributed`, the same helpers the course's GPT training
loops use under torchrun: ``setup_distributed`` joins the process group,
``wrap_model`` wraps the model in DistributedDataParallel, ``distributed_loader``
gives every process its own slice of each batch, ``all_reduce_mean`` averages the
logged loss over processes, and only rank 0 prints and saves.

Besides training, the first step prints evidence of what DDP does: which samples
each rank got, the different local losses, and the gradients, identical on every
rank after ``backward()`` because DDP averaged them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from course_utils.device import seed_everything
from course_utils.distributed import (
    all_reduce_mean,
    cleanup_distributed,
    distributed_loader,
    is_distributed,
    is_main_process,
    rank,
    set_epoch,
    setup_distributed,
    unwrap_model,
    world_size,
    wrap_model,
)
from course_utils.settings import pick
from course_utils.toy_data import make_moons  # the data appendix A builds by hand

N_SAMPLES = pick(1024, 256)  # training points
EPOCHS = pick(30, 3)
PER_RANK_BATCH = 16  # samples per process per step; the global batch is this times the world size
LR = 0.01
SEED = 123


class MLP(nn.Module):
    """Two hidden layers with ReLU; outputs one logit per class."""

    def __init__(self, n_inputs: int = 2, n_hidden: int = 32, n_classes: int = 2):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(n_inputs, n_hidden),
            nn.ReLU(),
            nn.Linear(n_hidden, n_hidden),
            nn.ReLU(),
            nn.Linear(n_hidden, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (B, n_classes)


def gather(value) -> list:
    """Every rank's ``value`` as a list indexed by rank (``[value]`` in one process)."""
    if not is_distributed():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)  # a collective: every rank must call it
    return values


def report(message: str) -> None:
    """Print on rank 0 only: with N processes, N copies of every line help nobody."""
    if is_main_process():
        print(message, flush=True)


def show_first_step(indices: torch.Tensor, loss: torch.Tensor, model: nn.Module) -> None:
    """Print what each rank saw and computed in the very first step (rank 0 prints)."""
    samples = gather(indices.tolist())
    losses = gather(loss.item())
    grad_sums = gather(sum(p.grad.sum().item() for p in model.parameters()))
    for r in range(world_size()):
        report(f"  rank {r}: samples {samples[r][:6]} ... ({len(samples[r])} of them), "
               f"local loss {losses[r]:.4f}, gradient sum {grad_sums[r]:+.6f}")
    if world_size() > 1:
        overlap = set.intersection(*(set(s) for s in samples))
        report(f"  samples shared between ranks: {len(overlap)}; "
               f"mean of the local losses: {sum(losses) / len(losses):.4f}")


def train(per_rank_batch: int = PER_RANK_BATCH, epochs: int = EPOCHS,
          device: torch.device | str = "cpu") -> dict:
    """Train the MLP; returns the epoch losses (averaged over ranks) and the weights."""
    device = torch.device(device)
    X, y = make_moons(N_SAMPLES, seed=0)
    # the sample's index travels with it, so the first step can show who got what
    dataset = TensorDataset(X, y, torch.arange(N_SAMPLES))
    loader = distributed_loader(dataset, batch_size=per_rank_batch, shuffle=True, seed=SEED)
    seed_everything(SEED)  # the same initial weights in every process
    model = wrap_model(MLP(), device)  # DistributedDataParallel under torchrun
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    report(f"world size {world_size()}: {len(loader)} steps per epoch, "
           f"{per_rank_batch} samples per rank per step, global batch {per_rank_batch * world_size()}")

    epoch_losses = []
    for epoch in range(epochs):
        set_epoch(loader, epoch)  # a new shuffle each epoch, the same on every rank
        model.train()
        total = 0.0
        for step, (features, labels, indices) in enumerate(loader):
            features, labels = features.to(device), labels.to(device)
            loss = F.cross_entropy(model(features), labels)  # this rank's batch only
            optimizer.zero_grad()
            loss.backward()  # DDP all-reduces (averages) the gradients during backward
            if epoch == 0 and step == 0:
                report("first step:")
                show_first_step(indices, loss, model)
            optimizer.step()  # same gradients, same weights: every replica takes the same step
            total += loss.item()
        epoch_loss = all_reduce_mean(total / len(loader))  # collective: every rank calls it
        epoch_losses.append(epoch_loss)
        if epoch == 0 or (epoch + 1) % max(1, epochs // 5) == 0:
            where = f"mean over {world_size()} ranks" if world_size() > 1 else "one process"
            report(f"epoch {epoch + 1:3d}: loss {epoch_loss:.4f} ({where})")

    state = {k: v.detach().cpu().clone() for k, v in unwrap_model(model).state_dict().items()}
    checksums = gather(sum(v.double().sum().item() for v in state.values()))
    report(f"weight checksum per rank: {', '.join(f'{c:.6f}' for c in checksums)}")
    return {"epoch_losses": epoch_losses, "state_dict": state}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["gloo", "nccl"], default=None,
                        help="gloo for CPU processes, nccl for GPUs (default: nccl when CUDA is available)")
    parser.add_argument("--out", type=Path, default=None, help="where rank 0 saves the trained state_dict")
    args = parser.parse_args(argv)
    device = setup_distributed(backend=args.backend)  # a no-op outside torchrun
    report(f"backend {dist.get_backend() if is_distributed() else 'none (one process)'}; "
           f"rank {rank()} of {world_size()} prints; its device: {device}")
    try:
        result = train(device=device)
        if is_main_process() and args.out is not None:
            torch.save(result["state_dict"], args.out)  # one process writes the file
            report(f"rank 0 saved the weights to {args.out.name}")
    finally:
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
