"""Autograding checks for the training chapters: 5, 6, 7 and appendices A, D and E.

The companion of :mod:`course_utils.grading` (same message style, same helpers): each
``check_*`` function runs a student's function or module next to the course's
reference on seeded inputs, compares the results within a stated tolerance, and
raises an ``AssertionError`` that names the input, shows expected against got, and,
when the result matches a known mistake, says which one and how to fix it.

* Chapter 5: :func:`check_loss_batch`, :func:`check_loss_loader`,
  :func:`check_train_loop` (against ``train.train_model_simple``'s bookkeeping),
  :func:`check_sampling_probs` (temperature and top-k as probabilities, compared
  exactly) and :func:`check_sample_next_token` (a sampler that draws from a
  ``torch.Generator``, judged by its distribution and its reproducibility, so any
  correct way of drawing passes).
* Chapter 6: :func:`check_classification_head`, :func:`check_accuracy_loader`,
  :func:`check_classification_loss`.
* Chapter 7: :func:`check_format_input`, :func:`check_collate_masks` (prompt masking
  and end-of-text tokens inside a text; :func:`course_utils.grading.check_instruction_collate`
  grades the padding, shifting and -100 masking).
* Appendix A: :func:`check_pairwise_sq_distances`, :func:`check_loss_and_grads`,
  :func:`check_mlp`, :func:`check_train_epochs` (and :func:`make_moons`, its toy data).
* Appendix D: :func:`check_lr_schedule`, :func:`check_clip_grad_norm`.
* Appendix E: :func:`check_lora_layer`, :func:`check_linear_with_lora`,
  :func:`check_replace_linear_with_lora`.

Training checks give the student's code and the reference identical fresh models,
optimizers, loaders and random states (``torch.random.fork_rng``), so a correct loop
reproduces the reference's numbers to float rounding; the global random state of the
caller is left untouched.
"""
from __future__ import annotations

import copy
import functools
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .classify import add_classification_head as _ref_add_classification_head
from .classify import calc_accuracy_loader as _ref_accuracy_loader
from .classify import calc_loss_batch_classification as _ref_classification_loss
from .grading import (
    Tolerance,
    _build,
    _call,
    _fmt_num,
    _fmt_shape,
    _fmt_values,
    _message,
    _seeded_ints,
    check_function,
    check_module_against_reference,
    check_shape,
    check_tensor_close,
    default_tolerance,
    grading_config,
    perturb_parameters,
    seeded_randn,
)
from .gpt import GPTConfig
from .gpt import GPTModel as _RefGPTModel
from .instruct import IGNORE_INDEX
from .instruct import format_input as _ref_format_input
from .instruct import instruction_collate as _ref_instruction_collate
from .lora import LinearWithLoRA as _RefLinearWithLoRA
from .lora import LoRALayer as _RefLoRALayer
from .lora import replace_linear_with_lora as _ref_replace_linear_with_lora
from .tokenizers import GPT2_EOT_ID
from .toy_data import make_moons
from .train import calc_loss_batch as _ref_loss_batch
from .train import calc_loss_loader as _ref_loss_loader
from .train import evaluate_model as _ref_evaluate_model
from .train import lr_at_step as _ref_lr_at_step

__all__ = [
    "make_moons",
    "token_loader",
    "reference_train_loop",
    "reference_sampling_probs",
    "check_loss_batch",
    "check_loss_loader",
    "check_train_loop",
    "check_sampling_probs",
    "check_sample_next_token",
    "check_classification_head",
    "check_accuracy_loader",
    "check_classification_loss",
    "check_format_input",
    "check_collate_masks",
    "check_pairwise_sq_distances",
    "check_loss_and_grads",
    "check_mlp",
    "check_train_epochs",
    "check_lr_schedule",
    "check_clip_grad_norm",
    "check_lora_layer",
    "check_linear_with_lora",
    "check_replace_linear_with_lora",
]

DEVICE = "cpu"  # the checks run where the grader runs


# --- small shared pieces ------------------------------------------------------------------


def _as_number(value: Any, *, name: str, case: str | None, hint: str | None = None) -> float:
    """A Python float from a number or a one-element tensor; anything else fails."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise AssertionError(_message(
                f"{name}: expected a single number, got a tensor of shape {_fmt_shape(value.shape)}.",
                case=case, hint=hint or "reduce to one number (a mean), and return it."))
        return float(value.detach().double())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise AssertionError(_message(
            f"{name}: expected a number, got {type(value).__name__}.", case=case,
            hint=hint or "return the number (did you forget a `return`?)."))
    return float(value)


def _close(got: float, expected: float, tol: Tolerance) -> bool:
    if math.isnan(expected) or math.isnan(got):
        return math.isnan(expected) and math.isnan(got)
    return abs(got - expected) <= tol.atol + tol.rtol * abs(expected)


def _check_number(got: float, expected: float, *, name: str, case: str | None, tol: Tolerance,
                  variants: Callable[[], Sequence[tuple[float, str]]] | None = None, hint: str | None = None,
                  lines: Sequence[str] = ()) -> None:
    if _close(got, expected, tol):
        return
    cause = None
    if variants is not None:
        try:
            cause = next((why for value, why in variants() if _close(got, value, tol)), None)
        except Exception:  # a diagnosis is a bonus
            cause = None
    raise AssertionError(_message(
        f"{name}: wrong value.", case=case,
        lines=[f"expected {_fmt_num(expected)}, got {_fmt_num(got)} (tolerance {tol})", *lines],
        cause=cause, hint=hint))


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block with the global random state seeded, and restore the caller's state afterwards."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def _one_thread(check: Callable) -> Callable:
    """Run a check on one CPU thread (restored afterwards): its tiny tensors train several
    times faster without the cost of splitting work between threads."""

    @functools.wraps(check)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return check(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def _tiny_gpt(cfg: GPTConfig, seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A reference GPT with seeded weights (the global random state is untouched)."""
    with _seeded(seed):
        model = _RefGPTModel(cfg)
    return model.to(dtype)


