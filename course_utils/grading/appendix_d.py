"""Checks of assignment appendix_d (training-loop extras).

:func:`check_lr_schedule` (warm-up and cosine decay, against
:func:`course_utils.train.lr_at_step` at every step) and :func:`check_clip_grad_norm`
(against ``torch.nn.utils.clip_grad_norm_`` on the same gradients).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..train import lr_at_step as _ref_lr_at_step
from .core import (CheckFailed, Tolerance, _as_number, _call, _check_number, _close, _computed_dtype, _dtype_name, _fmt_num,
                   _message, check_tensor_close, default_tolerance, number_tolerance, seeded_randn)

__all__ = ["check_lr_schedule", "check_clip_grad_norm"]


# --- learning-rate schedule -----------------------------------------------------------


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
    hint = ("during the warm-up the rate moves in a straight line from initial_lr (step 0) towards peak_lr (reached at "
            "step warmup_steps); after it, the progress through the remaining steps (0 right after the warm-up, 1 at the "
            "last step, never more) sets half a cosine from peak_lr down to min_lr; with no step left to decay, peak_lr.")
    expected = [_ref_lr_at_step(s, total_steps, peak_lr, warmup_steps, initial_lr, min_lr) for s in steps]
    got, raw = [], []
    for s in steps:
        value = _call(fn, s, total_steps=total_steps, peak_lr=peak_lr, warmup_steps=warmup_steps, initial_lr=initial_lr,
                      min_lr=min_lr, what="lr_at_step", case=f"step={s}, {case}", hint=hint)
        got.append(_as_number(value, name="lr_at_step", case=f"step={s}, {case}"))
        raw.append(value)
    # compared in the precision the student computed in: a float32 formula is right to about 1e-7
    dtype = _computed_dtype(raw)
    base = number_tolerance(dtype)
    tol = Tolerance(10 * torch.finfo(dtype).eps * max(peak_lr, initial_lr, min_lr), base.rtol)
    bad = [s for s in steps if not _close(got[s], expected[s], tol)]
    if not bad:
        return
    shown = sorted({0, max(warmup_steps - 1, 0), warmup_steps, total_steps - 1, bad[0], steps[-1]} & set(steps))
    lines = [f"first wrong step: {bad[0]} ({len(bad)} of {len(steps)} steps differ; compared as {_dtype_name(dtype)}, "
             f"tolerance {tol})"]
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
    raise CheckFailed(_message("lr_at_step: wrong learning rates.", case=case, lines=lines, cause=cause, hint=hint))


# --- gradient clipping ----------------------------------------------------------------


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
    hint = ("skip parameters without a gradient; the total norm is the square root of the sum of the squares of every "
            "gradient element; when it exceeds max_norm, scale every gradient in place by one common factor, "
            "max_norm / (total norm + 1e-6); return the norm measured before clipping.")
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
                raise CheckFailed(_message(f"clip_grad_norm: parameter {i} had no gradient but has one now.", case=case,
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
