"""Tests for course_utils.classify: the classification head, last-token loss, accuracy, training."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from course_utils.classify import (
    add_classification_head,
    calc_accuracy_loader,
    calc_loss_batch_classification,
    calc_loss_loader_classification,
    classify_text,
    train_classifier,
)
from course_utils.gpt import GPTConfig, GPTModel
from course_utils.spam import LABELS, SpamDataset, load_spam_splits
from course_utils.tokenizers import gpt2_tokenizer
from course_utils.train import make_optimizer

MAX_LEN = 24  # tokens per message in these tests


def classifier(seed: int = 0, train_last_blocks: int = 1, **cfg) -> GPTModel:
    torch.manual_seed(seed)
    model = GPTModel(GPTConfig.tiny(context_length=MAX_LEN, **cfg))
    return add_classification_head(model, num_classes=2, train_last_blocks=train_last_blocks)


class LastTokenParity(nn.Module):
    """A stand-in model: at every position, logits say "class = token id % 2", except that
    the last position is the only one where a real decision is made (earlier positions
    always vote for class 0). Lets tests count correct answers by hand."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, 2)
        logits = torch.zeros(*idx.shape, 2)
        logits[..., 0] = 1.0  # earlier positions: class 0
        last = idx[:, -1] % 2  # (B,)
        logits[:, -1, :] = F.one_hot(last, 2).float() * 3.0
        return logits


# --- the head --------------------------------------------------------------------


@pytest.mark.parametrize("train_last_blocks", [0, 1, 2])
def test_only_head_last_blocks_and_final_norm_are_trainable(train_last_blocks):
    model = classifier(train_last_blocks=train_last_blocks)
    n_layers = model.cfg.n_layers
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {"out_head.weight", "out_head.bias", "final_norm.scale", "final_norm.shift"}
    for block in range(n_layers - train_last_blocks, n_layers):
        expected |= {f"trf_blocks.{block}.{name}" for name, _ in model.trf_blocks[block].named_parameters()}
    assert trainable == expected
    assert model.out_head.weight.shape == (2, model.cfg.emb_dim)


def test_classification_head_unties_tied_weights():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.tiny(tie_weights=True))
    assert model.out_head.weight is model.tok_emb.weight
    embedding_before = model.tok_emb.weight.detach().clone()
    add_classification_head(model, num_classes=3)
    assert model.out_head.weight is not model.tok_emb.weight
    assert model.out_head.weight.shape == (3, model.cfg.emb_dim)
    assert not model.tok_emb.weight.requires_grad, "the embedding stays frozen"
    assert model.out_head.weight.requires_grad
    assert torch.equal(model.tok_emb.weight, embedding_before)
    assert model.cfg.tie_weights is False
    assert model(torch.randint(0, 100, (2, 5))).shape == (2, 5, 3)


def test_bad_train_last_blocks_is_refused():
    with pytest.raises(ValueError, match="train_last_blocks"):
        classifier(train_last_blocks=5)


# --- last-token loss and accuracy --------------------------------------------------------


def test_loss_is_cross_entropy_of_the_last_position():
    model = classifier()
    inputs = torch.randint(0, 50257, (4, 10))
    labels = torch.tensor([0, 1, 1, 0])
    loss = calc_loss_batch_classification(inputs, labels, model, "cpu")
    with torch.no_grad():
        logits = model(inputs)  # (B, T, 2)
    torch.testing.assert_close(loss.detach(), F.cross_entropy(logits[:, -1], labels), rtol=1e-6, atol=1e-6)
    assert not torch.isclose(loss.detach(), F.cross_entropy(logits[:, 0], labels)), "not the first position"

    # causal attention: a change in an earlier (padding) token reaches the last position ...
    changed = inputs.clone()
    changed[:, 2] = 50256
    changed_loss = calc_loss_batch_classification(changed, labels, model, "cpu").detach()
    with torch.no_grad():
        changed_logits = model(changed)
    assert not torch.equal(changed_logits[:, -1], logits[:, -1])
    # ... and the loss still equals the cross-entropy of the last position
    torch.testing.assert_close(changed_loss, F.cross_entropy(changed_logits[:, -1], labels), rtol=1e-6, atol=1e-6)


def test_loss_with_a_stub_model_reads_only_the_last_position():
    inputs = torch.tensor([[4, 4, 3], [4, 4, 2]])  # last tokens: odd, even -> predicted 1, 0
    labels = torch.tensor([1, 0])
    loss = calc_loss_batch_classification(inputs, labels, LastTokenParity(), "cpu")
    expected = F.cross_entropy(torch.tensor([[0.0, 3.0], [3.0, 0.0]]), labels)
    torch.testing.assert_close(loss, expected)


