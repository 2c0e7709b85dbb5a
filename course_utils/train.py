"""Pretraining loops: the loss, evaluation, and two training loops (chapter 5, appendix D).

* :func:`calc_loss_batch` / :func:`calc_loss_loader` measure next-token cross-entropy.
* :func:`train_model_simple` is chapter 5's loop: step, evaluate every few steps,
  print a sample after each epoch.
* :func:`train_model` adds appendix D's refinements: a learning-rate warm-up, cosine
  decay (:func:`lr_at_step`) and gradient clipping.

Both loops run unchanged in one process and under ``torchrun``
(:mod:`course_utils.distributed`): the model may be wrapped in DDP, logged losses
are averaged over all processes, tokens are counted over all processes, and only
rank 0 prints.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import tiktoken
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .device import tune_cpu_allocator
from .distributed import all_reduce_sum, all_reduce_tensor_sum, is_main_process, set_epoch, unwrap_model
from .generate import generate, text_to_token_ids, token_ids_to_text

IGNORE_INDEX = -100  # target id that cross-entropy skips (padding in later chapters)

LossFn = Callable[[torch.Tensor, torch.Tensor, nn.Module, torch.device], torch.Tensor]


# --- measuring the loss ----------------------------------------------------------


def calc_loss_batch(
    input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module, device: torch.device | str
) -> torch.Tensor:
    """Mean next-token cross-entropy of one batch (a scalar tensor that keeps its graph).

    Inputs and targets are (B, T) token ids; targets equal to -100 are ignored, so
    padded positions do not count.
    """
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)  # (B, T, vocab)
    # cross_entropy wants (N, classes) and (N,): flatten batch and time together
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten(), ignore_index=IGNORE_INDEX)


def calc_loss_loader(
    loader: DataLoader,
    model: nn.Module,
    device: torch.device | str,
    num_batches: int | None = None,
    loss_fn: LossFn = calc_loss_batch,
) -> float:
    """Mean batch loss over the first ``num_batches`` batches (all of them by default).

    Returns NaN for a loader with no batches. Runs without gradients. When
    distributed, the mean is taken over every process's batches (all processes must
    call it); the forward pass uses the unwrapped model, so no DDP communication
    happens here. ``loss_fn`` lets chapter 6 reuse this with a classification loss.
    """
    n_available = len(loader)
    n = n_available if num_batches is None else min(num_batches, n_available)
    total = torch.zeros((), dtype=torch.float64)
    plain = unwrap_model(model)
    with torch.no_grad():
        for i, (input_batch, target_batch) in enumerate(loader):
            if i >= n:
                break
            total += loss_fn(input_batch, target_batch, plain, device).item()
    total_and_count = all_reduce_tensor_sum(torch.stack([total, torch.tensor(float(n), dtype=torch.float64)]))
    total_loss, count = total_and_count.tolist()
    return total_loss / count if count > 0 else float("nan")


def evaluate_model(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    device: torch.device | str,
    eval_iter: int,
    loss_fn: LossFn = calc_loss_batch,
) -> tuple[float, float]:
    """Training and validation loss on ``eval_iter`` batches each, in eval mode.

    Eval mode switches dropout off so the numbers are repeatable; the model's
    previous mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter, loss_fn=loss_fn)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter, loss_fn=loss_fn)
    finally:
        model.train(was_training)
    return train_loss, val_loss


def generate_and_print_sample(
    model: nn.Module,
    tokenizer: tiktoken.Encoding,
    device: torch.device | str,
    start_context: str,
    max_new_tokens: int = 50,
) -> str | None:
    """Greedily continue ``start_context`` and print it on one line (rank 0 only).

    Returns the text on rank 0 and None elsewhere. A quick look at samples shows
    progress that a loss number hides (words, then grammar, then memorised text).
    """
    if not is_main_process():
        return None
    plain = unwrap_model(model)
    context_size = plain.pos_emb.weight.shape[0]
    idx = text_to_token_ids(start_context, tokenizer).to(device)  # (1, T)
    out = generate(plain, idx, max_new_tokens=max_new_tokens, context_size=context_size)  # (1, T + new)
    text = token_ids_to_text(out, tokenizer).replace("\n", " ")  # one line per sample
    tqdm.write(text)
    return text


