"""Assignment appendix_d's checks against the reference, correct variants, and deliberate mistakes."""
from __future__ import annotations

import math

import torch

from course_utils import train
from course_utils.grading import appendix_d

from .helpers import Cases, registry_tests, right, wrong


def lr_written_differently(step, total_steps, peak_lr, warmup_steps, initial_lr=0.0, min_lr=0.0):
    """Correct: the fraction of the warm-up, then the decay with an explicit end."""
    if step < warmup_steps:
        frac = step / warmup_steps
        return (1 - frac) * initial_lr + frac * peak_lr
    last = total_steps - 1
    if last <= warmup_steps:
        return peak_lr
    if step >= last:
        return min_lr
    angle = math.pi * (step - warmup_steps) / (last - warmup_steps)
    return min_lr + (peak_lr - min_lr) * (math.cos(angle) + 1) / 2


def make_lr(mistake):
    def fn(step, total_steps, peak_lr, warmup_steps, initial_lr=0.0, min_lr=0.0):
        if mistake == "ahead" and step < warmup_steps:
            return initial_lr + (peak_lr - initial_lr) * (step + 1) / warmup_steps
        if mistake == "early_peak" and step < warmup_steps:
            return initial_lr + (peak_lr - initial_lr) * step / (warmup_steps - 1)
        if mistake == "from_zero" and step < warmup_steps:
            return peak_lr * step / warmup_steps
        if step < warmup_steps:
            return initial_lr + (peak_lr - initial_lr) * step / warmup_steps
        if mistake == "short":
            progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        else:
            progress = (step - warmup_steps) / (total_steps - 1 - warmup_steps)  # ZeroDivisionError at the edge
            if mistake != "no_clamp":
                progress = min(1.0, progress)
        if mistake == "to_zero":
            return peak_lr * 0.5 * (1 + math.cos(math.pi * progress))
        if mistake == "linear":
            return min_lr + (peak_lr - min_lr) * (1 - progress)
        return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return fn


def clip_by_hand(parameters, max_norm):
    """Correct: one list, the squares summed, one factor clamped at 1."""
    params = [p for p in parameters if p.grad is not None]
    total = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    for p in params:
        p.grad.mul_(coef)
    return total


def make_clip(mistake):
    def fn(parameters, max_norm):
        if mistake == "twice":
            total = torch.sqrt(sum((p.grad**2).sum() for p in parameters if p.grad is not None))
            for p in parameters:  # a generator is empty by now
                p.grad.mul_(min(1.0, max_norm / float(total)))
            return total
        params = list(parameters) if mistake == "no_skip" else [p for p in parameters if p.grad is not None]
        norms = [p.grad.norm() for p in params]
        total = torch.sqrt(sum(n**2 for n in norms))
        for p, n in zip(params, norms):
            if mistake == "per_param":
                p.grad.mul_(min(1.0, max_norm / float(n)))
            elif mistake == "always":
                p.grad.mul_(max_norm / float(total))
            elif mistake == "sum_norms":
                p.grad.mul_(min(1.0, max_norm / float(sum(norms))))
            elif mistake == "by_value":
                p.grad.clamp_(-max_norm, max_norm)
            else:
                p.grad.mul_(min(1.0, max_norm / float(total)))
        if mistake == "after":
            return torch.sqrt(sum((p.grad**2).sum() for p in params))
        return total
    return fn


LR_SETTINGS = {"default": {}, "long": dict(total_steps=50, peak_lr=3e-4, warmup_steps=10, initial_lr=1e-5, min_lr=1e-6, extra_steps=5),
               "no_warmup": dict(total_steps=12, warmup_steps=0, min_lr=1e-3),
               # no step, or no step at all, left for the decay
               **{f"warmup_{w}_of_11": dict(total_steps=11, warmup_steps=w, initial_lr=1e-4) for w in (10, 11, 12)},
               "one_step": dict(total_steps=1, warmup_steps=0)}
CLIP_SETTINGS = {"default": {}, "below_max_norm": dict(scale=0.05),  # nothing changes
                 "generator_missing_grad": dict(shapes=((5,), (2, 3)), max_norm=0.5, missing_grad=True, as_generator=True, seed=2),
                 "float64": dict(max_norm=2.0, scale=3.0, seed=3, dtype=torch.float64)}

CASES = {
    "check_lr_schedule": Cases(
        right=[right(f"{name}-{label}", fn, **kw) for name, fn in (("reference", train.lr_at_step), ("written_differently", lr_written_differently))
               for label, kw in LR_SETTINGS.items()],
        wrong=[wrong(str(mistake), make_lr(mistake), "lr_at_step", *words, **kwargs) for mistake, words, kwargs in (
            ("ahead", ["one step ahead"], {}),
            ("early_peak", ["one step early"], {}),
            ("from_zero", ["starts from 0"], {"initial_lr": 1e-3}),
            ("short", ["does not reach min_lr"], {}),
            ("no_clamp", ["past the end"], {}),
            ("to_zero", ["ends at 0"], {"min_lr": 1e-3}),
            ("linear", ["straight line"], {}),
            (None, ["ZeroDivisionError"], {"total_steps": 6, "warmup_steps": 5}),
        )],
    ),
    "check_clip_grad_norm": Cases(
        right=[right(f"{name}-{label}", fn, **kw)
               for name, fn in (("torch", torch.nn.utils.clip_grad_norm_), ("by_hand", clip_by_hand), ("per_norms", make_clip(None)))
               for label, kw in CLIP_SETTINGS.items()],
        wrong=[wrong(mistake, make_clip(mistake), "clip_grad_norm", *words, **kwargs) for mistake, words, kwargs in (
            ("per_param", ["clipped on its own", "TOTAL norm"], {}),
            ("always", ["below max_norm"], {"scale": 0.05}),
            ("sum_norms", ["added up"], {}),
            ("by_value", ["by value"], {"max_norm": 0.5}),
            ("twice", ["generator", "list first"], {"as_generator": True}),
            ("no_skip", ["AttributeError", "None"], {"missing_grad": True}),
            ("after", ["after clipping was returned"], {}),
        )],
    ),
}

test_correct_passes, test_mistake_fails, test_early_return_is_caught = registry_tests(appendix_d, CASES)
