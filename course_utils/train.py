"""Training a GPT: the loss, evaluation, the optimizer, the schedule and the loop
(chapter 5, appendix D; chapter 6 reuses the loop with another loss).

A run is three small pieces repeated:

* **step** (:func:`train_step`): one batch forward, its loss, backward, optional
  gradient clipping, one optimizer update;
* **evaluate** (:func:`evaluate`): in eval mode and without gradients, measure a few
  batches of each loader; losses are averaged over the *targets* that count, so a
  short last batch or padding marked ``-100`` weighs exactly what it contains;
* **record**: the numbers become a row of a :class:`~course_utils.history.History`,
  printed as one line of a table.

:func:`fit` strings them together (evaluating before the first step, every
``eval_every`` steps and after the last); :func:`train_language_model` is fit with
next-token loss, token counting and text samples. Everything runs unchanged under
``torchrun`` (:mod:`course_utils.distributed`): evaluation sums are added up over
processes, the counts of tokens seen too, and only rank 0 prints.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tiktoken
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import IGNORE_INDEX
from .device import eval_mode, tune_cpu_allocator
from .distributed import all_reduce_sum, all_reduce_tensor_sum, is_main_process, set_epoch, unwrap_model, world_size
from .generate import generate, text_to_token_ids, token_ids_to_text
from .gpt import context_length_of
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .history import History

Device = torch.device | str
LossFn = Callable[[torch.Tensor, torch.Tensor, nn.Module, Device], torch.Tensor]
# A batch measure returns, per metric, a (sum, count) pair: the metric is sum / count
# over every evaluated batch, which weights each batch by what it really contains.
BatchMeasure = Callable[[torch.Tensor, torch.Tensor, nn.Module, Device], dict[str, tuple[torch.Tensor, int]]]


# --- measuring the loss ----------------------------------------------------------


def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module, device: Device) -> torch.Tensor:
    """Mean next-token cross-entropy of one batch (a scalar tensor that keeps its graph).

    Inputs and targets are (B, T) token ids; targets equal to ``IGNORE_INDEX`` (-100)
    are skipped, so padded or masked positions add nothing and do not count.
    """
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)  # (B, T, vocab)
    # cross_entropy takes (N, classes) and (N,): fold batch and time into one axis
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten(), ignore_index=IGNORE_INDEX)


def counted_targets(target_batch: torch.Tensor) -> int:
    """How many targets of a batch enter the loss (those not equal to ``IGNORE_INDEX``)."""
    return int((target_batch != IGNORE_INDEX).sum())


def loss_measure(loss_fn: LossFn = calc_loss_batch) -> BatchMeasure:
    """A batch measure for :func:`evaluate` that reports ``loss``, weighted by counted targets."""

    def measure(input_batch, target_batch, model, device):
        n = counted_targets(target_batch)
        if n == 0:  # every target masked: the batch carries no loss (and cross-entropy gives NaN)
            return {"loss": (torch.zeros((), dtype=torch.float64), 0)}
        return {"loss": (loss_fn(input_batch, target_batch, model, device).double() * n, n)}

    measure.names = ("loss",)  # what it reports, also when a loader is empty
    return measure


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: Device,
    num_batches: int | None = None,
    measure: BatchMeasure | None = None,
) -> dict[str, float]:
    """Metrics over the first ``num_batches`` batches of ``loader`` (all by default).

    Runs in eval mode (dropout off; the model's mode is restored afterwards) without
    gradients. Each metric is the sum of its per-batch sums divided by the sum of
    its counts, over all processes when distributed (every process must call it);
    NaN when nothing was counted. The forward passes use the unwrapped model, so no
    DDP communication happens here. ``measure`` defaults to the next-token loss.
    """
    measure = measure or loss_measure()
    limit = len(loader) if num_batches is None else min(num_batches, len(loader))
    plain = unwrap_model(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    with eval_mode(plain), torch.no_grad():
        for i, (input_batch, target_batch) in enumerate(loader):
            if i >= limit:
                break
            for name, (total, count) in measure(input_batch, target_batch, plain, device).items():
                sums[name] = sums.get(name, 0.0) + total.detach().double().cpu()
                counts[name] = counts.get(name, 0) + count
    # No batches here: the measure's declared names, with nothing counted; the sum over
    # processes still runs, so every process takes part in it.
    names = sorted(sums) if sums else sorted(getattr(measure, "names", ("loss",)))
    packed = torch.tensor([[float(sums.get(n, 0.0)), float(counts.get(n, 0))] for n in names], dtype=torch.float64)
    packed = all_reduce_tensor_sum(packed)
    return {name: (s / c if c > 0 else math.nan) for name, (s, c) in zip(names, packed.tolist())}


def calc_loss_loader(
    loader: DataLoader,
    model: nn.Module,
    device: Device,
    num_batches: int | None = None,
    loss_fn: LossFn = calc_loss_batch,
) -> float:
    """Mean loss per counted target over the first ``num_batches`` batches (all by default).

    Each batch's mean loss is weighted by its number of counted targets (targets not
    equal to -100), so the result is the loss of all those targets together: a short
    last batch or a heavily padded one counts for what it holds. NaN for a loader with
    no batches. Runs in eval mode without gradients (see :func:`evaluate`).
    """
    return evaluate(model, loader, device, num_batches, loss_measure(loss_fn))["loss"]


# --- one step ----------------------------------------------------------------------


def train_step(
    model: nn.Module,
    input_batch: torch.Tensor,
    target_batch: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    device: Device,
    loss_fn: LossFn = calc_loss_batch,
    max_grad_norm: float | None = None,
) -> torch.Tensor:
    """One optimizer update on one batch; returns the batch loss, detached.

    Gradients are cleared first (``set_to_none``: nothing left from the last step),
    then computed by ``backward`` (under DDP averaged over processes there), clipped
    to a total norm of ``max_grad_norm`` if given, and applied by the optimizer.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(input_batch, target_batch, model, device)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=max_grad_norm)
    optimizer.step()
    return loss.detach()


