"""Checks of assignment ch05 (pretraining on unlabeled data).

:func:`check_loss_batch`, :func:`check_loss_loader`, :func:`check_train_loop`
(against :func:`course_utils.train.fit`, the package's own loop),
:func:`check_sampling_probs` (temperature and top-k as probabilities, compared exactly,
against :func:`reference_sampling_probs`) and :func:`check_sample_next_token` (a
sampler that draws from a ``torch.Generator``, judged by its distribution and its
reproducibility, so any correct way of drawing passes).

Training checks give the student's code and the reference identical fresh models,
optimizers, loaders and random states (``torch.random.fork_rng``), so a correct loop
reproduces the reference's numbers to float rounding; the global random state of the
caller is left untouched.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..gpt import GPTConfig
from ..data import IGNORE_INDEX
from ..train import calc_loss_batch as _ref_loss_batch
from ..train import calc_loss_loader as _ref_loss_loader
from .. import train as _ref_train_module
from ..train import fit as _ref_fit
from ..train import loss_measure as _ref_loss_measure
from .core import (
    CheckFailed, Tolerance, _as_number, _call, _check_number, _fmt_num, _fmt_shape,
    _fmt_values, _grades_on, _swapped_names, _message, _one_thread, _seeded, check_function, check_shape, check_tensor_close, seeded_randn,
)
from .modules import _check_left_alone, _watching
from .factories import DEVICE, _AdamWKeepingGrads, _masked_copy, _no_random_state_kept, _tiny_gpt, _token_pairs, grading_config, token_loader

__all__ = [
    "token_loader",
    "reference_sampling_probs",
    "check_loss_batch",
    "check_loss_loader",
    "check_train_loop",
    "check_sampling_probs",
    "check_sample_next_token",
]


# --- the loss -------------------------------------------------------------------------


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
                hint="run the model on the inputs and compare its logits with the targets using F.cross_entropy, with "
                     "the batch and position dimensions flattened into one.")
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(_message(
            f"calc_loss_batch: expected a tensor, got {type(got).__name__}.", case=case,
            hint="return the loss tensor itself: the training loop calls loss.backward() on it, so do not call "
                 ".item() or float() here."))
    check_shape(got, (), name="calc_loss_batch", case=case,
                hint="return one number for the whole batch (a 0-dim tensor): average over every position.")
    if not got.requires_grad:
        raise CheckFailed(_message(
            "calc_loss_batch: the loss has no gradient graph.", case=case,
            hint="do not compute it under torch.no_grad() and do not .detach() it: loss.backward() needs the graph."))
    with torch.no_grad():
        logits = model(inputs)
    check_tensor_close(got, expected, name="calc_loss_batch", case=case,
                       diagnoses=lambda: _loss_batch_variants(logits, inputs, targets),
                       hint="F.cross_entropy on the flattened logits and targets averages over every "
                            "position and skips targets equal to -100.")


@_one_thread
@_grades_on({"calc_loss_batch": _ref_loss_batch})  # a batch-loss mistake is graded once, in exercise 1
def check_loss_loader(
    fn: Callable,
    *,
    num_sequences: int = 7,
    batch_size: int = 2,
    num_tokens: int = 5,
    num_batches: int | None = None,
    masked: bool = False,
    empty: bool = False,
    seed: int = 0,
) -> None:
    """Grade ``fn(data_loader, model, device, num_batches=None)``: the loss per counted target.

    Over the first ``num_batches`` batches (every batch when None, never more than the
    loader has), the loss of all counted targets together: each batch's mean loss
    weighted by its number of targets that are not -100, as
    :func:`course_utils.train.calc_loss_loader` computes it. The last batch is
    shorter; with ``masked`` some targets are -100. An empty loader gives NaN.
    """
    cfg = grading_config(drop_rate=0.0)
    model = _tiny_gpt(cfg, seed).eval()
    n_seqs = 0 if empty else num_sequences
    loader = token_loader(cfg.vocab_size, n_seqs, num_tokens, batch_size, seed=seed + 1)
    if masked:
        loader = _masked_copy(loader, seed + 2)
    if empty:
        case = f"an empty loader (0 batches), num_batches={num_batches}"
    else:
        case = (f"a loader of {len(loader)} batches ({n_seqs} sequences of {num_tokens} tokens, batch_size={batch_size}, "
                f"the last batch holding {n_seqs - (len(loader) - 1) * batch_size}"
                f"{', some targets -100' if masked else ''}), num_batches={num_batches}")
    expected = _ref_loss_loader(loader, model, DEVICE, num_batches=num_batches)
    hint = ("over the first num_batches batches (never more than the loader has), add up each batch loss times its "
            "number of targets that are not -100, and divide by the total number of such targets; NaN when that "
            "number is zero.")
    with _watching(model) as calls:
        got = _as_number(_call(fn, loader, model, DEVICE, num_batches, what="calc_loss_loader", case=case, hint=hint),
                         name="calc_loss_loader", case=case)
    if empty and not math.isnan(got):
        raise CheckFailed(_message(
            f"calc_loss_loader: an empty loader must give NaN, got {_fmt_num(got)}.", case=case,
            hint="with no batches there is no loss to average: the answer is NaN (0 would look like a perfect model)."))

    def variants() -> list[tuple[float, str]]:
        losses, counted, sizes, numels = [], [], [], []
        with torch.no_grad():
            for x, y in loader:
                losses.append(float(_ref_loss_batch(x, y, model, DEVICE)))
                counted.append(int((y != IGNORE_INDEX).sum()))
                sizes.append(x.shape[0])
                numels.append(y.numel())
        n = len(losses) if num_batches is None else min(num_batches, len(losses))

        def weighted(k: int, weights: Sequence[int]) -> float:
            return sum(l * w for l, w in zip(losses[:k], weights[:k])) / max(1, sum(weights[:k]))

        out = [(sum(losses[:n]) / max(1, n),
                "each batch counted once (a plain mean of the batch losses): weight each batch's mean loss by its "
                "number of counted targets, so a short or padded batch counts for what it holds."),
               (weighted(n, numels), "the -100 targets were counted in the weights: count only targets != -100."),
               (weighted(n, sizes), "the batches were weighted by their number of sequences; weight them by their "
                                    "number of counted target tokens."),
               (weighted(len(losses), counted), "num_batches was ignored: use only the first num_batches batches."),
               (sum(l * c for l, c in zip(losses[:n], counted[:n])), "the weighted losses were added up but not "
                                                                      "divided by the number of counted targets.")]
        if n + 1 <= len(losses):
            out.append((weighted(n + 1, counted), "one batch too many (off by one): stop once num_batches batches are "
                                                  "done (if i >= num_batches: break)."))
        if n >= 2:
            out.append((weighted(n - 1, counted), "one batch too few (off by one): the batches are numbered from 0."))
        return out

    _check_number(got, expected, name="calc_loss_loader", case=case, tol=Tolerance(1e-5, 1e-5), variants=variants, hint=hint)
    _check_left_alone(model, calls, name="calc_loss_loader", case=case, training=False)
    if any(grad for _, grad in calls.modes):
        raise CheckFailed(_message(
            "calc_loss_loader: the model ran with gradients switched on.", case=case,
            lines=[f"{sum(grad for _, grad in calls.modes)} of {len(calls.modes)} forward passes built a gradient graph"],
            cause="nothing is trained here, so the graph only costs memory and time.",
            hint="wrap the loop over the batches in torch.no_grad(), as the exercise asks."))


# --- the training loop ----------------------------------------------------------------


def _reference_run(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, optimizer: torch.optim.Optimizer,
                   num_epochs: int, eval_every: int, eval_batches: int, mistake: str | None = None) -> dict[str, list]:
    """The package's loop (:func:`course_utils.train.fit`), optionally with one slip for diagnoses.

    ``"eval_in_train_mode"``: losses measured with dropout on; ``"no_train_after_eval"``:
    training continues in eval mode after the first evaluation (the no-zero-grad slip
    comes from :class:`_AdamWKeepingGrads`).
    """
    measure = _ref_loss_measure()
    handle = None
    keep_random_state = contextlib.nullcontext()
    if mistake == "eval_in_train_mode":
        plain_measure = measure

        def measure(x, y, m, device):
            m.train()
            return plain_measure(x, y, m, device)

        # a student's loop lets dropout in the evaluation draw from the global generator
        keep_random_state = mock.patch.object(_ref_train_module, "_random_state_kept", _no_random_state_kept)
    elif mistake == "no_train_after_eval":
        state = {"evaluated": False}
        inner = measure

        def measure(x, y, m, device):
            state["evaluated"] = True
            return inner(x, y, m, device)

        def train_again(mode: bool = True) -> nn.Module:  # the loop's model.train() at each epoch's start
            state["evaluated"] = False
            return nn.Module.train(model, mode)

        def stay_in_eval_mode(module: nn.Module, args: tuple) -> None:
            if state["evaluated"] and module.training:
                nn.Module.train(module, False)

        model.train = train_again
        handle = model.register_forward_pre_hook(stay_in_eval_mode)
    try:
        with keep_random_state:
            history = _ref_fit(model, train_loader, val_loader, optimizer, DEVICE, num_epochs=num_epochs,
                               eval_every=eval_every, eval_batches=eval_batches, measure=measure,
                               show_progress=False, log=False)
    finally:
        if handle is not None:
            handle.remove()
        model.__dict__.pop("train", None)
    return {"step": history.step, "seen": history.seen, "train_loss": history["train_loss"], "val_loss": history["val_loss"]}


def _watched_losses(model: nn.Module, slips: list[str]) -> dict[str, Callable]:
    """The reference batch and loader losses, noting a training step taken in eval mode or an
    evaluation run in train mode (found even when dropout is 0 and the numbers agree)."""

    def calc_loss_batch(input_batch, target_batch, m, device):
        if m is model and not m.training and not slips:
            slips.append("a training step ran in eval mode: call model.train() again after evaluating "
                         "(and at the start of each epoch).")
        return _ref_loss_batch(input_batch, target_batch, m, device)

    def calc_loss_loader(data_loader, m, device, num_batches=None):
        if m is model and m.training:
            slips.append("the losses were measured in train mode: call model.eval() before calc_loss_loader.")
        return _ref_loss_loader(data_loader, m, device, num_batches=num_batches)

    return {"calc_loss_batch": calc_loss_batch, "calc_loss_loader": calc_loss_loader}


_LOSS_MISTAKES = {
    "no_zero_grad": "the gradients were never reset, so they pile up from step to step: call optimizer.zero_grad() every step.",
    "eval_in_train_mode": "the evaluation ran in train mode, so dropout made the losses noisy: call model.eval() before evaluating.",
    "no_train_after_eval": "the model stayed in eval mode after evaluating, so later steps trained without dropout: call model.train() again after evaluating.",
}


def _step_diagnosis(got_steps: list[int], exp_steps: list[int], total: int, eval_every: int) -> str | None:
    if len(exp_steps) < 2:
        return None
    if got_steps == exp_steps[1:]:
        return "there is no row for the untrained model: evaluate once before the first step (step 0, 0 tokens seen)."
    if exp_steps[-1] != exp_steps[-2] + eval_every and got_steps == exp_steps[:-1]:
        return f"the last step ({total}) is not a multiple of eval_every, and the final evaluation after it is missing."
    early = {s + 1 for s in range(0, total, eval_every)}  # "step % eval_every == 0" tested before counting the step
    if set(got_steps) - {0, total} == early - {total}:
        return ("the evaluation came one step early: test steps_done % eval_every == 0 after counting the step "
                "(steps_done is 1 after the first update), so the rows fall on steps eval_every, 2 * eval_every, ...")
    return None


def _seen_diagnosis(got_seen: list[int], steps: list[int], sizes: list[tuple[int, int]]) -> str | None:
    """Compare with the counts the usual slips give (sizes: (rows, numel) of each step's batch)."""
    def running(per_step: list[int]) -> list[int]:
        return [sum(per_step[:s]) for s in steps]

    slips = [
        (running([rows for rows, _ in sizes]), "seen counts sequences; count tokens: input_batch.numel() (batch size x sequence length)."),
        (running([sizes[0][1]] * len(sizes)), "seen adds the first batch's size for every batch, but the last batch is shorter: add input_batch.numel()."),
        ([sum(n for _, n in sizes[: max(0, s - 1)]) for s in steps], "each entry misses the current step's batch: count the batch right after its update, before evaluating."),
    ]
    return next((why for values, why in slips if values == got_seen), None)


@_one_thread
def check_train_loop(
    fn: Callable,
    *,
    num_epochs: int = 1,
    eval_every: int = 2,
    eval_batches: int = 1,
    num_sequences: int = 9,
    batch_size: int = 2,
    num_tokens: int = 6,
    drop_rate: float = 0.0,
    lr: float = 5e-3,
    seed: int = 0,
) -> None:
    """Grade ``fn(model, train_loader, val_loader, optimizer, device, num_epochs, eval_every, eval_batches)``.

    It must train as :func:`course_utils.train.train_language_model` does (without
    the samples) and return a dict (or History) whose ``"step"``, ``"seen"``,
    ``"train_loss"`` and ``"val_loss"`` are lists with one entry per evaluation:
    before the first step, after every ``eval_every``-th step and after the last one,
    each evaluating in eval mode on ``eval_batches`` batches of each loader. The
    student's loop and the reference get identical tiny GPTs, AdamW optimizers,
    loaders (the last batch shorter) and random states; every list and the trained
    weights are compared.
    """
    cfg = grading_config(drop_rate=drop_rate)
    train_loader = token_loader(cfg.vocab_size, num_sequences, num_tokens, batch_size, seed=seed + 1)
    val_loader = token_loader(cfg.vocab_size, max(2, num_sequences // 2), num_tokens, batch_size, seed=seed + 2)
    name = "train_language_model"
    case = (f"a tiny GPT (drop_rate={drop_rate}), {len(train_loader)} training batches of up to {batch_size} x "
            f"{num_tokens} tokens (the last one shorter), num_epochs={num_epochs}, eval_every={eval_every}, "
            f"eval_batches={eval_batches}")

    def run(mistake: str | None = None, student: bool = False):
        model = _tiny_gpt(cfg, seed)
        opt_cls = _AdamWKeepingGrads if mistake == "no_zero_grad" else torch.optim.AdamW
        optimizer = opt_cls(model.parameters(), lr=lr, weight_decay=0.1)
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1000)  # dropout draws the same numbers in both runs
            if student:  # on the reference losses (graded in exercises 1 and 2), watching the model's mode
                with _swapped_names(fn, _watched_losses(model, slips)):
                    out = _call(fn, model, train_loader, val_loader, optimizer, DEVICE, num_epochs, eval_every,
                                eval_batches, what=name, case=case)
                lr_after = [group["lr"] for group in optimizer.param_groups]
                if lr_after != [lr] * len(lr_after):
                    slips.append("the optimizer's learning rate was changed: leave the optimizer's settings alone.")
            else:
                out = _reference_run(model, train_loader, val_loader, optimizer, num_epochs, eval_every, eval_batches,
                                     None if mistake == "no_zero_grad" else mistake)
        return out, model

    slips: list[str] = []
    expected, ref_model = run()
    got, student_model = run(student=True)
    if not slips and student_model.training != ref_model.training:
        slips.append("the model is left in eval mode at the end: call model.train() again after each evaluation.")
    if slips:
        raise CheckFailed(_message(f"{name}: the model was not in the mode the loop needs.", case=case,
                                   cause=slips[0], hint="evaluate in eval mode, train in train mode; model.eval() "
                                   "before measuring the losses, model.train() right after."))
    columns = ("step", "seen", "train_loss", "val_loss")
    try:
        got_cols = {key: list(got[key]) for key in columns}
    except (TypeError, KeyError, IndexError) as err:
        raise CheckFailed(_message(
            f"{name}: expected a dict with the lists {', '.join(repr(c) for c in columns)}; got "
            f"{type(got).__name__} ({type(err).__name__}: {err}).", case=case,
            hint='return {"step": steps, "seen": seen, "train_loss": train_losses, "val_loss": val_losses}.')) from None
    for key in ("step", "seen"):
        got_cols[key] = [int(_as_number(v, name=f"{key} entries", case=case)) for v in got_cols[key]]

    total = num_epochs * len(train_loader)
    sizes = [(x.shape[0], x.numel()) for x, _ in train_loader] * num_epochs
    if got_cols["step"] != expected["step"]:
        raise CheckFailed(_message(
            f"{name}: evaluated after other steps than the reference.", case=case,
            lines=[f"{len(train_loader)} steps per epoch, {total} in all", f"expected step {expected['step']}",
                   f"got      step {got_cols['step']}"],
            cause=_step_diagnosis(got_cols["step"], expected["step"], total, eval_every),
            hint="evaluate before the loop (step 0); then count each update, and evaluate when the count is a multiple "
                 "of eval_every, and after the last step."))
    if got_cols["seen"] != expected["seen"]:
        raise CheckFailed(_message(
            f"{name}: seen differs from the reference.", case=case,
            lines=[f"expected seen {expected['seen']}", f"got      seen {got_cols['seen']}"],
            cause=_seen_diagnosis(got_cols["seen"], expected["step"], sizes),
            hint="after each update add the number of input tokens of the batch; each row records the count so far."))
    tol = Tolerance(1e-4, 1e-4)
    for key in ("train_loss", "val_loss"):
        got_t = torch.tensor([_as_number(v, name=f"{key} entries", case=case) for v in got_cols[key]], dtype=torch.float64)

        def diagnoses(key=key):
            return [(torch.tensor(run(m)[0][key], dtype=torch.float64), why) for m, why in _LOSS_MISTAKES.items()]

        check_tensor_close(got_t, torch.tensor(expected[key], dtype=torch.float64), name=f"{name}: {key}", case=case,
                           tol=tol, diagnoses=diagnoses,
                           hint="each step: clear the gradients, the batch loss, backward, optimizer step. To "
                                "evaluate: eval mode, calc_loss_loader on eval_batches batches of both loaders, "
                                "then train mode again.")
    got_w = torch.cat([p.detach().double().flatten() for p in student_model.parameters()])
    exp_w = torch.cat([p.detach().double().flatten() for p in ref_model.parameters()])
    check_tensor_close(got_w, exp_w, name=f"{name}: the trained weights (all parameters, flattened)", case=case,
                       tol=tol, hint=f"take exactly one optimizer step per training batch: {total} steps in all.")


# --- temperature and top-k ------------------------------------------------------------


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
        hint="find each row's k-th largest logit with torch.topk, set the logits strictly below it to -inf, divide "
             "by the temperature, softmax over the vocabulary.",
    )


@_grades_on({"sampling_probs": reference_sampling_probs})  # exercise 4 is graded once, there
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
    hint = ("at temperature 0 take each row's largest logit; otherwise draw one id per row from sampling_probs(...) "
            "with torch.multinomial, passing it the generator.")
    # greedy
    greedy_logits = seeded_randn(3, vocab_size, seed=seed + 1)
    greedy_case = f"logits of shape {_fmt_shape(greedy_logits.shape)}, temperature=0.0, top_k={top_k}"
    with _seeded(seed):
        got = _call(fn, greedy_logits.clone(), temperature=0.0, top_k=top_k, generator=torch.Generator().manual_seed(seed),
                    what="sample_next_token", case=greedy_case, hint=hint)
    expected = greedy_logits.argmax(dim=-1, keepdim=True)
    check_shape(got, expected.shape, name="sample_next_token", case=greedy_case,
                hint="the result is a (B, 1) tensor of ids: keep the last dimension (keepdim, or one sample per row).")
    if not torch.equal(got.long(), expected):
        raise CheckFailed(_message(
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
            raise CheckFailed(_message(f"sample_next_token: expected integer token ids, got dtype {out.dtype}.", case=case,
                                          hint="return the indices that torch.multinomial gives (torch.long)."))
        return out.long().flatten()

    first = draw(seed, 1)
    bad = first[(first < 0) | (first >= vocab_size)]
    if bad.numel():
        raise CheckFailed(_message(f"sample_next_token: drew id {int(bad[0])}, outside the vocabulary 0..{vocab_size - 1}.",
                                      case=case, hint=hint))
    forbidden = sorted({int(t) for t in first.tolist() if probs[int(t)] == 0})
    if forbidden:
        raise CheckFailed(_message(
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
        raise CheckFailed(_message(
            "sample_next_token: the draws do not follow the scaled, filtered probabilities.", case=case,
            lines=[f"expected probabilities {_fmt_values(probs, vocab_size)}", f"observed frequencies   {_fmt_values(freq, vocab_size)}"],
            cause=cause, hint=hint))
    if not torch.equal(draw(seed, 2), first):
        raise CheckFailed(_message(
            "sample_next_token: the same generator seed gave different draws when the global random state changed.", case=case,
            hint="draw with the generator you are given and nothing else (torch.multinomial takes a generator argument)."))
    if int((probs > 0).sum()) > 1 and torch.equal(draw(seed + 7919, 1), first):  # top_k=1 leaves no choice
        raise CheckFailed(_message(
            "sample_next_token: two different generator seeds gave exactly the same draws.", case=case,
            hint="use the generator argument for the random draw (torch.multinomial takes it)."))
