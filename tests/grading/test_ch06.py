"""Assignment ch06's checks against the reference, correct variants, and deliberate mistakes."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from course_utils import classify
from course_utils.grading import ch06
from course_utils.grading.factories import grading_config

from .helpers import Cases, leaves_state_alone, registry_tests, right, wrong


def head_by_names(model, num_classes=2, train_last_blocks=1):
    """Correct: freeze/unfreeze by parameter name, head built last."""
    n = len(model.trf_blocks)
    unfrozen = ("final_norm.",) + tuple(f"trf_blocks.{i}." for i in range(n - train_last_blocks, n))
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(unfrozen)
    model.out_head = nn.Linear(model.out_head.in_features, num_classes)
    return model


def make_head(mistake):
    def fn(model, num_classes=2, train_last_blocks=1):
        emb = model.out_head.in_features
        if mistake == "head_first":
            model.out_head = nn.Linear(emb, num_classes)
        if mistake != "no_freeze":
            for p in model.parameters():
                p.requires_grad = False
        if mistake == "no_bias":
            model.out_head = nn.Linear(emb, num_classes, bias=False)
        elif mistake == "swapped":
            model.out_head = nn.Linear(num_classes, emb)
        elif mistake != "head_first":
            model.out_head = nn.Linear(emb, num_classes)
        blocks = list(model.trf_blocks)
        chosen = blocks[len(blocks) - train_last_blocks:]
        if mistake == "first_blocks":
            chosen = blocks[:train_last_blocks]
        elif mistake == "minus_zero":
            chosen = blocks[-train_last_blocks:]
        modules = chosen if mistake == "no_norm" else [model.final_norm, *chosen]
        for m in modules:
            for p in m.parameters():
                p.requires_grad = True
        if mistake == "reinit":
            model.tok_emb.reset_parameters()
        return model
    return fn


def accuracy_with_tensors(data_loader, model, device, num_batches=None):
    """Correct: softmax before argmax, counts kept as tensors, batches taken with islice."""
    model.eval()
    n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    correct = total = torch.zeros((), dtype=torch.long)
    with torch.no_grad():
        for x, y in itertools.islice(data_loader, n):
            pred = model(x)[:, -1].softmax(-1).argmax(-1)
            correct = correct + (pred == y).sum()
            total = total + y.numel()
    return correct / total


def make_accuracy(mistake):
    def fn(data_loader, model, device, num_batches=None):
        if mistake != "no_eval":
            model.eval()
        per_batch, correct, total = [], 0, 0
        with torch.no_grad() if mistake != "grad_on" else torch.enable_grad():
            for i, (x, y) in enumerate(data_loader):
                if mistake != "ignore" and num_batches is not None and i >= num_batches:
                    break
                pos = 0 if mistake == "first" else -1
                hits = (model(x)[:, pos].argmax(-1) == y)
                per_batch.append(hits.float().mean().item())
                correct += int(hits.sum())
                total += len(y)
        if mistake == "batch_mean":
            return sum(per_batch) / len(per_batch)
        if mistake == "percent":
            return 100 * correct / total
        return correct / total
    return fn


def classification_loss_nll(input_batch, target_batch, model, device):
    """Correct: log-softmax and nll_loss on the last position."""
    return F.nll_loss(model(input_batch)[:, -1, :].log_softmax(-1), target_batch)


def make_classification_loss(mistake):
    def fn(x, y, model, device):
        logits = model(x)
        if mistake == "first":
            return F.cross_entropy(logits[:, 0], y)
        if mistake == "all":
            return F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(x.shape[1]))
        if mistake == "softmax":
            return F.cross_entropy(logits[:, -1].softmax(-1), y)
        if mistake == "sum":
            return F.cross_entropy(logits[:, -1], y, reduction="sum")
        raise ValueError(mistake)
    return fn


def test_checks_leave_the_global_random_state_and_threads_alone():
    leaves_state_alone(lambda: ch06.check_classification_head(classify.add_classification_head))


HEAD_SETTINGS = {"default": {}, "3_classes_2_blocks": dict(num_classes=3, train_last_blocks=2, seed=3),
                 "no_blocks": dict(cfg=grading_config(n_layers=3, drop_rate=0.0), train_last_blocks=0, seed=4)}
ACCURACY_SETTINGS = {"default": {}, "2_batches": dict(num_batches=2),
                     "dropout_3_classes": dict(num_examples=13, batch_size=5, num_classes=3, num_batches=7, drop_rate=0.5, seed=2)}

CASES = {
    "check_classification_head": Cases(
        right=[right(f"{name}-{label}", fn, **kw)
               for name, fn in (("reference", classify.add_classification_head), ("by_names", head_by_names), ("by_hand", make_head(None)))
               for label, kw in HEAD_SETTINGS.items()]
        + [right("minus_zero_slice_with_blocks", make_head("minus_zero"))],  # right whenever train_last_blocks > 0
        wrong=[wrong(mistake, make_head(mistake), "add_classification_head" if mistake != "reinit" else "classifier logits", *words)
               for mistake, words in (
                   ("no_freeze", ["left trainable", "tok_emb.weight"]),
                   ("head_first", ["new head is frozen"]),
                   ("first_blocks", ["LAST 1"]),
                   ("no_norm", ["final_norm"]),
                   ("no_bias", ["no bias"]),
                   ("swapped", ["out_head", "(2, 16)"]),
                   ("reinit", ["other weights must stay"]),
               )] + [wrong("minus_zero_slice", make_head("minus_zero"), "trf_blocks[-0:]", train_last_blocks=0)],
    ),
    "check_accuracy_loader": Cases(
        right=[right(f"{name}-{label}", fn, **kw)
               for name, fn in (("reference", classify.calc_accuracy_loader), ("tensors", accuracy_with_tensors))
               for label, kw in ACCURACY_SETTINGS.items()],
        wrong=[wrong("first", make_accuracy("first"), "FIRST position"),
               wrong("batch_mean", make_accuracy("batch_mean"), "per-batch accuracies"),
               wrong("percent", make_accuracy("percent"), "percent"),
               wrong("ignore", make_accuracy("ignore"), "num_batches was ignored", num_batches=1),
               wrong("no_eval", make_accuracy("no_eval"), "train mode when it predicted", "model.eval()"),
               wrong("grad_on", make_accuracy("grad_on"), "gradients switched on", "torch.no_grad()")],
    ),
    "check_classification_loss": Cases(
        right=[right(f"{name}-{label}", fn, **kw)
               for name, fn in (("reference", classify.calc_loss_batch_classification), ("nll", classification_loss_nll))
               for label, kw in (("default", {}), ("float64", dict(batch_size=4, num_tokens=3, num_classes=3, seed=2, dtype=torch.float64)))],
        wrong=[wrong("first", make_classification_loss("first"), "FIRST position"),
               wrong("all", make_classification_loss("all"), "every position"),
               wrong("softmax", make_classification_loss("softmax"), "softmax was applied"),
               wrong("sum", make_classification_loss("sum"), "summed")],
    ),
}

test_correct_passes, test_mistake_fails, test_early_return_is_caught = registry_tests(ch06, CASES)
