"""Pretrain a GPT on "The Verdict" and print losses and a sample: the package end to end.

    python -m course_utils.demo                 # a small GPT, about a minute on a laptop CPU
    python -m course_utils.demo --size 124M     # chapter 5's run: GPT-2 small, 10 epochs
    COURSE_SMOKE=1 python -m course_utils.demo  # a few seconds, for CI

This is chapter 5 in one command: tokenize, cut into windows, train with AdamW,
evaluate on a held-out 10%, and continue a prompt of our own.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

from .data import create_dataloader, train_val_split_text
from .datasets import load_the_verdict
from .device import best_device, environment_report, seed_everything
from .generate import generate, text_to_token_ids, token_ids_to_text
from .gpt import GPTConfig, GPTModel, count_parameters
from .settings import pick
from .tokenizers import gpt2_tokenizer
from .train import make_optimizer, train_language_model

START_CONTEXT = "The studio was quiet when"


def build_config(size: str, context_length: int) -> GPTConfig:
    """GPT-2's layout at one of its sizes, "small" (4 layers, 256 wide) or "tiny" (CI)."""
    if size == "tiny":
        return GPTConfig.tiny(context_length=context_length)
    if size == "small":
        return GPTConfig(context_length=context_length, emb_dim=256, n_heads=4, n_layers=4, drop_rate=0.1)
    return GPTConfig.gpt2(size, context_length=context_length, drop_rate=0.1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default=pick("small", "tiny"), choices=["tiny", "small", "124M", "355M", "774M", "1558M"])
    parser.add_argument("--epochs", type=int, default=pick(10, 1))
    parser.add_argument("--context-length", type=int, default=pick(256, 64))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--eval-every", type=int, default=5, help="evaluate every this many steps")
    parser.add_argument("--eval-batches", type=int, default=pick(5, 1), help="batches per evaluation")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--plot", type=Path, default=None, help="save the loss curves to this PNG file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = best_device()
    print(environment_report(device))
    seed_everything(args.seed)

    text = load_the_verdict()
    train_text, val_text = train_val_split_text(text, 0.9)
    loader_args = dict(batch_size=args.batch_size, max_length=args.context_length, stride=args.context_length)
    train_loader = create_dataloader(train_text, shuffle=True, drop_last=True, **loader_args)
    val_loader = create_dataloader(val_text, shuffle=False, drop_last=False, **loader_args)

    cfg = build_config(args.size, args.context_length)
    model = GPTModel(cfg).to(device)
    print(f"model: {args.size}, {count_parameters(model):,} parameters; "
          f"{len(train_loader)} training batches of {args.batch_size}x{args.context_length} tokens")
    optimizer = make_optimizer(model, lr=args.lr, weight_decay=0.1)

    tokenizer = gpt2_tokenizer()
    start = time.perf_counter()
    history = train_language_model(
        model, train_loader, val_loader, optimizer, device,
        num_epochs=args.epochs, eval_every=args.eval_every, eval_batches=args.eval_batches,
        tokenizer=tokenizer, prompt=START_CONTEXT, show_progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB

    torch.manual_seed(args.seed)
    sample = generate(model, text_to_token_ids(START_CONTEXT, tokenizer).to(device), 25,
                      cfg.context_length, temperature=1.4, top_k=25)
    print(f"sample (temperature 1.4, top-k 25): {token_ids_to_text(sample, tokenizer)!r}")
    last = history.last()
    print(f"final train loss {last['train_loss']:.3f}, val loss {last['val_loss']:.3f}; "
          f"{last['seen']:,} tokens seen; {seconds:.1f} s training; peak RSS {peak_rss_gib:.2f} GiB")
    if args.plot:
        from .plots import plot_history

        plot_history(history).savefig(args.plot, dpi=120)
        print(f"loss curves saved to {args.plot}")
    return {"history": history, "seconds": seconds, "peak_rss_gib": peak_rss_gib}


if __name__ == "__main__":
    main(sys.argv[1:])
