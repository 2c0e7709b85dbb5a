"""Train a tiny GPT briefly; run by tests/test_distributed.py under torchrun and in-process.

Under ``torchrun --nproc_per_node=2 tests/ddp_script.py --out losses.json`` each of
the two processes gets ``PER_RANK_BATCH`` samples per step; rank 0 writes the logged
losses to the JSON file. The test then calls :func:`run` in its own process with
``per_rank_batch = 2 * PER_RANK_BATCH`` and compares.

Why both runs see the same global batches: both use
:func:`course_utils.distributed.distributed_loader`, i.e. a DistributedSampler with
the same seed. It draws one permutation per epoch (seed + epoch) and rank r takes
positions r, r + 2, r + 4, ...; so batch k of rank 0 plus batch k of rank 1 is
exactly batch k of the single process with a batch twice as large. Dropout is off
(``GPTConfig.tiny``), and every window has the same length with no ignored
targets, so the mean of the two ranks' batch losses equals the single process's
batch loss, and DDP's averaged gradient equals the single process's gradient.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import Subset

from course_utils.data import SlidingWindowDataset
from course_utils.datasets import load_the_verdict
from course_utils.device import seed_everything
from course_utils.distributed import (
    cleanup_distributed,
    distributed_loader,
    is_main_process,
    setup_distributed,
    world_size,
    wrap_model,
)
from course_utils.gpt import GPTConfig, GPTModel
from course_utils.tokenizers import gpt2_tokenizer
from course_utils.train import WarmupCosine, make_optimizer, train_language_model

PER_RANK_BATCH = 2  # samples per process per step under torchrun
N_PROCESSES = 2
MAX_LENGTH = 16  # tokens per window
N_TRAIN = 12  # windows: 3 steps per epoch at a global batch of 4
N_VAL = 8
EPOCHS = 2  # 6 optimizer steps in all; the second epoch reshuffles (set_epoch)
SEED = 123


def _loaders(per_rank_batch: int):
    tokenizer = gpt2_tokenizer()
    dataset = SlidingWindowDataset(load_the_verdict(), tokenizer, max_length=MAX_LENGTH, stride=MAX_LENGTH)
    train_set = Subset(dataset, range(N_TRAIN))
    val_set = Subset(dataset, range(N_TRAIN, N_TRAIN + N_VAL))
    train_loader = distributed_loader(train_set, batch_size=per_rank_batch, shuffle=True, seed=SEED)
    val_loader = distributed_loader(val_set, batch_size=per_rank_batch, shuffle=False)
    return train_loader, val_loader, tokenizer


def _fresh_model(device: torch.device) -> torch.nn.Module:
    seed_everything(SEED)  # identical initial weights in every process and in the reference run
    return wrap_model(GPTModel(GPTConfig.tiny(context_length=MAX_LENGTH)), device)


def run(per_rank_batch: int, device: torch.device | str = "cpu") -> dict:
    """Train twice (plain, then warm-up + cosine + clipping); return both histories as dicts."""
    device = torch.device(device)
    train_loader, val_loader, tokenizer = _loaders(per_rank_batch)
    common = dict(num_epochs=EPOCHS, eval_every=1, eval_batches=2, tokenizer=tokenizer, prompt="The studio",
                  show_progress=False)

    model = _fresh_model(device)
    plain = train_language_model(model, train_loader, val_loader, make_optimizer(model, lr=1e-3), device, **common)

    model = _fresh_model(device)
    total_steps = EPOCHS * len(train_loader)
    schedule = WarmupCosine(peak_lr=1e-3, total_steps=total_steps, warmup_steps=2, initial_lr=1e-4, min_lr=1e-5)
    scheduled = train_language_model(model, train_loader, val_loader, make_optimizer(model, lr=1e-3), device,
                                     schedule=schedule, max_grad_norm=0.5, **common)
    return {"world_size": world_size(), "simple": plain.to_dict(), "scheduled": scheduled.to_dict()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for rank 0's logs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core per process
    device = setup_distributed(backend="gloo")
    try:
        result = run(PER_RANK_BATCH, device="cpu")
        if is_main_process():
            args.out.write_text(json.dumps(result), encoding="utf-8")
    finally:
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
