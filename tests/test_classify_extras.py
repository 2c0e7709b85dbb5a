"""Tests for course_utils.classify.confusion_matrix (chapter 6's picture of the mistakes)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from course_utils.classify import add_classification_head, calc_accuracy_loader, confusion_matrix
from course_utils.gpt import GPTConfig, GPTModel


class LastTokenModulo(nn.Module):
    """Predicts class ``last token id % num_classes`` from the last position only;
    every earlier position votes for class 0, so reading the wrong position shows."""

    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, classes)
        logits = torch.zeros(*idx.shape, self.num_classes)
        logits[..., 0] = 1.0
        logits[:, -1, :] = F.one_hot(idx[:, -1] % self.num_classes, self.num_classes).float() * 3.0
        return logits


def loader_of(inputs: list[list[int]], labels: list[int], batch_size: int = 2) -> DataLoader:
    return DataLoader(TensorDataset(torch.tensor(inputs), torch.tensor(labels)), batch_size=batch_size)


def test_hand_made_two_by_two():
    # last tokens 3, 4, 5, 6, 7 -> predictions 1, 0, 1, 0, 1
    inputs = [[0, 3], [0, 4], [0, 5], [0, 6], [0, 7]]
    labels = [1, 1, 0, 0, 1]
    # (true, pred): (1,1) (1,0) (0,1) (0,0) (1,1)
    expected = torch.tensor([[1, 1], [1, 2]])
    got = confusion_matrix(LastTokenModulo(), loader_of(inputs, labels), "cpu")
    assert got.dtype == torch.int64
    assert torch.equal(got, expected)


def test_matches_a_count_by_hand_for_three_classes():
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 50, (23, 5), generator=gen)
    labels = torch.randint(0, 3, (23,), generator=gen)
    model = LastTokenModulo(3)
    expected = torch.zeros(3, 3, dtype=torch.int64)
    for row, label in zip(inputs.tolist(), labels.tolist()):
        expected[label, row[-1] % 3] += 1  # independent: one example at a time
    got = confusion_matrix(model, loader_of(inputs.tolist(), labels.tolist(), batch_size=4), "cpu", num_classes=3)
    assert torch.equal(got, expected)
    assert int(got.sum()) == 23


def test_num_batches_limits_the_examples():
    inputs = [[1], [2], [3], [4], [5]]
    labels = [1, 0, 1, 0, 0]
    got = confusion_matrix(LastTokenModulo(), loader_of(inputs, labels, batch_size=2), "cpu", num_batches=2)
    assert int(got.sum()) == 4
    assert torch.equal(got, torch.tensor([[2, 0], [0, 2]]))


def test_agrees_with_accuracy_and_restores_mode_on_a_gpt_classifier():
    torch.manual_seed(0)
    model = add_classification_head(GPTModel(GPTConfig.tiny(context_length=12, drop_rate=0.3)), num_classes=2)
    model.train()
    model.trf_blocks[0].eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, 1000, (19, 12), generator=gen)
    labels = torch.randint(0, 2, (19,), generator=gen)
    loader = loader_of(inputs.tolist(), labels.tolist(), batch_size=5)
    matrix = confusion_matrix(model, loader, "cpu")
    assert [m.training for m in model.modules()] == modes
    # an independent count: torch.bincount over label * 2 + prediction, all examples in one pass
    with torch.no_grad():
        model.eval()
        predicted = model(inputs)[:, -1, :].argmax(dim=-1)
    reference = torch.bincount(labels * 2 + predicted, minlength=4).reshape(2, 2)
    assert torch.equal(matrix, reference)
    accuracy = calc_accuracy_loader(loader, model, "cpu")
    assert matrix.trace().item() / matrix.sum().item() == pytest.approx(accuracy)


def test_refuses_mismatched_classes_and_labels():
    loader = loader_of([[1], [2]], [0, 1])
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix(LastTokenModulo(2), loader, "cpu", num_classes=3)
    with pytest.raises(ValueError, match="Labels"):
        confusion_matrix(LastTokenModulo(2), loader_of([[1], [2]], [0, 2]), "cpu")