def test_accuracy_equals_the_hand_count():
    # predicted class = last token % 2 (see LastTokenParity)
    inputs = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 4], [0, 5], [0, 6], [0, 7]])  # predicted 1,0,1,0,1,0,1
    labels = torch.tensor([1, 0, 0, 0, 1, 1, 0])  # correct:            y y n y y n n
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=3)  # batches of 3, 3, 1
    stub = LastTokenParity()
    assert calc_accuracy_loader(loader, stub, "cpu") == pytest.approx(4 / 7)
    assert calc_accuracy_loader(loader, stub, "cpu", num_batches=1) == pytest.approx(2 / 3)
    assert calc_accuracy_loader(loader, stub, "cpu", num_batches=2) == pytest.approx(4 / 6)
    empty = DataLoader(TensorDataset(inputs[:0], labels[:0]), batch_size=3)
    assert math.isnan(calc_accuracy_loader(empty, stub, "cpu"))


def test_accuracy_restores_train_mode():
    model = classifier()
    model.train()
    loader = DataLoader(TensorDataset(torch.randint(0, 50257, (4, 6)), torch.tensor([0, 1, 0, 1])), batch_size=2)
    calc_accuracy_loader(loader, model, "cpu")
    assert model.training


# --- training and prediction ------------------------------------------------------------


@pytest.fixture(scope="module")
def spam_loaders() -> tuple[DataLoader, DataLoader, DataLoader]:
    train_rows, val_rows, _ = load_spam_splits()
    train_set = SpamDataset(train_rows[:48], max_length=MAX_LEN)
    val_set = SpamDataset(val_rows[:16], max_length=MAX_LEN)
    shuffled = DataLoader(train_set, batch_size=8, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    fixed = DataLoader(train_set, batch_size=8)  # same examples, fixed order, for measuring
    return shuffled, DataLoader(val_set, batch_size=8), fixed


def _hand_metrics(model, loader) -> tuple[float, float]:
    """Loss per example and accuracy, counted by hand in eval mode."""
    model.eval()
    losses, correct, total = [], 0, 0
    with torch.no_grad():
        for x, y in loader:
            last = model(x)[:, -1, :]
            losses.append(F.cross_entropy(last, y, reduction="sum").item())
            correct += int((last.argmax(-1) == y).sum())
            total += len(y)
    model.train()
    return sum(losses) / total, correct / total


def test_train_classifier_equals_the_written_out_loop_and_records_both_metrics(spam_loaders, capsys):
    _, val_loader, _ = spam_loaders
    dataset = spam_loaders[0].dataset

    def shuffled() -> DataLoader:  # the same order every time it is built
        return DataLoader(dataset, batch_size=8, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(7))

    train_loader = shuffled()
    model, twin = classifier(seed=5), classifier(seed=5)
    optimizer = make_optimizer(model, lr=1e-3)
    twin_opt = make_optimizer(twin, lr=1e-3)
    history = train_classifier(model, train_loader, val_loader, optimizer, "cpu", num_epochs=4, eval_every=5,
                               show_progress=False)
    twin_loader = shuffled()
    for _ in range(4):  # the same steps, written out
        for x, y in twin_loader:
            twin_opt.zero_grad()
            F.cross_entropy(twin(x)[:, -1, :], y).backward()
            twin_opt.step()
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} differs from the written-out loop")

    steps = 4 * len(train_loader)
    assert history.step == [0, 5, 10, 15, 20, steps][: len(history.step)] and history.step[-1] == steps
    assert history.seen == [s * 8 for s in history.step] and history.unit == "examples"
    assert set(history.metrics) == {"train_loss", "val_loss", "train_acc", "val_acc"}
    val_loss, val_acc = _hand_metrics(model, val_loader)
    assert history["val_loss"][-1] == pytest.approx(val_loss, rel=1e-5)
    assert history["val_acc"][-1] == pytest.approx(val_acc)
    assert history["train_loss"][-1] < history["train_loss"][0] - 0.05
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ["step", "epoch", "examples", "train_acc", "train_loss", "val_acc", "val_loss"]


def test_accuracy_is_measured_without_dropout():
    """With heavy dropout, train-mode predictions would vary; the accuracy must equal eval mode's count."""
    model = classifier(seed=2, drop_rate=0.9, train_last_blocks=2)
    model.train()
    g = torch.Generator().manual_seed(1)
    loader = DataLoader(TensorDataset(torch.randint(0, 50257, (40, 8), generator=g), torch.randint(0, 2, (40,), generator=g)),
                        batch_size=8)
    _, expected = _hand_metrics(model, loader)
    assert [calc_accuracy_loader(loader, model, "cpu") for _ in range(3)] == [pytest.approx(expected)] * 3
    assert model.training