# --- the optimizer -----------------------------------------------------------------


def make_optimizer(model: nn.Module, lr: float = 4e-4, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with the course's settings.

    Weight decay applies to every trainable parameter, as in the chapter. The fused
    implementation (one kernel for the whole update) is used when PyTorch has one
    for the parameters' device and dtype (CUDA, and CPU since PyTorch 2.4);
    otherwise PyTorch's default implementation is used.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters; unfreeze some (requires_grad=True) first.")
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device/dtype
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


# --- the learning-rate schedule ------------------------------------------------------


def lr_at_step(
    step: int,
    total_steps: int,
    peak_lr: float,
    warmup_steps: int,
    initial_lr: float = 0.0,
    min_lr: float = 0.0,
) -> float:
    """Learning rate for optimizer step ``step`` (counted from 0) of ``total_steps``.

    * Warm-up, steps ``0 .. warmup_steps - 1``: a straight line from ``initial_lr``
      (at step 0) towards ``peak_lr``; step ``warmup_steps`` is the first at the peak.
    * Cosine decay, steps ``warmup_steps .. total_steps - 1``: half a cosine from
      ``peak_lr`` down to ``min_lr``, which the last step (``total_steps - 1``)
      reaches exactly: ``min_lr + (peak_lr - min_lr) * (1 + cos(pi * progress)) / 2``
      with ``progress`` going from 0 to 1.

    Steps past the end stay at ``min_lr``. When no step follows the warm-up, the
    schedule simply stays at ``peak_lr``.
    """
    if total_steps < 1 or warmup_steps < 0 or step < 0:
        raise ValueError(
            f"Need total_steps >= 1, warmup_steps >= 0 and step >= 0 "
            f"(got total_steps={total_steps}, warmup_steps={warmup_steps}, step={step})."
        )
    if step < warmup_steps:
        return initial_lr + (peak_lr - initial_lr) * step / warmup_steps
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0:
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --- training loops ---------------------------------------------------------------


def _log(message: str) -> None:
    """Print on rank 0 only, without breaking a tqdm bar."""
    if is_main_process():
        tqdm.write(message)


def check_eval_schedule(eval_freq: int, eval_iter: int) -> None:
    """Refuse evaluation settings that would crash mid-training or measure nothing."""
    if eval_freq < 1 or eval_iter < 1:
        raise ValueError(
            f"eval_freq and eval_iter must be at least 1 (got eval_freq={eval_freq}, eval_iter={eval_iter}): "
            f"evaluate every eval_freq steps on eval_iter batches."
        )


def prepare_device_for_training(device: torch.device | str) -> None:
    """Per-device set-up the training loops do first: on the CPU, keep freed memory
    for reuse between steps (see :func:`course_utils.device.tune_cpu_allocator`)."""
    if torch.device(device).type == "cpu":
        tune_cpu_allocator()


def _progress_bar(total: int, show_progress: bool, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="step", disable=not (show_progress and is_main_process()))


def train_model_simple(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    start_context: str,
    tokenizer: tiktoken.Encoding,
    show_progress: bool = True,
) -> tuple[list[float], list[float], list[int]]:
    """Chapter 5's training loop; returns ``(train_losses, val_losses, tokens_seen)``.

    Every ``eval_freq`` optimizer steps (starting with step 0, after its update) the
    model is evaluated on ``eval_iter`` batches of each loader; the three lists hold
    one entry per evaluation, ``tokens_seen`` being the number of input tokens
    trained on so far by all processes together. A greedy sample from
    ``start_context`` is printed after each epoch.
    """
    check_eval_schedule(eval_freq, eval_iter)
    prepare_device_for_training(device)
    train_losses: list[float] = []
    val_losses: list[float] = []
    track_tokens_seen: list[int] = []
    local_tokens = 0  # this process's count; summed over processes when logged
    global_step = -1
    bar = _progress_bar(num_epochs * len(train_loader), show_progress, "train")
    try:
        for epoch in range(num_epochs):
            set_epoch(train_loader, epoch)
            model.train()
            for input_batch, target_batch in train_loader:
                optimizer.zero_grad()
                loss = calc_loss_batch(input_batch, target_batch, model, device)
                loss.backward()  # under DDP, gradients are averaged over processes here
                optimizer.step()
                local_tokens += input_batch.numel()
                global_step += 1
                bar.update(1)

                if global_step % eval_freq == 0:
                    train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                    tokens = int(all_reduce_sum(local_tokens))
                    train_losses.append(train_loss)
                    val_losses.append(val_loss)
                    track_tokens_seen.append(tokens)
                    bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
                    _log(f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
            generate_and_print_sample(model, tokenizer, device, start_context)
    finally:
        bar.close()
    return train_losses, val_losses, track_tokens_seen


def train_model(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    n_epochs: int,
    eval_freq: int,
    eval_iter: int,
    start_context: str,
    tokenizer: tiktoken.Encoding,
    warmup_steps: int,
    initial_lr: float = 3e-5,
    min_lr: float = 1e-6,
    max_grad_norm: float | None = 1.0,
    peak_lr: float | None = None,
    show_progress: bool = True,
) -> dict[str, list]:
    """Appendix D's loop: warm-up, cosine decay and gradient clipping.

    Before every step the learning rate is set from :func:`lr_at_step` (peak
    ``peak_lr``, by default the optimizer's learning rate when training starts: pass
    it explicitly when reusing an optimizer whose rate a schedule already changed).

    Gradients are clipped to a total norm of ``max_grad_norm`` on *every* step,
    including the warm-up (``None`` switches clipping off). The chapter clips only
    after the warm-up; we clip throughout because the first steps from a random
    initialisation have the largest gradients, and clipping an already-small
    gradient changes nothing. Under DDP the gradients are already averaged when
    clipping runs, so every process clips identically.

    Returns a dict with ``train_losses``, ``val_losses``, ``tokens_seen`` (one entry
    per evaluation, as in :func:`train_model_simple`) and ``track_lrs`` (one entry
    per optimizer step).
    """
    check_eval_schedule(eval_freq, eval_iter)
    prepare_device_for_training(device)
    if peak_lr is None:
        peak_lr = optimizer.param_groups[0]["lr"]
    total_steps = n_epochs * len(train_loader)
    history: dict[str, list] = {"train_losses": [], "val_losses": [], "tokens_seen": [], "track_lrs": []}
    local_tokens = 0
    global_step = -1
    bar = _progress_bar(total_steps, show_progress, "train")
    try:
        for epoch in range(n_epochs):
            set_epoch(train_loader, epoch)
            model.train()
            for input_batch, target_batch in train_loader:
                global_step += 1
                lr = lr_at_step(global_step, total_steps, peak_lr, warmup_steps, initial_lr, min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                history["track_lrs"].append(lr)

                optimizer.zero_grad()
                loss = calc_loss_batch(input_batch, target_batch, model, device)
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=max_grad_norm)
                optimizer.step()
                local_tokens += input_batch.numel()
                bar.update(1)

                if global_step % eval_freq == 0:
                    train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                    history["train_losses"].append(train_loss)
                    history["val_losses"].append(val_loss)
                    history["tokens_seen"].append(int(all_reduce_sum(local_tokens)))
                    bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}", lr=f"{lr:.2e}")
                    _log(f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
            generate_and_print_sample(model, tokenizer, device, start_context)
    finally:
        bar.close()
    return history