def _token_pairs(vocab_size: int, num_sequences: int, num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of shape (N, T): random token sequences, the targets shifted by one."""
    ids = _seeded_ints(vocab_size, num_sequences, num_tokens + 1, seed=seed)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def token_loader(vocab_size: int, num_sequences: int, num_tokens: int, batch_size: int, seed: int = 0) -> DataLoader:
    """A fixed-order DataLoader of random (input, target) token sequences, the last batch possibly short."""
    inputs, targets = _token_pairs(vocab_size, num_sequences, num_tokens, seed)
    # a private generator: even an unshuffled loader draws a seed for each pass over it
    return DataLoader(TensorDataset(inputs, targets), batch_size=batch_size, shuffle=False, drop_last=False,
                      generator=torch.Generator().manual_seed(seed))


# --- chapter 5: the loss ----------------------------------------------------------------------


def _loss_batch_variants(logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> list[tuple[torch.Tensor, str]]:
    flat_logits, flat_targets = logits.flatten(0, 1), targets.flatten()
    keep = flat_targets != IGNORE_INDEX
    per_token = F.cross_entropy(flat_logits, flat_targets, reduction="none")  # 0 where ignored
    out = [
        (F.cross_entropy(flat_logits, flat_targets, reduction="sum"),
         "the losses were summed; average them over the positions (F.cross_entropy's default reduction='mean')."),
        (F.cross_entropy(flat_logits, inputs.flatten()),
         "the logits were compared with the INPUTS: compare them with target_batch, which already holds the next tokens."),
        (F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(), ignore_index=IGNORE_INDEX),
         "the targets were shifted again: the data loader already shifted them, so position j's logits go with "
         "target j (compare logits.flatten(0, 1) with target_batch.flatten())."),
        (F.cross_entropy(torch.softmax(flat_logits, dim=-1), flat_targets, ignore_index=IGNORE_INDEX),
         "a softmax was applied before F.cross_entropy, which applies log-softmax itself: pass the raw logits."),
        (per_token.sum() / flat_targets.numel(),
         "the sum was divided by every position, including the ignored (-100) ones: average over the kept positions only."),
    ]
    if bool(keep.all()):
        log_probs_time = logits.log_softmax(dim=1)  # over the positions: a wrong dimension
        out.append((-log_probs_time.gather(-1, targets.unsqueeze(-1)).mean(),
                    "the softmax ran over the positions (dim=1); it must run over the vocabulary (the last dimension)."))
    rows = []
    for row_logits, row_targets in zip(logits, targets):
        if bool((row_targets != IGNORE_INDEX).any()):
            rows.append(F.cross_entropy(row_logits, row_targets, ignore_index=IGNORE_INDEX))
    if rows:
        out.append((torch.stack(rows).mean(),
                    "each sequence was averaged first and then the sequences: average over all kept positions at once "
                    "(sequences with more ignored positions must count less)."))
    return out


def check_loss_batch(
    fn: Callable,
    *,
    cfg: GPTConfig | None = None,
    batch_size: int = 2,
    num_tokens: int = 6,
    masked: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Grade ``fn(input_batch, target_batch, model, device)``: mean next-token cross-entropy.

    The model is a small reference GPT with seeded weights; inputs and targets are
    (B, T) token ids, the targets already shifted. With ``masked`` some targets are
    -100 and must not count. The result must be a 0-dim tensor that keeps its graph
    (the training loop calls ``backward()`` on it).
    """
    cfg = cfg or grading_config(drop_rate=0.0)
    model = _tiny_gpt(cfg, seed, dtype)
    inputs, targets = _token_pairs(cfg.vocab_size, batch_size, num_tokens, seed + 1)
    if masked:
        g = torch.Generator().manual_seed(seed + 2)
        drop = torch.rand(targets.shape, generator=g) < 0.4
        drop[0, -max(1, num_tokens // 2):] = True  # rows with different numbers of kept positions
        drop[:, 0] = False  # every row keeps at least one target
        targets = targets.masked_fill(drop, IGNORE_INDEX)
    case = (f"input_batch and target_batch of shape {_fmt_shape(inputs.shape)}"
            f"{', some targets -100' if masked else ''}, vocab_size={cfg.vocab_size}, {dtype}")
    expected = _ref_loss_batch(inputs, targets, model, DEVICE).detach()
    got = _call(fn, inputs.clone(), targets.clone(), model, DEVICE, what="calc_loss_batch", case=case,
                hint="logits = model(input_batch); F.cross_entropy(logits.flatten(0, 1), target_batch.flatten()).")
    if not isinstance(got, torch.Tensor):
        raise AssertionError(_message(
            f"calc_loss_batch: expected a tensor, got {type(got).__name__}.", case=case,
            hint="return the loss tensor itself: the training loop calls loss.backward() on it, so do not call "
                 ".item() or float() here."))
    check_shape(got, (), name="calc_loss_batch", case=case,
                hint="return one number for the whole batch (a 0-dim tensor): average over every position.")
    if not got.requires_grad:
        raise AssertionError(_message(
            "calc_loss_batch: the loss has no gradient graph.", case=case,
            hint="do not compute it under torch.no_grad() and do not .detach() it: loss.backward() needs the graph."))
    with torch.no_grad():
        logits = model(inputs)
    check_tensor_close(got, expected, name="calc_loss_batch", case=case,
                       diagnoses=lambda: _loss_batch_variants(logits, inputs, targets),
                       hint="F.cross_entropy(logits.flatten(0, 1), target_batch.flatten()): it averages over every "
                            "position and skips targets equal to -100.")


@_one_thread
def check_loss_loader(
    fn: Callable,
    *,
    num_sequences: int = 7,
    batch_size: int = 2,
    num_tokens: int = 5,
    num_batches: int | None = None,
    empty: bool = False,
    seed: int = 0,
) -> None:
    """Grade ``fn(data_loader, model, device, num_batches=None)``: the mean batch loss.

    The mean of :func:`course_utils.train.calc_loss_batch` over the first
    ``num_batches`` batches (every batch when None, and never more than the loader
    has); each batch counts once, whatever its size. An empty loader gives NaN.
    """
    cfg = grading_config(drop_rate=0.0)
    model = _tiny_gpt(cfg, seed).eval()
    n_seqs = 0 if empty else num_sequences
    loader = token_loader(cfg.vocab_size, n_seqs, num_tokens, batch_size, seed=seed + 1)
    if empty:
        case = f"an empty loader (0 batches), num_batches={num_batches}"
    else:
        case = (f"a loader of {len(loader)} batches ({n_seqs} sequences of {num_tokens} tokens, batch_size={batch_size}, "
                f"the last batch holding {n_seqs - (len(loader) - 1) * batch_size}), num_batches={num_batches}")
    expected = _ref_loss_loader(loader, model, DEVICE, num_batches=num_batches)
    hint = ("n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader)); add up "
            "calc_loss_batch(...).item() for the first n batches and divide by n; return float('nan') when n == 0.")
    got = _as_number(_call(fn, loader, model, DEVICE, num_batches, what="calc_loss_loader", case=case, hint=hint),
                     name="calc_loss_loader", case=case)
    if empty and not math.isnan(got):
        raise AssertionError(_message(
            f"calc_loss_loader: an empty loader must give NaN, got {_fmt_num(got)}.", case=case,
            hint="with no batches there is no loss to average: return float('nan') (0 would look like a perfect model)."))

    def variants() -> list[tuple[float, str]]:
        losses, sizes = [], []
        with torch.no_grad():
            for x, y in loader:
                losses.append(float(_ref_loss_batch(x, y, model, DEVICE)))
                sizes.append(x.shape[0])
        n = len(losses) if num_batches is None else min(num_batches, len(losses))
        out = [(sum(losses) / len(losses), "num_batches was ignored: use only the first num_batches batches."),
               (sum(losses[:n]), "the batch losses were added up but not divided by the number of batches.")]
        if n + 1 <= len(losses):
            out.append((sum(losses[: n + 1]) / (n + 1), "one batch too many (off by one): stop once num_batches batches are done (if i >= num_batches: break)."))
        if n >= 2:
            out.append((sum(losses[: n - 1]) / (n - 1), "one batch too few (off by one): the batches are numbered from 0."))
        if num_batches is not None and num_batches > len(losses):
            out.append((sum(losses) / num_batches,
                        f"the sum was divided by num_batches={num_batches}, but the loader has only {len(losses)} batches: "
                        "use min(num_batches, len(data_loader))."))
        weighted = sum(l * s for l, s in zip(losses[:n], sizes[:n])) / max(1, sum(sizes[:n]))
        out.append((weighted, "the batch losses were weighted by batch size; each batch counts once (a plain mean of the batch losses)."))
        return out

    _check_number(got, expected, name="calc_loss_loader", case=case, tol=Tolerance(1e-5, 1e-5), variants=variants, hint=hint)


# --- chapter 5: the training loop ----------------------------------------------------------------


def reference_train_loop(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    mistake: str | None = None,
) -> tuple[list[float], list[float], list[int]]:
    """Chapter 5's loop as :func:`course_utils.train.train_model_simple`, without the printed samples.

    ``mistake`` runs it with one deliberate slip (for diagnoses): ``"no_zero_grad"``,
    ``"eval_before_step"``, ``"eval_in_train_mode"``, ``"no_train_after_eval"``,
    ``"count_examples"``, ``"count_fixed"``, ``"count_after_eval"``, ``"steps_from_1"``.
    """
    train_losses: list[float] = []
    val_losses: list[float] = []
    tokens_seen: list[int] = []
    seen, step, fixed = 0, -1, None
    for _epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            if mistake != "no_zero_grad":
                optimizer.zero_grad()
            loss = _ref_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            if mistake != "eval_before_step":
                optimizer.step()
            step += 1
            fixed = fixed or input_batch.numel()
            if mistake == "count_examples":
                seen += input_batch.shape[0]
            elif mistake == "count_fixed":
                seen += fixed
            elif mistake != "count_after_eval":
                seen += input_batch.numel()
            due = (step + 1) % eval_freq == 0 if mistake == "steps_from_1" else step % eval_freq == 0
            if due:
                if mistake == "eval_in_train_mode":
                    train_loss = _ref_loss_loader(train_loader, model, device, num_batches=eval_iter)
                    val_loss = _ref_loss_loader(val_loader, model, device, num_batches=eval_iter)
                elif mistake == "no_train_after_eval":
                    model.eval()
                    train_loss = _ref_loss_loader(train_loader, model, device, num_batches=eval_iter)
                    val_loss = _ref_loss_loader(val_loader, model, device, num_batches=eval_iter)
                else:
                    train_loss, val_loss = _ref_evaluate_model(model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                tokens_seen.append(seen)
            if mistake == "eval_before_step":
                optimizer.step()
            if mistake == "count_after_eval":
                seen += input_batch.numel()
    return train_losses, val_losses, tokens_seen


_LOOP_MISTAKES = {
    "no_zero_grad": "the gradients were never reset, so they pile up from step to step: call optimizer.zero_grad() every step.",
    "eval_before_step": "the model was evaluated before optimizer.step(): evaluate after the step's update.",
    "eval_in_train_mode": "the evaluation ran in train mode, so dropout made the losses noisy: call model.eval() before evaluating.",
    "no_train_after_eval": "the model stayed in eval mode after evaluating, so later steps trained without dropout: call model.train() again after evaluating.",
    "count_examples": "tokens_seen counts sequences; count tokens: input_batch.numel() (batch size x sequence length).",
    "count_fixed": "tokens_seen adds batch_size * num_tokens for every batch, but the last batch is shorter: add input_batch.numel().",
    "count_after_eval": "tokens_seen was updated after the evaluation, so each entry misses the current batch: count the batch before evaluating.",
    "steps_from_1": "the steps were counted from 1: the first optimizer step is step 0, and the loop evaluates after steps 0, eval_freq, 2 * eval_freq, ...",
}


@_one_thread
def check_train_loop(
    fn: Callable,
    *,
    num_epochs: int = 1,
    eval_freq: int = 2,
    eval_iter: int = 1,
    num_sequences: int = 9,
    batch_size: int = 2,
    num_tokens: int = 6,
    drop_rate: float = 0.0,
    lr: float = 5e-3,
    seed: int = 0,
) -> None:
    """Grade ``fn(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq, eval_iter)``.

    It must train as :func:`course_utils.train.train_model_simple` does and return
    ``(train_losses, val_losses, tokens_seen)``: after optimizer steps 0,
    ``eval_freq``, ``2 * eval_freq``, ... (counted over all epochs) it evaluates in
    eval mode on ``eval_iter`` batches of each loader and records both losses and the
    number of input tokens trained on so far. The student's loop and the reference get
    identical tiny GPTs, AdamW optimizers, loaders (the last batch shorter) and random
    states; losses, token counts and the trained weights are compared.
    """
    cfg = grading_config(drop_rate=drop_rate)
    train_loader = token_loader(cfg.vocab_size, num_sequences, num_tokens, batch_size, seed=seed + 1)
    val_loader = token_loader(cfg.vocab_size, max(2, num_sequences // 2), num_tokens, batch_size, seed=seed + 2)
    case = (f"a tiny GPT (drop_rate={drop_rate}), {len(train_loader)} training batches of up to {batch_size} x "
            f"{num_tokens} tokens (the last one shorter), num_epochs={num_epochs}, eval_freq={eval_freq}, "
            f"eval_iter={eval_iter}")

    def run(loop: Callable, mistake: str | None = None, student: bool = False):
        model = _tiny_gpt(cfg, seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1000)  # dropout draws the same numbers in both runs
            if student:
                out = _call(loop, model, train_loader, val_loader, optimizer, DEVICE, num_epochs, eval_freq, eval_iter,
                            what="train_model_simple", case=case)
            else:
                out = loop(model, train_loader, val_loader, optimizer, DEVICE, num_epochs, eval_freq, eval_iter, mistake=mistake)
        return out, model

    (exp_train, exp_val, exp_tokens), ref_model = run(reference_train_loop)
    got, student_model = run(fn, student=True)
    if not (isinstance(got, (tuple, list)) and len(got) == 3):
        raise AssertionError(_message(
            f"train_model_simple: expected (train_losses, val_losses, tokens_seen), got {type(got).__name__}"
            f"{f' of length {len(got)}' if isinstance(got, (tuple, list)) else ''}.", case=case,
            hint="return train_losses, val_losses, tokens_seen (three lists)."))
    got_train, got_val, got_tokens = (list(x) if isinstance(x, (list, tuple, torch.Tensor)) else x for x in got)
    for label, values in (("train_losses", got_train), ("val_losses", got_val), ("tokens_seen", got_tokens)):
        if not isinstance(values, list):
            raise AssertionError(_message(f"train_model_simple: {label} must be a list, got {type(values).__name__}.", case=case))
    got_tokens = [int(_as_number(t, name="tokens_seen entries", case=case)) for t in got_tokens]

    steps_per_epoch = len(train_loader)
    sizes = [x.numel() for x, _ in train_loader] * num_epochs
    cumulative = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    exp_steps = [s for s in range(len(sizes)) if s % eval_freq == 0]

    def mistake_runs(names: Sequence[str]) -> list[tuple[tuple, str]]:
        return [(run(reference_train_loop, name)[0], _LOOP_MISTAKES[name]) for name in names]

    if got_tokens != exp_tokens:
        lines = [f"{steps_per_epoch} steps per epoch; expected evaluations after steps {exp_steps} (counted from 0)",
                 f"expected tokens_seen {exp_tokens}", f"got      tokens_seen {got_tokens}"]
        inferred = [cumulative.index(t) for t in got_tokens if t in cumulative]
        if len(inferred) == len(got_tokens) and got_tokens:
            lines.append(f"your counts are the tokens after steps {inferred}")
        cause = next((why for out, why in mistake_runs(["steps_from_1", "count_examples", "count_fixed", "count_after_eval"])
                      if list(out[2]) == got_tokens), None)
        if cause is None and len(got_tokens) != len(exp_tokens):
            cause = (f"{len(got_tokens)} evaluations instead of {len(exp_tokens)}: evaluate when step % eval_freq == 0, "
                     "with one step counter over all epochs.")
        raise AssertionError(_message(
            "train_model_simple: tokens_seen differs from the reference.", case=case, lines=lines, cause=cause,
            hint="step = -1 before the loop; after each optimizer step: tokens_seen += input_batch.numel(); step += 1; "
                 "if step % eval_freq == 0: evaluate and append the three numbers."))
    tol = Tolerance(1e-4, 1e-4)
    loss_names = ["no_zero_grad", "eval_before_step", "eval_in_train_mode", "no_train_after_eval"]
    for label, got_list, exp_list, index in (("train_losses", got_train, exp_train, 0), ("val_losses", got_val, exp_val, 1)):
        got_t = torch.tensor([_as_number(v, name=f"{label} entries", case=case) for v in got_list], dtype=torch.float64)
        exp_t = torch.tensor(exp_list, dtype=torch.float64)

        def diagnoses(index=index):
            return [(torch.tensor(out[index], dtype=torch.float64), why) for out, why in mistake_runs(loss_names)
                    if len(out[index]) == len(exp_list)]

        check_tensor_close(got_t, exp_t, name=f"train_model_simple: {label}", case=case, tol=tol, diagnoses=diagnoses,
                           hint="each step: optimizer.zero_grad(); loss = calc_loss_batch(...); loss.backward(); "
                                "optimizer.step(). To evaluate: model.eval(), calc_loss_loader(..., num_batches=eval_iter) "
                                "for both loaders, then model.train().")
    got_w = torch.cat([p.detach().double().flatten() for p in student_model.parameters()])
    exp_w = torch.cat([p.detach().double().flatten() for p in ref_model.parameters()])
    check_tensor_close(got_w, exp_w, name="train_model_simple: the trained weights (all parameters, flattened)", case=case,
                       tol=tol, hint=f"take exactly one optimizer step per training batch: {len(sizes)} steps in all.")


# --- chapter 5: temperature and top-k ------------------------------------------------------------


def reference_sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """The probabilities :func:`course_utils.generate.next_token` samples from (temperature > 0).

    Logits below the ``top_k``-th largest of their row become -inf (ties with it
    stay), the rest are divided by ``temperature``, and a softmax over the last
    dimension turns them into probabilities.
    """
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits / temperature, dim=-1)


def _probs_variants(logits: torch.Tensor, temperature: float, top_k: int | None) -> list[tuple[torch.Tensor, str]]:
    def filtered(k: int | None, fill: float = float("-inf"), strict: bool = True):
        if k is None or k < 1:
            return logits
        kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth if strict else logits <= kth, fill)

    out = [
        (torch.softmax(filtered(top_k), dim=-1) / temperature,
         "the probabilities were divided by the temperature after the softmax; divide the logits before it."),
        (torch.softmax(filtered(top_k) * temperature, dim=-1),
         "the logits were multiplied by the temperature; divide them by it (a temperature above 1 flattens the distribution)."),
        (torch.softmax(filtered(top_k), dim=-1), "the temperature was ignored: divide the logits by it before the softmax."),
        (torch.softmax(filtered(top_k) / temperature, dim=0),
         "the softmax ran over dim=0 (the batch); run it over the vocabulary, dim=-1."),
    ]
    if top_k is not None:
        out += [
            (torch.softmax(logits / temperature, dim=-1), "top_k was ignored: keep only the top_k largest logits."),
            (torch.softmax(filtered(top_k, strict=False) / temperature, dim=-1),
             "top_k - 1 tokens were kept: drop only the logits strictly smaller than the k-th largest (logits < kth), "
             "so that the k-th itself stays."),
            (torch.softmax(filtered(top_k + 1) / temperature, dim=-1),
             "top_k + 1 tokens were kept: the threshold is the k-th largest logit, topk(logits, k).values[..., -1:]."),
            (torch.softmax(filtered(top_k, fill=0.0) / temperature, dim=-1),
             "the dropped logits were set to 0, but exp(0) = 1 still gives them probability: set them to -inf."),
        ]
    return out


def check_sampling_probs(
    fn: Callable,
    *,
    batch_size: int = 2,
    vocab_size: int = 10,
    temperature: float = 1.5,
    top_k: int | None = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Grade ``fn(logits, temperature=1.0, top_k=None)``: (B, vocab) logits -> (B, vocab) probabilities.

    Keep the ``top_k`` largest logits of each row (all when None or when top_k is
    at least the vocabulary size), divide by ``temperature``, softmax over the
    vocabulary: the distribution a sampler draws the next token from.
    """
    logits = seeded_randn(batch_size, vocab_size, seed=seed, dtype=dtype, scale=2.0)
    case = f"logits of shape {_fmt_shape(logits.shape)}, temperature={temperature}, top_k={top_k}, {dtype}"
    check_function(
        lambda z: fn(z, temperature=temperature, top_k=top_k),
        lambda z: reference_sampling_probs(z, temperature, top_k),
        [(case, (logits,))], name="sampling_probs",
        diagnoses=lambda z: _probs_variants(z, temperature, top_k),
        hint="kth = torch.topk(logits, min(top_k, vocab), dim=-1).values[:, -1:]; logits = logits.masked_fill(logits < kth, "
             "float('-inf')); return torch.softmax(logits / temperature, dim=-1).",
    )


def check_sample_next_token(
    fn: Callable,
    *,
    vocab_size: int = 6,
    temperature: float = 1.0,
    top_k: int | None = None,
    num_draws: int = 4000,
    seed: int = 0,
) -> None:
    """Grade ``fn(logits, temperature=0.0, top_k=None, generator=None)``: (B, vocab) logits -> (B, 1) ids.

    Temperature 0 must pick each row's largest logit. Otherwise a draw must come from
    the temperature-scaled, top-k-filtered softmax using ``generator`` and no other
    randomness. Judged on ``num_draws`` rows of one distribution: every draw allowed,
    the frequencies within 5 standard errors (+0.005) of the probabilities, the same
    draws for the same generator seed whatever the global random state, other draws for
    another seed. Any correct way of drawing (``torch.multinomial``, inverse CDF, ...)
    passes.
    """
    base = seeded_randn(1, vocab_size, seed=seed, scale=1.5)
    hint = ("probs = softmax(filtered logits / temperature, dim=-1); return torch.multinomial(probs, num_samples=1, "
            "generator=generator) (greedy, logits.argmax(dim=-1, keepdim=True), when temperature is 0).")
    # greedy
    greedy_logits = seeded_randn(3, vocab_size, seed=seed + 1)
    greedy_case = f"logits of shape {_fmt_shape(greedy_logits.shape)}, temperature=0.0, top_k={top_k}"
    with _seeded(seed):
        got = _call(fn, greedy_logits.clone(), temperature=0.0, top_k=top_k, generator=torch.Generator().manual_seed(seed),
                    what="sample_next_token", case=greedy_case, hint=hint)
    expected = greedy_logits.argmax(dim=-1, keepdim=True)
    check_shape(got, expected.shape, name="sample_next_token", case=greedy_case,
                hint="return a (B, 1) tensor of ids: argmax(dim=-1, keepdim=True) or multinomial(..., num_samples=1).")
    if not torch.equal(got.long(), expected):
        raise AssertionError(_message(
            "sample_next_token: with temperature 0 it must pick the largest logit of each row (greedy).", case=greedy_case,
            lines=[f"expected {expected.flatten().tolist()}", f"got      {got.flatten().tolist()}"], hint=hint))
    # sampling
    logits = base.expand(num_draws, vocab_size).clone()
    probs = reference_sampling_probs(base, temperature, top_k)[0].double()
    case = (f"{num_draws} rows of the same logits {_fmt_values(base[0], vocab_size)}, temperature={temperature}, "
            f"top_k={top_k}, generator seeded with {seed}")

    def draw(generator_seed: int, global_seed: int) -> torch.Tensor:
        with torch.random.fork_rng():
            torch.manual_seed(global_seed)  # must not matter
            out = _call(fn, logits.clone(), temperature=temperature, top_k=top_k,
                        generator=torch.Generator().manual_seed(generator_seed), what="sample_next_token", case=case, hint=hint)
        check_shape(out, (num_draws, 1), name="sample_next_token", case=case,
                    hint="return a (B, 1) tensor of ids, one draw per row (num_samples=1).")
        if out.dtype.is_floating_point or out.dtype == torch.bool:
            raise AssertionError(_message(f"sample_next_token: expected integer token ids, got dtype {out.dtype}.", case=case,
                                          hint="return the indices that torch.multinomial gives (torch.long)."))
        return out.long().flatten()

    first = draw(seed, 1)
    bad = first[(first < 0) | (first >= vocab_size)]
    if bad.numel():
        raise AssertionError(_message(f"sample_next_token: drew id {int(bad[0])}, outside the vocabulary 0..{vocab_size - 1}.",
                                      case=case, hint=hint))
    forbidden = sorted({int(t) for t in first.tolist() if probs[int(t)] == 0})
    if forbidden:
        raise AssertionError(_message(
            f"sample_next_token: drew token(s) {forbidden}, which top_k={top_k} filters out.", case=case,
            lines=[f"allowed tokens: {[i for i in range(vocab_size) if probs[i] > 0]}"],
            cause="the draw ignores the top-k filter: sample from the filtered probabilities.", hint=hint))
    freq = torch.bincount(first, minlength=vocab_size).double() / num_draws
    bound = 5 * torch.sqrt(probs * (1 - probs) / num_draws) + 0.005
    if bool(((freq - probs).abs() > bound).any()):
        candidates = [
            (torch.softmax(base[0].double(), dim=-1), "the temperature was ignored."),
            (torch.softmax(base[0].double() * temperature, dim=-1), "the logits were multiplied by the temperature instead of divided."),
            (F.one_hot(base[0].argmax(), vocab_size).double(), "it always picks the most likely token; draw at random from the probabilities."),
            (reference_sampling_probs(base, 1.0, top_k)[0].double(), "the temperature was ignored."),
        ]
        if top_k is not None:
            candidates.append((torch.softmax(base[0].double() / temperature, dim=-1), "top_k was ignored."))
        cause = next((why for p, why in candidates if bool(((freq - p).abs() <= 5 * torch.sqrt(p * (1 - p) / num_draws) + 0.005).all())), None)
        raise AssertionError(_message(
            "sample_next_token: the draws do not follow the scaled, filtered probabilities.", case=case,
            lines=[f"expected probabilities {_fmt_values(probs, vocab_size)}", f"observed frequencies   {_fmt_values(freq, vocab_size)}"],
            cause=cause, hint=hint))
    if not torch.equal(draw(seed, 2), first):
        raise AssertionError(_message(
            "sample_next_token: the same generator seed gave different draws when the global random state changed.", case=case,
            hint="draw with the generator you are given and nothing else: torch.multinomial(probs, 1, generator=generator)."))
    if int((probs > 0).sum()) > 1 and torch.equal(draw(seed + 7919, 1), first):  # top_k=1 leaves no choice
        raise AssertionError(_message(
            "sample_next_token: two different generator seeds gave exactly the same draws.", case=case,
            hint="use the generator argument for the random draw: torch.multinomial(probs, 1, generator=generator)."))


# --- chapter 6: classification -------------------------------------------------------------------


def _trainable(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _short_list(names: Sequence[str], n: int = 6) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


@_one_thread
def check_classification_head(
    fn: Callable,
    *,
    cfg: GPTConfig | None = None,
    num_classes: int = 2,
    train_last_blocks: int = 1,
    batch_size: int = 2,
    num_tokens: int = 5,
    seed: int = 0,
) -> None:
    """Grade ``fn(model, num_classes, train_last_blocks)``: turn a GPTModel into a classifier.

    As :func:`course_utils.classify.add_classification_head`: every parameter frozen,
    ``out_head`` replaced by a new ``nn.Linear(emb_dim, num_classes)`` (with bias),
    then the head, ``final_norm`` and the last ``train_last_blocks`` blocks trainable.
    The function changes the model in place and returns it. Checked: the head's shape,
    the exact set of trainable parameters, output shape (B, T, num_classes), and that
    the rest of the model still computes what it computed before.
    """
    cfg = cfg or grading_config(drop_rate=0.0)
    base = _tiny_gpt(cfg, seed)
    with _seeded(seed + 4):
        reference = _ref_add_classification_head(copy.deepcopy(base), num_classes, train_last_blocks)
    model = copy.deepcopy(base)
    case = (f"a GPTModel with {cfg.n_layers} blocks, emb_dim={cfg.emb_dim}; num_classes={num_classes}, "
            f"train_last_blocks={train_last_blocks}")
    hint = ("for p in model.parameters(): p.requires_grad = False; model.out_head = nn.Linear(cfg.emb_dim, num_classes); "
            "then set requires_grad = True on model.final_norm's and the last train_last_blocks blocks' parameters; return model.")
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        got = _call(fn, model, num_classes, train_last_blocks, what="add_classification_head", case=case, hint=hint)
    if got is None:
        got = model
    if not isinstance(got, nn.Module):
        raise AssertionError(_message(f"add_classification_head: expected the model back, got {type(got).__name__}.", case=case,
                                      hint="return model at the end."))
    head = getattr(got, "out_head", None)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (num_classes, cfg.emb_dim):
        shape = _fmt_shape(weight.shape) if isinstance(weight, torch.Tensor) else "no weight"
        raise AssertionError(_message(
            "add_classification_head: model.out_head is not a Linear layer from emb_dim to num_classes.", case=case,
            lines=[f"expected out_head.weight of shape {_fmt_shape((num_classes, cfg.emb_dim))}, got {shape}"],
            hint="model.out_head = nn.Linear(cfg.emb_dim, num_classes) (in_features = emb_dim, out_features = num_classes)."))
    if getattr(head, "bias", None) is None:
        raise AssertionError(_message("add_classification_head: the new head has no bias.", case=case,
                                      hint="nn.Linear(cfg.emb_dim, num_classes) has a bias by default: keep it."))
    want, have = set(_trainable(reference)), set(_trainable(got))
    if want != have:
        extra, missing = sorted(have - want), sorted(want - have)
        lines = [f"should be trainable: {_short_list(sorted(want))}"]
        if extra:
            lines.append(f"trainable but should be frozen: {_short_list(extra)}")
        if missing:
            lines.append(f"frozen but should be trainable: {_short_list(missing)}")
        if extra and any(n.startswith(("tok_emb", "pos_emb")) for n in extra):
            cause = "the base model's weights were left trainable: freeze every parameter first (requires_grad = False)."
        elif any(n.startswith("out_head") for n in missing):
            cause = "the new head is frozen: create it after the freezing loop (a new layer is trainable) or unfreeze it."
        elif any(n.startswith("final_norm") for n in missing):
            cause = "final_norm must be trainable too: the head reads its output."
        elif train_last_blocks == 0 and extra:
            cause = ("with train_last_blocks=0 no block may train; note that trf_blocks[-0:] is the WHOLE list "
                     "(-0 is 0): slice with trf_blocks[len(trf_blocks) - train_last_blocks:].")
        elif any(n.startswith("trf_blocks") for n in missing + extra):
            cause = (f"the wrong transformer blocks are trainable: unfreeze the LAST {train_last_blocks} "
                     f"(model.trf_blocks[{cfg.n_layers - train_last_blocks}:]), nearest the head.")
        else:
            cause = None
        raise AssertionError(_message("add_classification_head: the wrong parameters are trainable.", case=case,
                                      lines=lines, cause=cause, hint=hint))
    ids = _seeded_ints(cfg.vocab_size, batch_size, num_tokens, seed=seed + 2)
    got.eval()
    with torch.no_grad():
        logits = _call(got, ids, what="the classifier's forward", case=case)
    check_shape(logits, (batch_size, num_tokens, num_classes), name="classifier logits", case=case,
                hint="the model's forward is unchanged; only its out_head maps emb_dim to num_classes.")
    with torch.no_grad():
        reference.out_head.weight.copy_(head.weight)
        reference.out_head.bias.copy_(head.bias)
        expected = reference.eval()(ids)
    check_tensor_close(logits, expected, name="classifier logits", case=f"{case}, your head's weights copied into the reference",
                       hint="replace only model.out_head; the other weights must stay as they were (no re-initialising).")


def _classifier(cfg: GPTConfig, num_classes: int, seed: int) -> nn.Module:
    with _seeded(seed + 4):
        model = _ref_add_classification_head(_tiny_gpt(cfg, seed), num_classes, 1)
    perturb_parameters(model.out_head, seed + 3, std=0.5)  # varied predictions
    return model


def _label_loader(cfg: GPTConfig, num_examples: int, num_tokens: int, num_classes: int, batch_size: int, seed: int) -> DataLoader:
    ids = _seeded_ints(cfg.vocab_size, num_examples, num_tokens, seed=seed)
    labels = _seeded_ints(num_classes, num_examples, seed=seed + 1)
    return DataLoader(TensorDataset(ids, labels), batch_size=batch_size, shuffle=False,
                      generator=torch.Generator().manual_seed(seed))


@_one_thread
def check_accuracy_loader(
    fn: Callable,
    *,
    num_examples: int = 11,
    batch_size: int = 4,
    num_tokens: int = 6,
    num_classes: int = 2,
    num_batches: int | None = None,
    drop_rate: float = 0.0,
    seed: int = 0,
) -> None:
    """Grade ``fn(data_loader, model, device, num_batches=None)``: classification accuracy.

    The fraction of examples (not of batches) in the first ``num_batches`` batches
    whose last position's largest logit is the label, computed in eval mode. The
    classifier has seeded weights; with ``drop_rate > 0`` it is handed over in train
    mode, so skipping ``model.eval()`` shows.
    """
    cfg = grading_config(drop_rate=drop_rate)
    model = _classifier(cfg, num_classes, seed)
    loader = _label_loader(cfg, num_examples, num_tokens, num_classes, batch_size, seed + 5)
    case = (f"{num_examples} examples of {num_tokens} tokens in {len(loader)} batches of up to {batch_size}, "
            f"{num_classes} classes, num_batches={num_batches}, drop_rate={drop_rate}")
    expected = _ref_accuracy_loader(loader, model, DEVICE, num_batches=num_batches)
    model.train()
    hint = ("model.eval(); with torch.no_grad(): for each of the first n batches, predicted = "
            "model(input_batch)[:, -1, :].argmax(dim=-1); count (predicted == target_batch) and the examples; "
            "return correct / examples.")
    with torch.random.fork_rng():
        torch.manual_seed(seed + 9)
        got = _as_number(_call(fn, loader, model, DEVICE, num_batches, what="calc_accuracy_loader", case=case, hint=hint),
                         name="calc_accuracy_loader", case=case)

    def variants() -> list[tuple[float, str]]:
        model.eval()
        rows = []
        with torch.no_grad():
            for x, y in loader:
                logits = model(x)
                rows.append(((logits[:, -1].argmax(-1) == y).double(), (logits[:, 0].argmax(-1) == y).double()))
        n = len(rows) if num_batches is None else min(num_batches, len(rows))

        def acc(k: int, which: int = 0) -> float:
            hits = torch.cat([r[which] for r in rows[:k]]) if k else torch.zeros(0)
            return float(hits.mean()) if hits.numel() else float("nan")

        out = [(acc(n, 1), "the prediction was read from the FIRST position; read the last one: logits[:, -1, :]."),
               (100 * expected, "the accuracy was returned in percent; return a fraction between 0 and 1."),
               (sum(float(r[0].mean()) for r in rows[:n]) / max(n, 1),
                "the per-batch accuracies were averaged, but the last batch is smaller: divide the correct predictions "
                "by the number of examples."),
               (acc(len(rows)), "num_batches was ignored: use only the first num_batches batches.")]
        if n + 1 <= len(rows):
            out.append((acc(n + 1), "one batch too many (off by one): stop once num_batches batches are done."))
        out.append((float(sum(float(r[0].sum()) for r in rows[:n])), "the number of correct predictions was returned; divide it by the number of examples."))
        return out

    _check_number(got, expected, name="calc_accuracy_loader", case=case, tol=Tolerance(1e-6, 0.0), variants=variants,
                  hint=hint + (" With dropout in the model, model.eval() matters." if drop_rate > 0 else ""))


def check_classification_loss(
    fn: Callable,
    *,
    batch_size: int = 3,
    num_tokens: int = 5,
    num_classes: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Grade ``fn(input_batch, target_batch, model, device)``: cross-entropy of the last position's logits.

    inputs (B, T) token ids, targets (B,) class labels; the result a 0-dim tensor
    that keeps its graph.
    """
    cfg = grading_config(drop_rate=0.0)
    model = _classifier(cfg, num_classes, seed).to(dtype)
    ids = _seeded_ints(cfg.vocab_size, batch_size, num_tokens, seed=seed + 1)
    labels = _seeded_ints(num_classes, batch_size, seed=seed + 2)
    case = f"input_batch {_fmt_shape(ids.shape)}, target_batch {_fmt_shape(labels.shape)}, {num_classes} classes, {dtype}"
    hint = "logits = model(input_batch)[:, -1, :] (B, num_classes); return F.cross_entropy(logits, target_batch)."
    expected = _ref_classification_loss(ids, labels, model, DEVICE).detach()
    got = _call(fn, ids.clone(), labels.clone(), model, DEVICE, what="calc_loss_batch_classification", case=case, hint=hint)
    if not isinstance(got, torch.Tensor):
        raise AssertionError(_message(f"calc_loss_batch_classification: expected a tensor, got {type(got).__name__}.", case=case,
                                      hint="return the loss tensor (loss.backward() needs it): no .item()."))
    check_shape(got, (), name="calc_loss_batch_classification", case=case, hint="average over the batch: one number.")
    if not got.requires_grad:
        raise AssertionError(_message("calc_loss_batch_classification: the loss has no gradient graph.", case=case,
                                      hint="do not use torch.no_grad() or .detach() here: training calls loss.backward()."))

    def diagnoses():
        with torch.no_grad():
            logits = model(ids)
        last = logits[:, -1, :]
        return [
            (F.cross_entropy(logits[:, 0, :], labels), "the FIRST position's logits were used; a GPT's last token has seen the whole text: logits[:, -1, :]."),
            (F.cross_entropy(logits.flatten(0, 1), labels.repeat_interleave(num_tokens)),
             "every position was scored against the label; use the last position only."),
            (F.cross_entropy(torch.softmax(last, dim=-1), labels), "a softmax was applied before F.cross_entropy; pass the raw logits."),
            (F.cross_entropy(last, labels, reduction="sum"), "the losses were summed; average them over the batch."),
        ]

    check_tensor_close(got, expected, name="calc_loss_batch_classification", case=case, diagnoses=diagnoses, hint=hint)


# --- chapter 7: prompts and batches -------------------------------------------------------------

_FORMAT_ENTRIES = (
    {"instruction": "Rewrite the sentence in the passive voice.", "input": "The chef cooked the meal.", "output": "The meal was cooked by the chef."},
    {"instruction": "Name the largest planet of the solar system.", "input": "", "output": "Jupiter."},
    {"instruction": "What is the opposite of 'ancient'?", "output": "Modern."},
)


def check_format_input(fn: Callable, *, entries: Sequence[dict[str, str]] | None = None) -> None:
    """Grade ``fn(entry)``: the Alpaca-style prompt of an instruction example.

    As :func:`course_utils.instruct.format_input`: the preamble, a blank line,
    ``### Instruction:`` and the instruction, then, only when the input is present
    and not empty, a blank line, ``### Input:`` and the input. Nothing after it (the
    response header belongs to the full training text).
    """
    entries = list(entries) if entries is not None else list(_FORMAT_ENTRIES)
    hint = ('f"{PREAMBLE}\\n\\n### Instruction:\\n{entry[\'instruction\']}", plus f"\\n\\n### Input:\\n{entry[\'input\']}" '
            "when entry.get('input') is not empty.")
    for entry in entries:
        case = f"entry {({k: entry[k] for k in ('instruction', 'input') if k in entry})!r}"
        expected = _ref_format_input(entry)
        got = _call(fn, dict(entry), what="format_input", case=case, hint=hint)
        if not isinstance(got, str):
            raise AssertionError(_message(f"format_input: expected a str, got {type(got).__name__}.", case=case,
                                          hint="build the text and return it."))
        if got == expected:
            continue
        at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        lines = [f"expected {expected!r}", f"got      {got!r}",
                 f"first difference at character {at}: expected {expected[at:at + 20]!r}, got {got[at:at + 20]!r}"]
        cause = None
        if "### Response" in got and "### Response" not in expected:
            cause = "the response header was included: format_input ends after the instruction (or the input)."
        elif "### Input" in got and "### Input" not in expected:
            cause = "the '### Input:' section was added for an entry without input: leave it out when the input is missing or ''."
        elif "### Input" in expected and "### Input" not in got:
            cause = "the entry's input is missing: add '\\n\\n### Input:\\n' and the input when it is not empty."
        elif got.split() == expected.split():
            cause = "the words are right but the spacing is not: sections are separated by one blank line ('\\n\\n'), each header is followed by '\\n'."
        raise AssertionError(_message("format_input: wrong text.", case=case, lines=lines, cause=cause, hint=hint))


def check_collate_masks(
    fn: Callable,
    *,
    lengths: Sequence[int] = (6, 3, 5),
    prompt_lengths: Sequence[int] | None = (3, 2, 4),
    eot_inside: bool = False,
    pad_token_id: int = GPT2_EOT_ID,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
    seed: int = 0,
) -> None:
    """Grade ``fn(batch, pad_token_id=, ignore_index=, allowed_max_length=, mask_prompt=)`` on masking.

    With ``prompt_lengths`` the items are ``(ids, prompt_length)`` pairs and
    ``mask_prompt=True``: the targets of the prompt's positions (the first
    ``prompt_length - 1``) become ``ignore_index`` too. With ``eot_inside`` the first
    example holds ``pad_token_id`` in its text: masking goes by position (what comes
    after each example's end), so that token stays a target.
    Compared with :func:`course_utils.instruct.instruction_collate`.
    """
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in lengths]
    if eot_inside:
        ids[0][len(ids[0]) // 2] = pad_token_id
    mask_prompt = prompt_lengths is not None
    batch = [(list(x), p) for x, p in zip(ids, prompt_lengths)] if mask_prompt else [list(x) for x in ids]
    case = (f"{len(batch)} examples of lengths {list(lengths)}"
            f"{f', prompt lengths {list(prompt_lengths)}, mask_prompt=True' if mask_prompt else ', mask_prompt=False'}"
            f"{f', token {pad_token_id} inside the first text' if eot_inside else ''}, allowed_max_length={allowed_max_length}")
    kwargs = dict(pad_token_id=pad_token_id, ignore_index=ignore_index, allowed_max_length=allowed_max_length, mask_prompt=mask_prompt)
    exp_in, exp_tg = _ref_instruction_collate(copy.deepcopy(batch), **kwargs)
    got = _call(fn, copy.deepcopy(batch), what="your collate function", case=case, **kwargs)
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        raise AssertionError(_message("your collate function must return (inputs, targets).", case=case))
    hint = ("mask by position: for an example of n tokens, targets n-1 (the first end-of-text) stays, later ones are "
            f"{ignore_index}; with mask_prompt, also targets[:prompt_length - 1] = {ignore_index}.")
    for what, g_t, e_t in (("inputs", got[0], exp_in), ("targets", got[1], exp_tg)):
        check_shape(g_t, e_t.shape, name=what, case=case)
        if torch.equal(g_t.long(), e_t):
            continue
        row = int((g_t.long() != e_t).any(dim=1).nonzero()[0])
        cause = None
        if what == "targets":
            plain_in, plain_tg = _ref_instruction_collate([list(x) for x in ids], pad_token_id, ignore_index, allowed_max_length)
            if mask_prompt and torch.equal(g_t.long(), plain_tg):
                cause = "the prompt was not masked: with mask_prompt=True, set the prompt's targets to the ignore index."
            elif eot_inside and bool((g_t.long()[0] == ignore_index).sum() > (e_t[0] == ignore_index).sum()):
                cause = (f"the end-of-text token inside the text was masked too: find each example's end by its length "
                         f"(position), not by looking for the value {pad_token_id}.")
            elif mask_prompt:
                for shift, why in ((1, "one target too many was masked: target j predicts token j + 1, so the prompt's "
                                       "targets are the first prompt_length - 1 positions."),
                                   (-1, "one target too few was masked: mask the first prompt_length - 1 targets.")):
                    variant = plain_tg.clone()
                    for r, (_, p) in enumerate(batch):
                        variant[r, : max(p - 1 + shift, 0)] = ignore_index
                    if torch.equal(g_t.long(), variant):
                        cause = why
        raise AssertionError(_message(
            f"{what}: wrong values in row {row}.", case=case,
            lines=[f"expected {e_t[row].tolist()}", f"got      {g_t[row].tolist()}"], cause=cause, hint=hint))


# --- appendix A: tensors, autograd, a training loop ---------------------------------------------


def check_pairwise_sq_distances(
    fn: Callable,
    *,
    num_a: int = 4,
    num_b: int = 3,
    dim: int = 2,
    batch_shape: Sequence[int] = (),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Grade ``fn(a, b)``: a (..., N, d), b (..., M, d) -> (..., N, M) squared Euclidean distances."""
    a = seeded_randn(*batch_shape, num_a, dim, seed=seed, dtype=dtype)
    b = seeded_randn(*batch_shape, num_b, dim, seed=seed + 1, dtype=dtype)
    case = f"a of shape {_fmt_shape(a.shape)}, b of shape {_fmt_shape(b.shape)}, {dtype}"

    def reference(x, y):
        return ((x.unsqueeze(-2) - y.unsqueeze(-3)) ** 2).sum(dim=-1)

    def diagnoses(x, y):
        d2 = reference(x, y)
        return [(d2.sqrt(), "these are the distances; return their squares (skip the square root)."),
                ((x.unsqueeze(-2) - y.unsqueeze(-3)).sum(dim=-1) ** 2, "the differences were summed before squaring: square each coordinate's difference, then sum."),
                ((x.unsqueeze(-2) - y.unsqueeze(-3)).abs().sum(dim=-1), "this is the L1 (Manhattan) distance; square the differences.")]

    check_function(fn, reference, [(case, (a, b))], name="pairwise_sq_distances", diagnoses=diagnoses,
                   hint="a[..., :, None, :] - b[..., None, :, :] broadcasts to (..., N, M, d): square and sum over the last dimension.")


def _ref_loss_and_grads(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    w = w.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    loss = F.binary_cross_entropy_with_logits(x @ w + b, y)
    grad_w, grad_b = torch.autograd.grad(loss, (w, b))
    return loss.detach(), grad_w, grad_b


def check_loss_and_grads(
    fn: Callable,
    *,
    num_examples: int = 8,
    dim: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Grade ``fn(x, y, w, b)`` -> ``(loss, grad_w, grad_b)`` for logistic regression.

    x (N, d), y (N,) zeros and ones, w (d,), b (): ``loss`` is the mean binary
    cross-entropy of ``sigmoid(x @ w + b)`` against ``y``; the gradients are those of
    ``loss`` with respect to ``w`` and ``b`` (same shapes as w and b). Autograd or
    derived by hand: both pass.
    """
    x = seeded_randn(num_examples, dim, seed=seed, dtype=dtype)
    y = _seeded_ints(2, num_examples, seed=seed + 1).to(dtype)
    w = seeded_randn(dim, seed=seed + 2, dtype=dtype)
    b = seeded_randn(1, seed=seed + 3, dtype=dtype).reshape(())
    case = f"x {_fmt_shape(x.shape)}, y {_fmt_shape(y.shape)}, w {_fmt_shape(w.shape)}, b (), {dtype}"

    def diagnoses(x, y, w, b):
        def with_grads(loss_of: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, ...]:
            w_, b_ = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
            loss = loss_of(x @ w_ + b_)
            return (loss.detach(), *torch.autograd.grad(loss, (w_, b_)))

        return [
            (with_grads(lambda z: F.binary_cross_entropy_with_logits(z, y, reduction="sum")),
             "the losses were summed; average them over the examples (the gradients are N times too big)."),
            (with_grads(lambda z: ((torch.sigmoid(z) - y) ** 2).mean()), "this is the mean squared error; use binary cross-entropy."),
            (with_grads(lambda z: F.binary_cross_entropy_with_logits(z, 1 - y)), "the labels were flipped: y = 1 must push sigmoid(x @ w + b) up."),
        ]

    check_function(fn, _ref_loss_and_grads, [(case, (x, y, w, b))], name="loss_and_grads", diagnoses=diagnoses,
                   hint="w = w.clone().requires_grad_(); b = b.clone().requires_grad_(); loss = "
                        "F.binary_cross_entropy(torch.sigmoid(x @ w + b), y); loss.backward(); return loss.detach(), w.grad, b.grad.")


class _RefMLP(nn.Module):
    """Appendix A's classifier: Linear -> ReLU -> Linear -> ReLU -> Linear, in ``self.layers``."""

    def __init__(self, n_inputs: int = 2, n_hidden: int = 32, n_classes: int = 2):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(n_inputs, n_hidden), nn.ReLU(),
            nn.Linear(n_hidden, n_hidden), nn.ReLU(),
            nn.Linear(n_hidden, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, n_inputs) -> (B, n_classes)
        return self.layers(x)


def _mlp_variants(ref: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, str]]:
    l1, l2, l3 = ref.layers[0], ref.layers[2], ref.layers[4]
    return [
        (l3(l2(l1(x))), "there is no activation between the layers: put nn.ReLU() after the first and the second Linear."),
        (torch.relu(l3(torch.relu(l2(torch.relu(l1(x)))))), "a ReLU follows the last layer: the outputs are logits, which may be negative."),
        (l3(torch.relu(l2(l1(x)))), "the ReLU after the first Linear layer is missing."),
        (l3(l2(torch.relu(l1(x)))), "the ReLU after the second Linear layer is missing."),
    ]


def check_mlp(
    cls: Callable,
    *,
    n_inputs: int = 2,
    n_hidden: int = 32,
    n_classes: int = 2,
    batch_size: int = 5,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Grade ``cls(n_inputs, n_hidden, n_classes)``: two hidden ReLU layers of width n_hidden, logits out."""
    case = f"x of shape ({batch_size}, {n_inputs}), n_hidden={n_hidden}, n_classes={n_classes}, {dtype}"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        student = _build(cls, (n_inputs, n_hidden, n_classes), {}, "MLP", case).to(dtype)
        reference = _RefMLP(n_inputs, n_hidden, n_classes).to(dtype)
    x = seeded_randn(batch_size, n_inputs, seed=seed + 1, dtype=dtype)
    check_module_against_reference(
        student, reference, [(case, (x,))], name="MLP", perturb_seed=seed, diagnoses=_mlp_variants,
        transfer_hint="create nn.Linear(n_inputs, n_hidden), nn.Linear(n_hidden, n_hidden) and nn.Linear(n_hidden, n_classes), in that order.",
        hint="self.layers = nn.Sequential(Linear(n_inputs, n_hidden), ReLU(), Linear(n_hidden, n_hidden), ReLU(), Linear(n_hidden, n_classes)).",
    )


def _ref_train_epochs(model: nn.Module, train_loader: DataLoader, optimizer: torch.optim.Optimizer, num_epochs: int,
                      mistake: str | None = None) -> list[float]:
    """Per-epoch mean of the batch losses (cross-entropy); ``mistake`` for diagnoses."""
    epoch_losses = []
    for _ in range(num_epochs):
        model.train()
        batch_losses = []
        for features, labels in train_loader:
            loss = F.cross_entropy(model(features), labels)
            if mistake != "no_zero_grad":
                optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            batch_losses.append(loss.item())
        if mistake == "last_batch":
            epoch_losses.append(batch_losses[-1])
        elif mistake == "sum":
            epoch_losses.append(sum(batch_losses))
        else:
            epoch_losses.append(sum(batch_losses) / len(batch_losses))
    return epoch_losses


_EPOCH_MISTAKES = {
    "no_zero_grad": "the gradients were never reset, so they pile up: call optimizer.zero_grad() every step.",
    "last_batch": "each entry is the last batch's loss; record the mean of all the epoch's batch losses.",
    "sum": "each entry is the sum of the batch losses; divide by the number of batches.",
}


@_one_thread
def check_train_epochs(
    fn: Callable,
    *,
    num_epochs: int = 10,
    num_points: int = 200,
    batch_size: int = 20,
    lr: float = 0.01,
    n_hidden: int = 32,
    threshold: float | None = 0.1,
    seed: int = 0,
) -> None:
    """Grade ``fn(model, train_loader, optimizer, num_epochs)`` -> a list of per-epoch mean losses.

    Each epoch: model.train(), then for every batch a cross-entropy loss, zero_grad,
    backward, step; an epoch's entry is the mean of its batch losses (``loss.item()``).
    Run on appendix A's MLP and two half-moons with Adam, against the reference loop
    with the same model, shuffling and random state: the losses must match, two runs
    must give the same numbers (determinism), the loss must fall, and (when given)
    the last epoch's loss must be below ``threshold``.
    """
    points, labels = make_moons(num_points, seed=seed)
    case = (f"MLP(2, {n_hidden}, 2) on {num_points} half-moon points, batch_size={batch_size} (shuffled, seeded), "
            f"Adam(lr={lr}), num_epochs={num_epochs}")

    def run(loop: Callable, mistake: str | None = None, student: bool = False) -> list:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = _RefMLP(2, n_hidden, 2)
            optimizer = torch.optim.Adam(model.parameters(), lr=lr)
            loader = DataLoader(TensorDataset(points, labels), batch_size=batch_size, shuffle=True,
                                generator=torch.Generator().manual_seed(seed + 1))
            if student:
                return _call(loop, model, loader, optimizer, num_epochs, what="train_epochs", case=case)
            return loop(model, loader, optimizer, num_epochs, mistake=mistake)

    expected = run(_ref_train_epochs)
    got = run(fn, student=True)
    if not isinstance(got, (list, tuple)) or len(got) != num_epochs:
        what = f"{type(got).__name__}" + (f" of length {len(got)}" if isinstance(got, (list, tuple)) else "")
        raise AssertionError(_message(f"train_epochs: expected a list of {num_epochs} losses (one per epoch), got {what}.",
                                      case=case, hint="append the epoch's mean loss once per epoch and return the list."))
    got_t = torch.tensor([_as_number(v, name="train_epochs entries", case=case) for v in got], dtype=torch.float64)
    again = torch.tensor([_as_number(v, name="train_epochs entries", case=case) for v in run(fn, student=True)], dtype=torch.float64)
    if not torch.equal(got_t, again):
        raise AssertionError(_message(
            "train_epochs: two runs with the same seeds gave different losses.", case=case,
            lines=[f"first run  {_fmt_values(got_t, num_epochs)}", f"second run {_fmt_values(again, num_epochs)}"],
            hint="use only the model, loader and optimizer you are given (no new random state, no state kept between calls)."))
    check_tensor_close(got_t, torch.tensor(expected, dtype=torch.float64), name="train_epochs: the epoch losses", case=case,
                       tol=Tolerance(1e-4, 1e-4),
                       diagnoses=lambda: [(torch.tensor(run(_ref_train_epochs, m), dtype=torch.float64), why)
                                          for m, why in _EPOCH_MISTAKES.items()],
                       hint="for each batch: loss = F.cross_entropy(model(features), labels); optimizer.zero_grad(); "
                            "loss.backward(); optimizer.step(); keep loss.item(). Append the mean of the epoch's values.")
    if not got_t[-1] < got_t[0]:
        raise AssertionError(_message("train_epochs: the loss did not go down.", case=case,
                                      lines=[f"losses {_fmt_values(got_t, num_epochs)}"]))
    if threshold is not None and not float(got_t[-1]) < threshold:
        raise AssertionError(_message(
            f"train_epochs: the last epoch's loss {_fmt_num(float(got_t[-1]))} is not below {threshold}.", case=case,
            lines=[f"losses {_fmt_values(got_t, num_epochs)}"]))


# --- appendix D: learning-rate schedule, gradient clipping -------------------------------------


def _schedule_variants(total: int, peak: float, warmup: int, initial: float, minimum: float) -> list[tuple[Callable[[int], float], str]]:
    decay = total - 1 - warmup

    def cosine(step: int, progress: float, low: float = minimum, high: float = peak) -> float:
        return low + (high - low) * 0.5 * (1 + math.cos(math.pi * progress))

    def make(warm: Callable[[int], float], tail: Callable[[int], float]) -> Callable[[int], float]:
        return lambda s: warm(s) if s < warmup else tail(s)

    def ref_warm(s: int) -> float:
        return initial + (peak - initial) * s / warmup

    def ref_tail(s: int) -> float:
        return peak if decay <= 0 else cosine(s, min(1.0, (s - warmup) / decay))

    out = [
        (make(lambda s: initial + (peak - initial) * (s + 1) / warmup, ref_tail),
         "the warm-up is one step ahead: step 0 must be at initial_lr (initial_lr + (peak_lr - initial_lr) * step / warmup_steps)."),
        (make(ref_warm, lambda s: cosine(s, min(1.0, (s - warmup) / (total - warmup)))),
         "the cosine does not reach min_lr: progress = (step - warmup_steps) / (total_steps - 1 - warmup_steps), so the "
         "last step (total_steps - 1) is at min_lr."),
        (make(ref_warm, lambda s: peak if decay <= 0 else peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / decay)))),
         "the cosine ends at 0 instead of min_lr: min_lr + (peak_lr - min_lr) * 0.5 * (1 + cos(pi * progress))."),
        (make(ref_warm, lambda s: peak if decay <= 0 else cosine(s, (s - warmup) / decay)),
         "steps past the end follow the cosine back up: clamp the progress at 1 (min(1.0, ...)) so they stay at min_lr."),
        (make(ref_warm, lambda s: cosine(s, min(1.0, s / max(total - 1, 1)))),
         "the cosine's progress counts from step 0; count it from the end of the warm-up (step - warmup_steps)."),
        (make(ref_warm, lambda s: peak if decay <= 0 else minimum + (peak - minimum) * (1 - min(1.0, (s - warmup) / decay))),
         "the decay is a straight line; it follows half a cosine: 0.5 * (1 + cos(pi * progress))."),
        (make(lambda s: peak * s / warmup, ref_tail), "the warm-up starts from 0 instead of initial_lr."),
    ]
    if warmup >= 2:
        out.append((make(lambda s: initial + (peak - initial) * s / (warmup - 1), ref_tail),
                    "the warm-up reaches peak_lr one step early: divide by warmup_steps, so step warmup_steps is the first at the peak."))
    return out


def check_lr_schedule(
    fn: Callable,
    *,
    total_steps: int = 20,
    peak_lr: float = 0.01,
    warmup_steps: int = 5,
    initial_lr: float = 0.0,
    min_lr: float = 0.0,
    extra_steps: int = 2,
) -> None:
    """Grade ``fn(step, total_steps, peak_lr, warmup_steps, initial_lr=0.0, min_lr=0.0)`` -> a learning rate.

    Compared with :func:`course_utils.train.lr_at_step` at every step from 0 to
    ``total_steps - 1 + extra_steps`` (steps past the end stay at min_lr): a linear
    warm-up from initial_lr at step 0 (peak_lr first reached at step warmup_steps),
    then half a cosine from peak_lr to min_lr, reached at the last step; when no step
    is left for the decay, the rate stays at peak_lr.
    """
    case = (f"total_steps={total_steps}, peak_lr={peak_lr}, warmup_steps={warmup_steps}, initial_lr={initial_lr}, "
            f"min_lr={min_lr}, steps 0..{total_steps - 1 + extra_steps}")
    steps = list(range(total_steps + extra_steps))
    hint = ("step < warmup_steps: initial_lr + (peak_lr - initial_lr) * step / warmup_steps; otherwise progress = "
            "min(1, (step - warmup_steps) / (total_steps - 1 - warmup_steps)) and min_lr + (peak_lr - min_lr) * 0.5 * "
            "(1 + math.cos(math.pi * progress)); peak_lr when total_steps - 1 - warmup_steps <= 0.")
    expected = [_ref_lr_at_step(s, total_steps, peak_lr, warmup_steps, initial_lr, min_lr) for s in steps]
    got = []
    for s in steps:
        value = _call(fn, s, total_steps=total_steps, peak_lr=peak_lr, warmup_steps=warmup_steps, initial_lr=initial_lr,
                      min_lr=min_lr, what="lr_at_step", case=f"step={s}, {case}", hint=hint)
        got.append(_as_number(value, name="lr_at_step", case=f"step={s}, {case}"))
    tol = Tolerance(1e-12, 1e-7)
    bad = [s for s in steps if not _close(got[s], expected[s], tol)]
    if not bad:
        return
    shown = sorted({0, max(warmup_steps - 1, 0), warmup_steps, total_steps - 1, bad[0], steps[-1]} & set(steps))
    lines = [f"first wrong step: {bad[0]} ({len(bad)} of {len(steps)} steps differ)"]
    lines += [f"step {s:3d}: expected {_fmt_num(expected[s])}, got {_fmt_num(got[s])}" for s in shown]
    cause = None
    for variant, why in _schedule_variants(total_steps, peak_lr, warmup_steps, initial_lr, min_lr):
        try:
            values = [variant(s) for s in steps]
        except (ZeroDivisionError, ValueError):
            continue
        if values != expected and all(_close(g, v, tol) for g, v in zip(got, values)):
            cause = why
            break
    raise AssertionError(_message("lr_at_step: wrong learning rates.", case=case, lines=lines, cause=cause, hint=hint))


def _grad_params(shapes: Sequence[Sequence[int]], scale: float, seed: int, dtype: torch.dtype,
                 missing: bool) -> list[nn.Parameter]:
    params = []
    for i, shape in enumerate(shapes):
        p = nn.Parameter(seeded_randn(*shape, seed=seed + 2 * i, dtype=dtype))
        p.grad = seeded_randn(*shape, seed=seed + 2 * i + 1, dtype=dtype, scale=scale)
        params.append(p)
    if missing:
        params.insert(1, nn.Parameter(torch.ones(3, dtype=dtype)))  # a parameter that got no gradient
    return params


def check_clip_grad_norm(
    fn: Callable,
    *,
    shapes: Sequence[Sequence[int]] = ((3, 4), (4,), (2, 2, 2)),
    max_norm: float = 1.0,
    scale: float = 1.0,
    missing_grad: bool = False,
    as_generator: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Grade ``fn(parameters, max_norm)``: clip the gradients' total norm, return the norm before clipping.

    As ``torch.nn.utils.clip_grad_norm_``: the L2 norm of all gradients together (as
    one long vector); when it exceeds ``max_norm`` every gradient is multiplied by
    ``max_norm / (total_norm + 1e-6)``, in place; otherwise nothing changes.
    Parameters without a gradient are skipped. With ``as_generator`` the parameters
    come as a generator, which can be iterated only once.
    """
    student = _grad_params(shapes, scale, seed, dtype, missing_grad)
    reference = _grad_params(shapes, scale, seed, dtype, missing_grad)
    original = [None if p.grad is None else p.grad.clone() for p in reference]
    expected_norm = float(torch.nn.utils.clip_grad_norm_(reference, max_norm))
    case = (f"{len(student)} parameters of shapes {[tuple(p.shape) for p in student]}"
            f"{' (one without a gradient)' if missing_grad else ''}, total gradient norm {_fmt_num(expected_norm)}, "
            f"max_norm={max_norm}{', given as a generator' if as_generator else ''}, {dtype}")
    hint = ("params = [p for p in parameters if p.grad is not None]; total = torch.sqrt(sum((p.grad ** 2).sum() for p in "
            "params)); if total > max_norm: multiply every p.grad by max_norm / (total + 1e-6) (p.grad.mul_(...)); return total.")
    arg = (p for p in student) if as_generator else list(student)
    got_norm = _call(fn, arg, max_norm, what="clip_grad_norm", case=case,
                     hint=hint if not missing_grad else "skip parameters whose .grad is None.")
    got_norm = _as_number(got_norm, name="clip_grad_norm's return value (the total norm)", case=case,
                          hint="return the total norm measured before clipping.")

    def variants() -> list[tuple[list, str]]:
        grads = [g for g in original if g is not None]
        total = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        per_param = [g * min(1.0, max_norm / (float(g.norm()) + 1e-6)) for g in grads]
        always = [g * max_norm / (float(total) + 1e-6) for g in grads]
        sum_norms = sum(float(g.norm()) for g in grads)
        by_sum = [g * min(1.0, max_norm / (sum_norms + 1e-6)) for g in grads]
        by_value = [g.clamp(-max_norm, max_norm) for g in grads]
        unchanged = "the gradients were not changed: multiply each p.grad in place (p.grad.mul_(coef)) or assign p.grad = p.grad * coef."
        if as_generator:
            unchanged = ("the gradients were not changed. `parameters` may be a generator (model.parameters()), which is "
                         "empty the second time you loop over it: turn it into a list first.")
        return [(per_param, "each gradient was clipped on its own; clip the TOTAL norm of all gradients together, with one "
                            "factor for all of them."),
                (always, "the gradients were scaled although the total norm is below max_norm: scale only when total > max_norm."),
                (by_sum, "the norms of the gradients were added up; the total norm is the square root of the sum of all squares."),
                (by_value, "each element was clamped to [-max_norm, max_norm] (that is clipping by value); clip the total norm."),
                (grads, unchanged)]

    base_tol = default_tolerance(dtype)
    # dividing by total_norm or by total_norm + 1e-6 are both fine: allow for the difference
    tol = Tolerance(base_tol.atol, base_tol.rtol + 2e-6 / max_norm)
    for i, (s_p, r_p) in enumerate(zip(student, reference)):
        if r_p.grad is None:
            if s_p.grad is not None:
                raise AssertionError(_message(f"clip_grad_norm: parameter {i} had no gradient but has one now.", case=case,
                                              hint="leave parameters whose .grad is None alone."))
            continue
        index = [j for j, p in enumerate(reference) if p.grad is not None].index(i)
        check_tensor_close(s_p.grad, r_p.grad, name=f"clip_grad_norm: the gradient of parameter {i}", case=case, tol=tol,
                           diagnoses=lambda index=index: [(v[index], why) for v, why in variants()], hint=hint)
    _check_number(got_norm, expected_norm, name="clip_grad_norm's return value (the total norm before clipping)", case=case,
                  tol=tol, variants=lambda: [(sum(float(g.norm()) for g in original if g is not None),
                                              "the norms of the gradients were added up; the total norm is the square root "
                                              "of the sum of all squares."),
                                             (min(expected_norm, max_norm), "the norm after clipping was returned; return the one before.")],
                  hint=hint)


# --- appendix E: LoRA ---------------------------------------------------------------------------


def _lora_matrices(module: nn.Module, in_dim: int, out_dim: int, rank: int, *, name: str, case: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (in, rank) A and (rank, out) B of a student's LoRA layer (nn.Linear A/B accepted, transposed)."""
    found = []
    for attr, shape in (("A", (in_dim, rank)), ("B", (rank, out_dim))):
        value = getattr(module, attr, None)
        if isinstance(value, nn.Linear):
            value = value.weight.T
        if not isinstance(value, torch.Tensor):
            raise AssertionError(_message(
                f"{name}: no matrix `{attr}` found.", case=case,
                hint=f"create self.A = nn.Parameter(...) of shape (in_dim, rank) = {_fmt_shape((in_dim, rank))} and "
                     f"self.B = nn.Parameter(...) of shape (rank, out_dim) = {_fmt_shape((rank, out_dim))}."))
        if tuple(value.shape) != shape:
            raise AssertionError(_message(
                f"{name}: {attr} has shape {_fmt_shape(value.shape)}; expected {_fmt_shape(shape)}.", case=case,
                hint="A is (in_dim, rank) and B is (rank, out_dim), so that x @ A @ B maps in_dim to out_dim."))
        found.append(value)
    return found[0], found[1]


def _set_lora(module: nn.Module, A: torch.Tensor, B: torch.Tensor) -> None:
    """Write A (in, rank) and B (rank, out) into a student's LoRA layer."""
    with torch.no_grad():
        for attr, value in (("A", A), ("B", B)):
            target = getattr(module, attr)
            if isinstance(target, nn.Linear):
                target.weight.copy_(value.T)
            else:
                target.copy_(value)


def _check_fresh_lora(student: nn.Module, A: torch.Tensor, B: torch.Tensor, *, name: str, case: str) -> None:
    if not bool((B == 0).all()):
        raise AssertionError(_message(
            f"{name}: B does not start at zero.", case=case, lines=[f"B = {_fmt_values(B)}"],
            cause="with a random B the update x @ A @ B is not zero at the start, so the adapted model no longer "
                  "computes what the pretrained model computed.",
            hint="self.B = nn.Parameter(torch.zeros(rank, out_dim))."))
    A, B = A.detach(), B.detach()
    if bool((A == 0).all()) or float(A.std()) == 0.0:
        raise AssertionError(_message(
            f"{name}: A does not start random.", case=case, lines=[f"A = {_fmt_values(A)}"],
            cause="if A and B both start constant (e.g. zero), their gradients stay zero or equal and LoRA learns nothing.",
            hint="self.A = nn.Parameter(torch.empty(in_dim, rank)); nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))."))
    trainable = {id(p) for p in student.parameters() if p.requires_grad}
    for attr in ("A", "B"):
        value = getattr(student, attr)
        params = list(value.parameters()) if isinstance(value, nn.Module) else [value]
        if not all(isinstance(p, nn.Parameter) and id(p) in trainable for p in params):
            raise AssertionError(_message(f"{name}: {attr} is not a trainable parameter.", case=case,
                                          hint="wrap it in nn.Parameter(...) so that the optimizer trains it."))


def check_lora_layer(
    cls: Callable,
    *,
    in_dim: int = 6,
    out_dim: int = 4,
    rank: int = 2,
    alpha: float = 4.0,
    batch_shape: Sequence[int] = (3,),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Grade ``cls(in_dim, out_dim, rank, alpha)``: ``x -> (alpha / rank) * x @ A @ B``.

    A (in_dim, rank) starts random and B (rank, out_dim) at zeros, so a fresh layer
    outputs zeros; both are trainable. After seeded values are written into A and B the
    output must equal :class:`course_utils.lora.LoRALayer`'s (scaling alpha / rank).
    """
    case = f"x of shape {_fmt_shape((*batch_shape, in_dim))}, in_dim={in_dim}, out_dim={out_dim}, rank={rank}, alpha={alpha}, {dtype}"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        student = _build(cls, (in_dim, out_dim, rank, alpha), {}, "LoRALayer", case).to(dtype)
    A, B = _lora_matrices(student, in_dim, out_dim, rank, name="LoRALayer", case=case)
    _check_fresh_lora(student, A, B, name="LoRALayer", case=case)
    x = seeded_randn(*batch_shape, in_dim, seed=seed + 1, dtype=dtype)
    with torch.no_grad():
        fresh = _call(student, x.clone(), what="LoRALayer.forward", case=case)
    check_tensor_close(fresh, torch.zeros(*batch_shape, out_dim, dtype=dtype), name="LoRALayer, freshly created", case=case,
                       hint="with B = 0 the output x @ A @ B is zero: return scaling * (x @ self.A @ self.B).")
    new_A = seeded_randn(in_dim, rank, seed=seed + 2, dtype=dtype)
    new_B = seeded_randn(rank, out_dim, seed=seed + 3, dtype=dtype)
    _set_lora(student, new_A, new_B)
    with _seeded(seed + 4):
        reference = _RefLoRALayer(in_dim, out_dim, rank, alpha).to(dtype)
    with torch.no_grad():
        reference.A.copy_(new_A)
        reference.B.copy_(new_B)
        expected = reference(x)
        got = _call(student, x.clone(), what="LoRALayer.forward", case=case)
    product = x @ new_A @ new_B
    check_tensor_close(
        got, expected, name="LoRALayer", case=f"{case}, after random values were written into A and B",
        diagnoses=[(alpha * product, "the update is multiplied by alpha; the course scales by alpha / rank."),
                   (product, "the update is not scaled: multiply x @ A @ B by alpha / rank."),
                   (rank / alpha * product, "the scaling is upside down: alpha / rank, not rank / alpha.")],
        hint="self.scaling = alpha / rank in __init__; forward returns self.scaling * (x @ self.A @ self.B).")


def check_linear_with_lora(
    cls: Callable,
    *,
    in_dim: int = 5,
    out_dim: int = 3,
    rank: int = 2,
    alpha: float = 8.0,
    bias: bool = True,
    batch_shape: Sequence[int] = (2, 4),
    seed: int = 0,
) -> None:
    """Grade ``cls(linear, rank, alpha)``: ``linear(x) + lora(x)``, keeping the given layer as ``self.linear``.

    The wrapper's ``lora`` (any LoRA layer with ``A`` and ``B``, e.g. the student's own)
    starts at zero, so a fresh wrapper computes exactly ``linear(x)``; after random
    values are written into A and B it must equal :class:`course_utils.lora.LinearWithLoRA`.
    """
    case = f"x of shape {_fmt_shape((*batch_shape, in_dim))}, nn.Linear({in_dim}, {out_dim}, bias={bias}), rank={rank}, alpha={alpha}"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        linear = nn.Linear(in_dim, out_dim, bias=bias)
        saved = copy.deepcopy(linear.state_dict())
        student = _build(cls, (linear, rank, alpha), {}, "LinearWithLoRA", case)
    kept = getattr(student, "linear", None)
    if not isinstance(kept, nn.Linear):
        raise AssertionError(_message("LinearWithLoRA: no nn.Linear stored as self.linear.", case=case,
                                      hint="self.linear = linear (the layer you are given)."))
    if any(not torch.equal(v, kept.state_dict()[k]) for k, v in saved.items()):
        raise AssertionError(_message("LinearWithLoRA: self.linear's weights are not those of the layer you were given.", case=case,
                                      hint="store the given layer itself (self.linear = linear); do not create a new nn.Linear."))
    lora = getattr(student, "lora", None)
    if not isinstance(lora, nn.Module):
        raise AssertionError(_message("LinearWithLoRA: no LoRA layer stored as self.lora.", case=case,
                                      hint="self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)."))
    A, B = _lora_matrices(lora, in_dim, out_dim, rank, name="LinearWithLoRA.lora", case=case)
    _check_fresh_lora(lora, A, B, name="LinearWithLoRA.lora", case=case)
    x = seeded_randn(*batch_shape, in_dim, seed=seed + 1)
    with torch.no_grad():
        fresh = _call(student, x.clone(), what="LinearWithLoRA.forward", case=case)
        base = linear(x)
    check_tensor_close(fresh, base, name="LinearWithLoRA, freshly created", case=case,
                       diagnoses=[(torch.zeros_like(base), "only the LoRA update is returned; add the linear layer's output: self.linear(x) + self.lora(x).")],
                       hint="a fresh wrapper computes exactly linear(x), because the update starts at zero: return self.linear(x) + self.lora(x).")
    new_A = seeded_randn(in_dim, rank, seed=seed + 2)
    new_B = seeded_randn(rank, out_dim, seed=seed + 3)
    _set_lora(lora, new_A, new_B)
    with _seeded(seed + 4):
        reference = _RefLinearWithLoRA(copy.deepcopy(linear), rank, alpha)
    with torch.no_grad():
        reference.lora.A.copy_(new_A)
        reference.lora.B.copy_(new_B)
        expected = reference(x)
        got = _call(student, x.clone(), what="LinearWithLoRA.forward", case=case)
    update = x @ new_A @ new_B * (alpha / rank)
    check_tensor_close(got, expected, name="LinearWithLoRA", case=f"{case}, after random values were written into lora.A and lora.B",
                       diagnoses=[(base, "the LoRA update is not added: return self.linear(x) + self.lora(x)."),
                                  (update, "the linear layer's output is missing: return self.linear(x) + self.lora(x)."),
                                  (base + update * rank, "the update is scaled by alpha; the course scales by alpha / rank.")],
                       hint="return self.linear(x) + self.lora(x).")


@_one_thread
def check_replace_linear_with_lora(
    fn: Callable,
    *,
    cfg: GPTConfig | None = None,
    rank: int = 2,
    alpha: float = 4.0,
    batch_size: int = 2,
    num_tokens: int = 5,
    seed: int = 0,
) -> None:
    """Grade ``fn(model, rank, alpha)``: wrap every ``nn.Linear`` of a GPTModel (at any depth) with LoRA.

    In place (the model is also returned): every ``nn.Linear`` becomes a wrapper with
    the original layer as ``.linear`` and a LoRA layer as ``.lora``; afterwards only the
    LoRA matrices are trainable. Checked: no layer missed, the original weights kept,
    the trainable set, the same logits as before (the updates start at zero), and,
    after random values are written into every A and B, the same logits as
    :func:`course_utils.lora.replace_linear_with_lora`.
    """
    cfg = cfg or grading_config(drop_rate=0.0)
    base = _tiny_gpt(cfg, seed).eval()
    linear_names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
    model = copy.deepcopy(base)
    case = f"a GPTModel with {cfg.n_layers} blocks ({len(linear_names)} nn.Linear layers), rank={rank}, alpha={alpha}"
    hint = ("for name, child in module.named_children(): if isinstance(child, nn.Linear): setattr(module, name, "
            "LinearWithLoRA(child, rank, alpha)); else: recurse into child. Freeze every parameter first "
            "(requires_grad = False); the new LoRA matrices are trainable.")
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        got = _call(fn, model, rank, alpha, what="replace_linear_with_lora", case=case, hint=hint)
    model = got if isinstance(got, nn.Module) else model
    missed, wrappers = [], {}
    for name in linear_names:
        module = model.get_submodule(name)
        inner = getattr(module, "linear", None)
        if isinstance(module, nn.Linear) or not isinstance(inner, nn.Linear) or not isinstance(getattr(module, "lora", None), nn.Module):
            missed.append(name)
        else:
            wrappers[name] = module
    if missed:
        top = [n for n in missed if "." not in n]
        cause = ("only the model's direct children were replaced: the layers inside the transformer blocks need a "
                 "recursive walk." if len(top) < len(missed) and len(missed) < len(linear_names) else None)
        raise AssertionError(_message(
            f"replace_linear_with_lora: {len(missed)} of {len(linear_names)} nn.Linear layers were not wrapped.", case=case,
            lines=[f"not wrapped: {_short_list(missed)}"], cause=cause, hint=hint))
    base_params = dict(base.named_parameters())
    for name, wrapper in wrappers.items():
        if not torch.equal(wrapper.linear.weight, base_params[f"{name}.weight"]):
            raise AssertionError(_message(f"replace_linear_with_lora: {name}.linear has new weights.", case=case,
                                          hint="wrap the existing layer (LinearWithLoRA(child, rank, alpha)); do not create a new one."))
    lora_params = {id(p) for w in wrappers.values() for p in w.lora.parameters()}
    named = list(model.named_parameters())
    extra = [n for n, p in named if p.requires_grad and id(p) not in lora_params]
    frozen_lora = [n for n, p in named if not p.requires_grad and id(p) in lora_params]
    if extra or frozen_lora or not lora_params:
        lines = []
        if extra:
            lines.append(f"trainable but should be frozen: {_short_list(extra)}")
        if frozen_lora:
            lines.append(f"LoRA weights that are frozen: {_short_list(frozen_lora)}")
        cause = ("the base weights were left trainable: set requires_grad = False on every original parameter."
                 if extra else "the LoRA matrices were frozen too: freeze before adding them, or unfreeze them afterwards.")
        raise AssertionError(_message("replace_linear_with_lora: the wrong parameters are trainable.", case=case,
                                      lines=lines, cause=cause, hint="only LoRA's A and B may train."))
    ids = _seeded_ints(cfg.vocab_size, batch_size, num_tokens, seed=seed + 2)
    model.eval()
    with torch.no_grad():
        expected = base(ids)
        fresh = _call(model, ids, what="the adapted model's forward", case=case)
    check_tensor_close(fresh, expected, name="the adapted model, freshly wrapped", case=case, tol=Tolerance(1e-4, 1e-4),
                       hint="the adapted model must start out computing exactly what it computed before: B starts at zeros.")
    with _seeded(seed + 4):
        reference = _ref_replace_linear_with_lora(copy.deepcopy(base), rank, alpha).eval()
    for i, (name, wrapper) in enumerate(wrappers.items()):
        lin = base.get_submodule(name)
        new_A = seeded_randn(lin.in_features, rank, seed=seed + 10 + 2 * i, scale=0.3)
        new_B = seeded_randn(rank, lin.out_features, seed=seed + 11 + 2 * i, scale=0.3)
        _lora_matrices(wrapper.lora, lin.in_features, lin.out_features, rank, name=f"{name}.lora", case=case)
        _set_lora(wrapper.lora, new_A, new_B)
        ref_lora = reference.get_submodule(name).lora
        with torch.no_grad():
            ref_lora.A.copy_(new_A)
            ref_lora.B.copy_(new_B)
    with torch.no_grad():
        expected = reference(ids)
        got_logits = _call(model, ids, what="the adapted model's forward", case=case)
    check_tensor_close(got_logits, expected, name="the adapted model", case=f"{case}, random values written into every A and B",
                       tol=Tolerance(1e-4, 1e-4),
                       hint="each wrapper returns linear(x) + (alpha / rank) * x @ A @ B.")
