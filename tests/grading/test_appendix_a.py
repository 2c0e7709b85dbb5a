"""Assignment appendix_a's checks against the reference, correct variants, and deliberate mistakes."""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from course_utils.grading import appendix_a

from .helpers import Cases, registry_tests, right, wrong


def sq_dist_expanded(a, b):
    """Correct: |a|^2 + |b|^2 - 2 a.b."""
    return (a**2).sum(-1).unsqueeze(-1) + (b**2).sum(-1).unsqueeze(-2) - 2 * a @ b.transpose(-2, -1)


def loss_and_grads_by_hand(x, y, w, b):
    """Correct: the gradients derived by hand."""
    p = torch.sigmoid(x @ w + b)
    loss = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    return loss, x.T @ (p - y) / len(y), (p - y).mean()


def make_loss_and_grads(mistake):
    def fn(x, y, w, b):
        w = w.clone().requires_grad_()
        b = b.clone().requires_grad_()
        p = torch.sigmoid(x @ w + b)
        if mistake == "sum":
            loss = F.binary_cross_entropy(p, y, reduction="sum")
        elif mistake == "mse":
            loss = F.mse_loss(p, y)
        elif mistake == "flipped":
            loss = F.binary_cross_entropy(p, 1 - y)
        loss.backward()
        return loss.detach(), w.grad, b.grad
    return fn


class MLPNamed(nn.Module):
    """Correct: named layers and F.relu."""

    def __init__(self, n_inputs, n_hidden, n_classes):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(n_inputs, n_hidden), nn.Linear(n_hidden, n_hidden), nn.Linear(n_hidden, n_classes)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def make_mlp(mistake):
    class Broken(MLPNamed):
        def forward(self, x):
            if mistake == "linear":
                return self.fc3(self.fc2(self.fc1(x)))
            return F.relu(super().forward(x))
    return Broken


def epochs_tensor_total(model, train_loader, optimizer, num_epochs):
    """Correct: zero_grad first, a tensor total per epoch."""
    out = []
    for _ in range(num_epochs):
        model.train()
        total = torch.zeros(())
        for features, labels in train_loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(features), labels)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        out.append(float(total / len(train_loader)))
    return out


def make_epochs(mistake):
    def fn(model, train_loader, optimizer, num_epochs):
        out = []
        for _ in range(num_epochs):
            losses = []
            for features, labels in train_loader:
                if mistake == "noisy":
                    features = features + 1e-3 * random.random()
                loss = F.cross_entropy(model(features), labels)
                if mistake != "no_zero_grad":
                    optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            out.append(losses[-1] if mistake == "last" else sum(losses) / len(losses))
        return out
    return fn


CASES = {
    "check_pairwise_sq_distances": Cases(
        right=[right(f"{name}-{label}", fn, **kw) for name, fn in (("cdist_squared", lambda a, b: torch.cdist(a, b) ** 2), ("expanded", sq_dist_expanded))
               for label, kw in (("default", {}), ("batched_float64", dict(num_a=5, num_b=2, dim=3, batch_shape=(2,), seed=1, dtype=torch.float64)))],
        wrong=[wrong("distances", torch.cdist, "these are the distances"),
               wrong("l1", lambda a, b: torch.cdist(a, b, p=1), "L1"),
               wrong("swapped", lambda a, b: torch.cdist(b, a) ** 2, "wrong shape", "(4, 3)")],
    ),
    "check_loss_and_grads": Cases(
        right=[right(f"{name}-{label}", fn, **kw) for name, fn in (("reference", appendix_a._ref_loss_and_grads), ("by_hand", loss_and_grads_by_hand))
               for label, kw in (("default", {}), ("float64", dict(num_examples=5, dim=4, seed=2, dtype=torch.float64)))],
        wrong=[wrong("sum", make_loss_and_grads("sum"), "summed"),
               wrong("mse", make_loss_and_grads("mse"), "mean squared error"),
               wrong("flipped", make_loss_and_grads("flipped"), "flipped"),
               wrong("two_values", lambda x, y, w, b: (torch.zeros(()), torch.zeros(3)), "expected 3 return value(s)")],
    ),
    "check_mlp": Cases(
        right=[right(f"{name}-{label}", cls, **kw) for name, cls in (("reference", appendix_a._RefMLP), ("named_layers", MLPNamed))
               for label, kw in (("default", {}), ("float64", dict(n_inputs=3, n_hidden=8, n_classes=4, seed=2, dtype=torch.float64)))],
        wrong=[wrong("linear", make_mlp("linear"), "no activation"),
               wrong("relu_out", make_mlp("relu_out"), "follows the last layer")],
    ),
    "check_train_epochs": Cases(
        right=[right(f"{name}-{label}", fn, **kw) for name, fn in (("reference", appendix_a._ref_train_epochs), ("tensor_total", epochs_tensor_total))
               for label, kw in (("default", {}), ("short", dict(num_epochs=4, num_points=120, batch_size=16, lr=0.02, threshold=None, seed=3)))],
        wrong=[wrong("no_zero_grad", make_epochs("no_zero_grad"), "optimizer.zero_grad()"),
               wrong("last", make_epochs("last"), "last batch's loss"),
               wrong("noisy", make_epochs("noisy"), "two runs"),
               wrong("one_number", lambda *a: [1.0], "list of 10 losses"),
               # a right loop under a threshold it cannot reach: the threshold is checked too
               wrong("threshold_not_reached", appendix_a._ref_train_epochs, "is not below", threshold=1e-6)],
    ),
}

test_correct_passes, test_mistake_fails, test_early_return_is_caught = registry_tests(appendix_a, CASES)
