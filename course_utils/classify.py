"""Fine-tuning a GPT as a text classifier (chapter 6).

A pretrained GPT already builds a useful summary of a text in its last token: that
token attends to every earlier one. To classify, we swap the vocabulary-sized output
head for a small ``Linear(emb_dim, num_classes)``, read the logits of the last
position only, and train the new head plus the top of the network while the rest
stays frozen (cheaper, and it keeps what pretraining learned).
"""
from __future__ import annotations

import tiktoken
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .device import eval_mode
from .distributed import all_reduce_tensor_sum, unwrap_model
from .gpt import context_length_of
from .history import History
from .spam import LABELS
from .tokenizers import GPT2_EOT_ID
from .train import calc_loss_loader, count_examples, evaluate, fit


def add_classification_head(model: nn.Module, num_classes: int = 2, train_last_blocks: int = 1) -> nn.Module:
    """Turn a GPTModel into a classifier, in place; returns the same model.

    All parameters are frozen, ``out_head`` is replaced by a fresh
    ``Linear(emb_dim, num_classes)`` (with a bias), and the new head, the final
    LayerNorm and the last ``train_last_blocks`` transformer blocks are unfrozen.

    With ``tie_weights`` the old head shared its matrix with the token embedding;
    the new head has its own weight, so the two are untied and the embedding stays
    frozen. ``model.cfg.tie_weights`` is set to False to match.
    """
    n_layers = len(model.trf_blocks)
    if not 0 <= train_last_blocks <= n_layers:
        raise ValueError(f"train_last_blocks must be between 0 and {n_layers} (the model's blocks), got {train_last_blocks}.")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
    for param in model.parameters():
        param.requires_grad = False
    old_head = model.out_head
    emb_dim = old_head.in_features
    weight = old_head.weight
    model.out_head = nn.Linear(emb_dim, num_classes, device=weight.device, dtype=weight.dtype)  # new: trainable
    if getattr(model, "cfg", None) is not None and getattr(model.cfg, "tie_weights", False):
        model.cfg = model.cfg.replace(tie_weights=False)  # the new head shares nothing
    for module in [model.final_norm, *list(model.trf_blocks)[n_layers - train_last_blocks :]]:
        for param in module.parameters():
            param.requires_grad = True
    return model