# --- the optimizer -----------------------------------------------------------------


def make_optimizer(
    model: nn.Module, lr: float = 4e-4, weight_decay: float = 0.1, decay_embeddings: bool = True
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with weight decay only where it makes sense.

    Weight decay pulls weights towards zero; that regularises matrices, but a
    LayerNorm's scale pulled to zero (or its shift, or a bias) only distorts the
    network. So parameters with fewer than 2 dimensions go into a group without
    decay, as in nanoGPT. Embedding matrices are 2-D and decayed by default, like
    any other matrix (GPT-2's tied output head *is* the token embedding);
    ``decay_embeddings=False`` moves ``nn.Embedding`` weights to the no-decay group.

    The fused implementation (one kernel for the whole update) is used when PyTorch
    has one for the parameters' device and dtype; otherwise the default one.
    """
    no_decay_ids = set()
    if not decay_embeddings:
        no_decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():  # parameters() yields a tied tensor once
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if param.dim() < 2 or id(param) in no_decay_ids else decay).append(param)
    if not (decay or no_decay):
        raise ValueError("The model has no trainable parameters; unfreeze some (requires_grad=True) first.")
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device/dtype
        return torch.optim.AdamW(groups, lr=lr)


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


@dataclass(frozen=True)
class WarmupCosine:
    """Appendix D's schedule as a callable ``step -> rate`` (see :func:`lr_at_step`).

    ``total_steps`` is the whole run's step count (epochs x batches per epoch): a
    resumed run passes the same value, so its rates continue where they stopped.
    """

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    initial_lr: float = 0.0
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        return lr_at_step(step, self.total_steps, self.peak_lr, self.warmup_steps, self.initial_lr, self.min_lr)


# --- the loop ------------------------------------------------------------------------


def check_eval_schedule(eval_every: int, eval_batches: int | None) -> None:
    """Refuse evaluation settings that would crash mid-training or measure nothing."""
    if eval_every < 1 or (eval_batches is not None and eval_batches < 1):
        raise ValueError(
            f"eval_every and eval_batches must be at least 1 (got eval_every={eval_every}, "
            f"eval_batches={eval_batches}): evaluate every eval_every steps on eval_batches batches."
        )


def prepare_device_for_training(device: Device) -> None:
    """Per-device set-up done before training: on the CPU, keep freed memory for
    reuse between steps (see :func:`course_utils.device.tune_cpu_allocator`)."""
    if torch.device(device).type == "cpu":
        tune_cpu_allocator()


def count_tokens(input_batch: torch.Tensor) -> int:
    """What a language-model step trains on: every input token of the batch."""
    return input_batch.numel()


def count_examples(input_batch: torch.Tensor) -> int:
    """What a classifier step trains on: the examples (rows) of the batch."""
    return input_batch.shape[0]


def _say(message: str) -> None:
    """Print on rank 0 only, without breaking a tqdm bar."""
    if is_main_process():
        tqdm.write(message)


@contextlib.contextmanager
def _random_state_kept(loaders: tuple[DataLoader, ...], device: Device) -> Iterator[None]:
    """Undo what a block does to random states: torch's global generators (dropout,
    a loader without its own generator) and the loaders' own shuffling generators.

    Starting an iteration over a shuffled loader draws from its generator, so without
    this an evaluation on the training loader would change the next epoch's order,
    and the trained weights would depend on how often we evaluate.
    """
    generators = [g for g in (getattr(loader, "generator", None) for loader in loaders) if g is not None]
    states = [g.get_state() for g in generators]
    dev = torch.device(device)
    devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
    for generator, state in zip(generators, states):
        generator.set_state(state)


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: Device,
    *,
    num_epochs: int,
    eval_every: int,
    eval_batches: int | None = None,
    loss_fn: LossFn = calc_loss_batch,
    measure: BatchMeasure | None = None,
    count: Callable[[torch.Tensor], int] = count_tokens,
    unit: str = "tokens",
    schedule: Callable[[int], float] | None = None,
    max_grad_norm: float | None = None,
    after_epoch: Callable[[nn.Module, int], str | None] | None = None,
    history: History | None = None,
    show_progress: bool = True,
    log: bool = True,
    desc: str = "train",
) -> History:
    """Train for ``num_epochs`` epochs; return the run's :class:`History`.

    Evaluation (``measure`` on ``eval_batches`` batches of each loader, recorded as
    ``train_<metric>`` and ``val_<metric>``) happens before the first step (the
    untrained model), after every ``eval_every``-th step and after the last step.
    ``count`` says what a batch contributes to ``seen`` (tokens by default).
    ``schedule(step)`` sets the learning rate before each step (step 0 first);
    ``max_grad_norm`` clips gradients at every step. ``after_epoch(model, epoch)``
    runs after each epoch; a string it returns is stored and printed as a sample.

    Resuming: pass the ``history`` of an interrupted run (e.g. from
    :func:`load_training_state`) with the same ``num_epochs`` and loaders. Training
    continues at step ``history.steps_done``: finished epochs are skipped, and in a
    half-done epoch the batches already trained on are drawn and passed over, so a
    loader without shuffling yields exactly the batches the first run would have.
    """
    check_eval_schedule(eval_every, eval_batches)
    if num_epochs < 0:
        raise ValueError(f"num_epochs must be at least 0, got {num_epochs}.")
    prepare_device_for_training(device)
    measure = measure or loss_measure(loss_fn)
    history = history if history is not None else History(unit=unit)
    steps_per_epoch = len(train_loader)
    total_steps = num_epochs * steps_per_epoch
    step = history.steps_done
    if step > total_steps:
        raise ValueError(f"The history has {step} steps done, more than this run's {total_steps}; pass the run's num_epochs.")
    seen_before = history.seen_total  # all processes, before this call
    local_seen = 0  # this process, during this call

    def evaluate_and_record() -> None:
        values: dict[str, float] = {}
        with _random_state_kept((train_loader, val_loader), device):  # evaluating must not change training
            for split, loader in (("train", train_loader), ("val", val_loader)):
                for name, value in evaluate(model, loader, device, eval_batches, measure).items():
                    values[f"{split}_{name}"] = value
        seen = seen_before + int(all_reduce_sum(local_seen))
        history.record(step, step / steps_per_epoch if steps_per_epoch else 0.0, seen, **values)
        if log:
            if len(history) == 1:
                _say(history.header())
            _say(history.format_row())
        bar.set_postfix({k: f"{v:.3f}" for k, v in values.items() if k.startswith("val_")}, refresh=False)

    bar = tqdm(total=total_steps, initial=step, desc=desc, unit="step", disable=not (show_progress and is_main_process()))
    try:
        if not history.step:
            evaluate_and_record()  # where the untrained model starts
        for epoch in range(step // steps_per_epoch if steps_per_epoch else 0, num_epochs):
            set_epoch(train_loader, epoch)
            model.train()
            first = epoch * steps_per_epoch
            for i, (input_batch, target_batch) in enumerate(train_loader):
                if first + i < step:
                    continue  # trained on before the run was interrupted
                if schedule is not None:
                    rate = schedule(step)
                    for group in optimizer.param_groups:
                        group["lr"] = rate
                history.lr.append(optimizer.param_groups[0]["lr"])
                train_step(model, input_batch, target_batch, optimizer, device, loss_fn, max_grad_norm)
                step += 1
                history.steps_done = step
                local_seen += count(input_batch)
                bar.update(1)
                if step % eval_every == 0 or step == total_steps:
                    evaluate_and_record()
            if after_epoch is not None:
                text = after_epoch(model, epoch)
                if text is not None:
                    history.samples.append({"step": step, "epoch": epoch + 1, "text": text})
                    if log:
                        _say(f"  sample after epoch {epoch + 1}: {text}")
    except BaseException:
        # Interrupted: keep the count consistent with steps_done for a resume. Across
        # processes we cannot add up safely here (the others may be gone), so a
        # distributed run falls back to the count at its last evaluation.
        history.seen_total = seen_before + local_seen if world_size() == 1 else history.seen[-1]
        raise
    finally:
        bar.close()
    history.seen_total = seen_before + int(all_reduce_sum(local_seen))
    return history


# --- language-model training (chapter 5, appendix D) ----------------------------------


def sample_text(
    model: nn.Module,
    tokenizer: tiktoken.Encoding,
    device: Device,
    prompt: str,
    max_new_tokens: int = 50,
) -> str:
    """Greedily continue ``prompt``; returns the whole text on one line.

    A look at samples shows progress that a loss number hides (words, then grammar,
    then memorised passages). The model's mode is left as it was.
    """
    plain = unwrap_model(model)
    idx = text_to_token_ids(prompt, tokenizer).to(device)  # (1, T)
    out = generate(plain, idx, max_new_tokens=max_new_tokens, context_size=context_length_of(plain) or idx.shape[1] + max_new_tokens)
    return token_ids_to_text(out, tokenizer).replace("\n", " ")


def train_language_model(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: Device,
    *,
    num_epochs: int,
    eval_every: int,
    eval_batches: int | None = None,
    tokenizer: tiktoken.Encoding | None = None,
    prompt: str | None = None,
    sample_tokens: int = 50,
    schedule: Callable[[int], float] | None = None,
    max_grad_norm: float | None = None,
    history: History | None = None,
    show_progress: bool = True,
    log: bool = True,
) -> History:
    """Pretrain ``model`` on next-token prediction; returns the :class:`History`.

    The history's rows hold ``train_loss`` and ``val_loss`` (mean per target over
    ``eval_batches`` batches of each loader) and ``seen`` counts input tokens over all
    processes. With a ``tokenizer`` and a ``prompt``, a greedy continuation of
    ``sample_tokens`` tokens is printed after every epoch (rank 0 only).
    Appendix D adds ``schedule`` (e.g. :class:`WarmupCosine`) and ``max_grad_norm``.
    """
    after_epoch = None
    if tokenizer is not None and prompt is not None:

        def after_epoch(trained: nn.Module, epoch: int) -> str | None:
            return sample_text(trained, tokenizer, device, prompt, sample_tokens) if is_main_process() else None

    return fit(
        model, train_loader, val_loader, optimizer, device,
        num_epochs=num_epochs, eval_every=eval_every, eval_batches=eval_batches,
        loss_fn=calc_loss_batch, count=count_tokens, unit="tokens",
        schedule=schedule, max_grad_norm=max_grad_norm, after_epoch=after_epoch,
        history=history, show_progress=show_progress, log=log,
    )


# --- checkpoints of a run in progress ---------------------------------------------------


def save_training_state(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, history: History, **extra: Any) -> Path:
    """Save model, optimizer and the run's history (with its step count) to ``path``.

    What :func:`load_training_state` needs to continue the run where it stopped: the
    weights, AdamW's moment estimates, and ``history.steps_done``, from which a
    schedule computes the next learning rate. See :mod:`course_utils.checkpoint`.
    """
    return save_checkpoint(path, model, optimizer, extra={**extra, "history": history.to_dict()})


def load_training_state(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, map_location: Device = "cpu") -> History:
    """Restore what :func:`save_training_state` wrote; returns the history to pass to :func:`fit`."""
    extra = load_checkpoint(path, model, optimizer, map_location=map_location)
    if "history" not in extra:
        raise CheckpointError(f"{path} holds no training history; it was not written by save_training_state.")
    return History.from_dict(extra["history"])


__all__ = [
    "IGNORE_INDEX",
    "BatchMeasure",
    "History",
    "WarmupCosine",
    "calc_loss_batch",
    "calc_loss_loader",
    "check_eval_schedule",
    "count_examples",
    "count_tokens",
    "counted_targets",
    "evaluate",
    "fit",
    "load_training_state",
    "loss_measure",
    "lr_at_step",
    "make_optimizer",
    "prepare_device_for_training",
    "sample_text",
    "save_training_state",
    "train_language_model",
    "train_step",
]