def test_classify_text_matches_the_models_last_position():
    model = classifier(seed=3)
    tokenizer = gpt2_tokenizer()
    names = {v: k for k, v in LABELS.items()}
    for text in ["You are a winner! Call now to claim your prize", "See you at dinner tonight?"]:
        ids = tokenizer.encode(text)[:MAX_LEN]
        padded = torch.tensor([ids + [50256] * (MAX_LEN - len(ids))])
        unpadded = torch.tensor([ids])
        with torch.no_grad():
            expected_padded = names[int(model(padded)[0, -1].argmax())]
            expected_plain = names[int(model(unpadded)[0, -1].argmax())]
        assert classify_text(text, model, tokenizer, "cpu", max_length=MAX_LEN) == expected_padded
        assert classify_text(text, model, tokenizer, "cpu") == expected_plain
    # the stub decides by the last token's parity: "hi" ends in an odd or even id, padding (50256) is even
    last_id = tokenizer.encode("hi")[-1]
    parity = {"even": 0, "odd": 1}
    assert classify_text("hi", LastTokenParity(), tokenizer, "cpu", labels=parity) == ("odd" if last_id % 2 else "even")
    assert classify_text("hi", LastTokenParity(), tokenizer, "cpu", max_length=5, labels=parity) == "even"
    long_text = "word " * 100  # longer than the context: cut, not an error
    assert classify_text(long_text, model, tokenizer, "cpu") in LABELS


# --- the finer points ---------------------------------------------------------------------


def test_head_matches_the_models_dtype_and_bad_arguments_are_refused():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.tiny(vocab_size=100, context_length=8)).double()
    add_classification_head(model, num_classes=3)
    assert model.out_head.weight.dtype == torch.float64 and model.out_head.bias.dtype == torch.float64
    assert model(torch.randint(0, 100, (2, 5))).dtype == torch.float64
    for bad in (dict(num_classes=1), dict(train_last_blocks=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            add_classification_head(GPTModel(GPTConfig.tiny(vocab_size=100, context_length=8)), **bad)


def test_loss_loader_is_per_example_over_the_first_batches():
    inputs = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 4], [0, 5]])
    labels = torch.tensor([1, 1, 0, 0, 1])
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=2)  # batches of 2, 2, 1
    stub = LastTokenParity()
    last = stub(inputs)[:, -1]
    per_example = F.cross_entropy(last, labels, reduction="none")
    assert calc_loss_loader_classification(loader, stub, "cpu") == pytest.approx(per_example.mean().item())
    assert calc_loss_loader_classification(loader, stub, "cpu", num_batches=1) == pytest.approx(per_example[:2].mean().item())


def test_train_classifier_passes_on_clipping_and_eval_batches(spam_loaders):
    _, val_loader, fixed = spam_loaders
    model = classifier(seed=1)
    optimizer = make_optimizer(model, lr=1e-3)
    norms = []

    def hook(opt, args, kwargs):
        grads = [p.grad.flatten() for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.cat(grads)).item())

    optimizer.register_step_pre_hook(hook)
    first_batch = [next(iter(fixed))]
    loss_0, acc_0 = _hand_metrics(model, first_batch)
    history = train_classifier(model, fixed, val_loader, optimizer, "cpu", num_epochs=1, eval_every=100, eval_batches=1,
                               max_grad_norm=1e-3, show_progress=False, log=False)
    assert norms == pytest.approx([1e-3] * len(fixed), rel=1e-3), "every step clipped"
    assert history["train_loss"][0] == pytest.approx(loss_0, rel=1e-6) and history["train_acc"][0] == pytest.approx(acc_0)


class ModeDependent(nn.Module):
    """Says class 1 in training mode and class 0 in eval mode (at every position)."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*idx.shape, 2)
        logits[..., 1 if self.training else 0] = 1.0
        return logits


def test_classify_text_predicts_in_eval_mode_and_restores_the_mode():
    stub = ModeDependent().train()
    assert classify_text("hello", stub, gpt2_tokenizer(), "cpu") == "ham"  # class 0
    assert stub.training


def test_classify_text_pads_with_the_given_id_and_refuses_what_it_cannot_name():
    tokenizer = gpt2_tokenizer()
    parity = {"even": 0, "odd": 1}
    stub = LastTokenParity()
    assert classify_text("hi", stub, tokenizer, "cpu", max_length=5, pad_token_id=7, labels=parity) == "odd"
    assert classify_text("hi", stub, tokenizer, "cpu", max_length=5, pad_token_id=8, labels=parity) == "even"
    with pytest.raises(ValueError, match="no tokens"):
        classify_text("", stub, tokenizer, "cpu")
    with pytest.raises(ValueError, match="no name"):
        classify_text("hi", stub, tokenizer, "cpu", max_length=5, pad_token_id=7, labels={"even": 0})


def test_classify_text_never_goes_past_the_context_and_pads_only_to_max_length():
    model = classifier(seed=3)  # context of MAX_LEN tokens
    tokenizer = gpt2_tokenizer()
    long_text = "word " * 100
    assert classify_text(long_text, model, tokenizer, "cpu", max_length=4 * MAX_LEN) == classify_text(
        long_text, model, tokenizer, "cpu", max_length=MAX_LEN)
    short = "Call now"
    lengths = []
    model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    classify_text(short, model, tokenizer, "cpu")
    classify_text(short, model, tokenizer, "cpu", max_length=10)
    classify_text(long_text, model, tokenizer, "cpu", max_length=4 * MAX_LEN)
    assert lengths == [len(tokenizer.encode(short)), 10, MAX_LEN], "no padding without max_length; cut to the context"