def calc_loss_batch_classification(
    input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module, device: torch.device | str
) -> torch.Tensor:
    """Cross-entropy of the last token's logits against the (B,) class labels."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)[:, -1, :]  # (B, T, classes) -> last position: (B, classes)
    return F.cross_entropy(logits, target_batch)


def calc_loss_loader_classification(
    loader: DataLoader, model: nn.Module, device: torch.device | str, num_batches: int | None = None
) -> float:
    """Mean classification loss per example over the first ``num_batches`` batches (NaN if none)."""
    return calc_loss_loader(loader, model, device, num_batches, loss_fn=calc_loss_batch_classification)


def classification_measure(input_batch, target_batch, model, device) -> dict[str, tuple[torch.Tensor, int]]:
    """Loss and accuracy of one batch from a single forward pass (a measure for :func:`evaluate`).

    Both come from the last position's logits: the summed cross-entropy and the
    number of examples whose largest logit is the label, each over the batch's examples.
    """
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)[:, -1, :]  # (B, classes)
    n = target_batch.numel()
    loss_sum = F.cross_entropy(logits, target_batch, reduction="sum")
    correct = (logits.argmax(dim=-1) == target_batch).sum()
    return {"loss": (loss_sum, n), "acc": (correct, n)}


classification_measure.names = ("acc", "loss")


def calc_accuracy_loader(
    loader: DataLoader, model: nn.Module, device: torch.device | str, num_batches: int | None = None
) -> float:
    """Fraction of examples whose last-token argmax is the label (NaN for no examples).

    Runs in eval mode without gradients and restores the model's mode. Counts are
    summed over all processes when distributed.
    """
    return evaluate(model, loader, device, num_batches, classification_measure)["acc"]


def confusion_matrix(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str,
    num_classes: int = 2,
    num_batches: int | None = None,
) -> torch.Tensor:
    """Counts of (true class, predicted class) pairs: a ``(num_classes, num_classes)`` int64 tensor.

    Row ``i`` holds the examples whose label is ``i``, column ``j`` those predicted as
    ``j`` (the last position's argmax, as in :func:`calc_accuracy_loader`), so the
    diagonal counts the correct answers and ``matrix.sum()`` the examples seen. Uses
    the first ``num_batches`` batches (all by default), in eval mode without gradients,
    and restores the model's mode; counts are summed over all processes when distributed.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
    limit = len(loader) if num_batches is None else min(num_batches, len(loader))
    plain = unwrap_model(model)
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    with eval_mode(plain), torch.no_grad():
        for i, (input_batch, target_batch) in enumerate(loader):
            if i >= limit:
                break
            logits = plain(input_batch.to(device))[:, -1, :]  # (B, classes)
            if logits.shape[-1] != num_classes:
                raise ValueError(f"The model gives {logits.shape[-1]} class logits, but num_classes={num_classes}.")
            predicted = logits.argmax(dim=-1).cpu()
            labels = target_batch.cpu().long()
            if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(f"Labels must lie in 0..{num_classes - 1}; got {labels.min().item()}..{labels.max().item()}.")
            # pair (label, prediction) -> one index label * num_classes + prediction, then count them
            counts += torch.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    total = all_reduce_tensor_sum(counts)  # float64 copy, summed over processes
    return total.round().to(torch.int64).reshape(num_classes, num_classes)


def train_classifier(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    *,
    num_epochs: int,
    eval_every: int,
    eval_batches: int | None = None,
    max_grad_norm: float | None = None,
    history: History | None = None,
    show_progress: bool = True,
    log: bool = True,
) -> History:
    """Fine-tune a classifier; returns the :class:`~course_utils.history.History`.

    The shared loop (:func:`course_utils.train.fit`) with the last-token
    cross-entropy as the training loss; every evaluation measures ``loss`` and
    ``acc`` together on ``eval_batches`` batches of each loader (rows
    ``train_loss``, ``val_loss``, ``train_acc``, ``val_acc``), and ``seen`` counts
    training examples over all processes.
    """
    return fit(
        model, train_loader, val_loader, optimizer, device,
        num_epochs=num_epochs, eval_every=eval_every, eval_batches=eval_batches,
        loss_fn=calc_loss_batch_classification, measure=classification_measure,
        count=count_examples, unit="examples", max_grad_norm=max_grad_norm,
        history=history, show_progress=show_progress, log=log, desc="fine-tune",
    )


def classify_text(
    text: str,
    model: nn.Module,
    tokenizer: tiktoken.Encoding,
    device: torch.device | str,
    max_length: int | None = None,
    pad_token_id: int = GPT2_EOT_ID,
    labels: dict[str, int] | None = None,
) -> str:
    """The predicted label name of ``text`` (``"spam"`` or ``"ham"`` by default).

    The text is encoded, cut to ``max_length`` tokens (and to the model's context
    length), then padded with ``pad_token_id`` up to ``max_length``: pass the
    training set's ``max_length`` so the last position is the one the classifier
    was trained to read. ``labels`` maps names to class ids (default
    :data:`course_utils.spam.LABELS`).
    """
    labels = labels if labels is not None else LABELS
    names = {idx: name for name, idx in labels.items()}
    plain = unwrap_model(model)
    limits = [n for n in (max_length, context_length_of(plain)) if n is not None]
    limit = min(limits) if limits else None
    ids = tokenizer.encode(text)[:limit]
    if limit is not None and max_length is not None:
        ids = ids + [pad_token_id] * (limit - len(ids))
    if not ids:
        raise ValueError("The text encodes to no tokens; give a non-empty text or a max_length to pad to.")
    input_ids = torch.tensor(ids, dtype=torch.long, device=device).unsqueeze(0)  # (1, T)
    with eval_mode(plain), torch.no_grad():
        predicted = int(plain(input_ids)[0, -1, :].argmax())  # last position's class
    if predicted not in names:
        raise ValueError(f"The model predicted class {predicted}, which has no name in labels={labels}.")
    return names[predicted]
