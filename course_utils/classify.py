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
from tqdm.auto import tqdm

from .distributed import all_reduce_sum, all_reduce_tensor_sum, is_main_process, set_epoch, unwrap_model
from .spam import LABELS
from .tokenizers import GPT2_EOT_ID
from .train import calc_loss_loader, check_eval_schedule, evaluate_model, prepare_device_for_training


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
    """Mean classification loss over the first ``num_batches`` batches (NaN if none)."""
    return calc_loss_loader(loader, model, device, num_batches, loss_fn=calc_loss_batch_classification)


def calc_accuracy_loader(
    loader: DataLoader, model: nn.Module, device: torch.device | str, num_batches: int | None = None
) -> float:
    """Fraction of examples whose last-token argmax is the label (NaN for no examples).

    Runs in eval mode without gradients and restores the model's mode. Counts are
    summed over all processes when distributed.
    """
    plain = unwrap_model(model)
    was_training = plain.training
    plain.eval()
    n = len(loader) if num_batches is None else min(num_batches, len(loader))
    correct, total = 0, 0
    try:
        with torch.no_grad():
            for i, (input_batch, target_batch) in enumerate(loader):
                if i >= n:
                    break
                input_batch, target_batch = input_batch.to(device), target_batch.to(device)
                predicted = plain(input_batch)[:, -1, :].argmax(dim=-1)  # (B,)
                correct += int((predicted == target_batch).sum())
                total += target_batch.numel()
    finally:
        plain.train(was_training)
    correct_sum, total_sum = all_reduce_tensor_sum(torch.tensor([correct, total], dtype=torch.float64)).tolist()
    return correct_sum / total_sum if total_sum > 0 else float("nan")


def train_classifier_simple(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    show_progress: bool = True,
) -> tuple[list[float], list[float], list[float], list[float], int]:
    """Chapter 6's loop; returns ``(train_losses, val_losses, train_accs, val_accs, examples_seen)``.

    Losses are evaluated every ``eval_freq`` steps on ``eval_iter`` batches;
    accuracies after each epoch on ``eval_iter`` batches. ``examples_seen`` counts
    training examples over all processes. Only rank 0 prints.
    """
    check_eval_schedule(eval_freq, eval_iter)
    prepare_device_for_training(device)
    train_losses: list[float] = []
    val_losses: list[float] = []
    train_accs: list[float] = []
    val_accs: list[float] = []
    local_examples = 0
    global_step = -1
    bar = tqdm(
        total=num_epochs * len(train_loader),
        desc="fine-tune",
        unit="step",
        disable=not (show_progress and is_main_process()),
    )

    def log(message: str) -> None:
        if is_main_process():
            tqdm.write(message)

    try:
        for epoch in range(num_epochs):
            set_epoch(train_loader, epoch)
            model.train()
            for input_batch, target_batch in train_loader:
                optimizer.zero_grad()
                loss = calc_loss_batch_classification(input_batch, target_batch, model, device)
                loss.backward()
                optimizer.step()
                local_examples += input_batch.shape[0]
                global_step += 1
                bar.update(1)

                if global_step % eval_freq == 0:
                    train_loss, val_loss = evaluate_model(
                        model, train_loader, val_loader, device, eval_iter, loss_fn=calc_loss_batch_classification
                    )
                    train_losses.append(train_loss)
                    val_losses.append(val_loss)
                    log(f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")

            train_acc = calc_accuracy_loader(train_loader, model, device, num_batches=eval_iter)
            val_acc = calc_accuracy_loader(val_loader, model, device, num_batches=eval_iter)
            train_accs.append(train_acc)
            val_accs.append(val_acc)
            log(f"Training accuracy: {train_acc * 100:.2f}% | Validation accuracy: {val_acc * 100:.2f}%")
    finally:
        bar.close()
    return train_losses, val_losses, train_accs, val_accs, int(all_reduce_sum(local_examples))


def _context_length(model: nn.Module) -> int | None:
    """The longest input the model accepts (None when it does not say)."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "context_length"):
        return int(cfg.context_length)
    pos_emb = getattr(model, "pos_emb", None)
    return int(pos_emb.weight.shape[0]) if pos_emb is not None else None


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
    context_length = _context_length(plain)
    limits = [n for n in (max_length, context_length) if n is not None]
    limit = min(limits) if limits else None
    ids = tokenizer.encode(text)[:limit]
    if limit is not None and max_length is not None:
        ids = ids + [pad_token_id] * (limit - len(ids))
    if not ids:
        raise ValueError("The text encodes to no tokens; give a non-empty text or a max_length to pad to.")
    input_ids = torch.tensor(ids, dtype=torch.long, device=device).unsqueeze(0)  # (1, T)
    was_training = plain.training
    plain.eval()
    try:
        with torch.no_grad():
            predicted = int(plain(input_ids)[0, -1, :].argmax())  # last position's class
    finally:
        plain.train(was_training)
    if predicted not in names:
        raise ValueError(f"The model predicted class {predicted}, which has no name in labels={labels}.")
    return names[predicted]
