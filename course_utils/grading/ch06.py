"""Checks of assignment ch06 (fine-tuning for classification).

:func:`check_classification_head` (a new head, the right parameters frozen),
:func:`check_accuracy_loader` and :func:`check_classification_loss` (both read the
last position), against :mod:`course_utils.classify` on a tiny seeded GPT.
:func:`grading_config` is importable from here, for hidden tests with other sizes.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..classify import add_classification_head as _ref_add_classification_head
from ..classify import calc_accuracy_loader as _ref_accuracy_loader
from ..classify import calc_loss_batch_classification as _ref_classification_loss
from ..gpt import GPTConfig
from .core import (
    CheckFailed,
    Tolerance,
    _as_number,
    _call,
    _check_number,
    _fmt_shape,
    _message,
    _one_thread,
    _seeded,
    _seeded_ints,
    _short_list,
    check_shape,
    check_tensor_close,
)
from .factories import DEVICE, _tiny_gpt, grading_config
from .modules import _check_left_alone, _watching
from .weights import perturb_parameters

__all__ = ["grading_config", "check_classification_head", "check_accuracy_loader", "check_classification_loss"]


# --- the classification head ----------------------------------------------------------


def _trainable(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


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
    hint = ("freeze every parameter first; then put a new Linear layer from emb_dim to num_classes in place of out_head; "
            "then make final_norm and the last train_last_blocks blocks trainable again; return the model.")
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        got = _call(fn, model, num_classes, train_last_blocks, what="add_classification_head", case=case, hint=hint)
    if got is None:
        got = model
    if not isinstance(got, nn.Module):
        raise CheckFailed(_message(f"add_classification_head: expected the model back, got {type(got).__name__}.", case=case,
                                      hint="return model at the end."))
    head = getattr(got, "out_head", None)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (num_classes, cfg.emb_dim):
        shape = _fmt_shape(weight.shape) if isinstance(weight, torch.Tensor) else "no weight"
        raise CheckFailed(_message(
            "add_classification_head: model.out_head is not a Linear layer from emb_dim to num_classes.", case=case,
            lines=[f"expected out_head.weight of shape {_fmt_shape((num_classes, cfg.emb_dim))}, got {shape}"],
            hint="out_head must be a new nn.Linear with in_features = emb_dim and out_features = num_classes."))
    if getattr(head, "bias", None) is None:
        raise CheckFailed(_message("add_classification_head: the new head has no bias.", case=case,
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
        raise CheckFailed(_message("add_classification_head: the wrong parameters are trainable.", case=case,
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


# --- accuracy and loss ----------------------------------------------------------------


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
    hint = ("in eval mode and without gradients, predict each example's class from the largest logit at the last "
            "position; divide the number of correct predictions by the number of examples.")
    with torch.random.fork_rng(), _watching(model) as calls:
        torch.manual_seed(seed + 9)
        got = _as_number(_call(fn, loader, model, DEVICE, num_batches, what="calc_accuracy_loader", case=case, hint=hint),
                         name="calc_accuracy_loader", case=case)
    train_mode = sum(training for training, _ in calls.modes)
    if train_mode:  # found whatever the dropout rate: with little dropout the numbers may still agree
        raise CheckFailed(_message(
            "calc_accuracy_loader: the model was in train mode when it predicted.", case=case,
            lines=[f"{train_mode} of {len(calls.modes)} forward passes ran in train mode (the model was handed over in train mode)"],
            cause="model.eval() is missing, so dropout stays on and the accuracy is noisy.",
            hint="switch the model to eval mode before the loop."))
    _check_left_alone(model, calls, name="calc_accuracy_loader", case=case, training=None)

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
                  hint=hint)
    if any(grad for _, grad in calls.modes):
        raise CheckFailed(_message("calc_accuracy_loader: the model ran with gradients switched on.", case=case,
                                   cause="nothing is trained here, so the graph only costs memory and time.",
                                   hint="run the loop under torch.no_grad(), as the exercise asks."))


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
    hint = "take the logits of the last position only, (B, num_classes), and their F.cross_entropy against the labels."
    expected = _ref_classification_loss(ids, labels, model, DEVICE).detach()
    got = _call(fn, ids.clone(), labels.clone(), model, DEVICE, what="calc_loss_batch_classification", case=case, hint=hint)
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(_message(f"calc_loss_batch_classification: expected a tensor, got {type(got).__name__}.", case=case,
                                      hint="return the loss tensor (loss.backward() needs it): no .item()."))
    check_shape(got, (), name="calc_loss_batch_classification", case=case, hint="average over the batch: one number.")
    if not got.requires_grad:
        raise CheckFailed(_message("calc_loss_batch_classification: the loss has no gradient graph.", case=case,
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
