"""Checks of assignment appendix_a (PyTorch in brief).

:func:`check_pairwise_sq_distances` (broadcasting), :func:`check_loss_and_grads`
(autograd), :func:`check_mlp` (a small network, after weight transfer) and
:func:`check_train_epochs` (a training loop run next to the reference on the two-moons
data of :func:`course_utils.toy_data.make_moons`, importable from here too).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..toy_data import make_moons
from ..train import train_step as _ref_train_step
from .core import (
    CheckFailed,
    Tolerance,
    _as_number,
    _call,
    _fmt_num,
    _fmt_shape,
    _fmt_values,
    _message,
    _one_thread,
    _seeded_ints,
    check_function,
    check_tensor_close,
    seeded_randn,
)
from .modules import _build, check_module_against_reference

__all__ = ["make_moons", "check_pairwise_sq_distances", "check_loss_and_grads", "check_mlp", "check_train_epochs"]


# --- broadcasting and autograd --------------------------------------------------------


def check_pairwise_sq_distances(
    fn: Callable,
    *,
    num_a: int = 4,
    num_b: int = 3,
    dim: int = 2,
    batch_shape: Sequence[int] = (),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Grade ``fn(a, b)``: a (..., N, d), b (..., M, d) -> (..., N, M) squared Euclidean distances."""
    a = seeded_randn(*batch_shape, num_a, dim, seed=seed, dtype=dtype)
    b = seeded_randn(*batch_shape, num_b, dim, seed=seed + 1, dtype=dtype)
    case = f"a of shape {_fmt_shape(a.shape)}, b of shape {_fmt_shape(b.shape)}, {dtype}"

    def reference(x, y):
        return ((x.unsqueeze(-2) - y.unsqueeze(-3)) ** 2).sum(dim=-1)

    def diagnoses(x, y):
        d2 = reference(x, y)
        return [(d2.sqrt(), "these are the distances; return their squares (skip the square root)."),
                ((x.unsqueeze(-2) - y.unsqueeze(-3)).sum(dim=-1) ** 2, "the differences were summed before squaring: square each coordinate's difference, then sum."),
                ((x.unsqueeze(-2) - y.unsqueeze(-3)).abs().sum(dim=-1), "this is the L1 (Manhattan) distance; square the differences.")]

    check_function(fn, reference, [(case, (a, b))], name="pairwise_sq_distances", diagnoses=diagnoses,
                   hint="give a a new axis before its rows' coordinates and b one before its rows, so that their difference "
                        "broadcasts to (..., N, M, d); square it and sum over the last dimension.")


def _ref_loss_and_grads(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    w = w.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    loss = F.binary_cross_entropy_with_logits(x @ w + b, y)
    grad_w, grad_b = torch.autograd.grad(loss, (w, b))
    return loss.detach(), grad_w, grad_b


def check_loss_and_grads(
    fn: Callable,
    *,
    num_examples: int = 8,
    dim: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Grade ``fn(x, y, w, b)`` -> ``(loss, grad_w, grad_b)`` for logistic regression.

    x (N, d), y (N,) zeros and ones, w (d,), b (): ``loss`` is the mean binary
    cross-entropy of ``sigmoid(x @ w + b)`` against ``y``; the gradients are those of
    ``loss`` with respect to ``w`` and ``b`` (same shapes as w and b). Autograd or
    derived by hand: both pass.
    """
    x = seeded_randn(num_examples, dim, seed=seed, dtype=dtype)
    y = _seeded_ints(2, num_examples, seed=seed + 1).to(dtype)
    w = seeded_randn(dim, seed=seed + 2, dtype=dtype)
    b = seeded_randn(1, seed=seed + 3, dtype=dtype).reshape(())
    case = f"x {_fmt_shape(x.shape)}, y {_fmt_shape(y.shape)}, w {_fmt_shape(w.shape)}, b (), {dtype}"

    def diagnoses(x, y, w, b):
        def with_grads(loss_of: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, ...]:
            w_, b_ = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
            loss = loss_of(x @ w_ + b_)
            return (loss.detach(), *torch.autograd.grad(loss, (w_, b_)))

        return [
            (with_grads(lambda z: F.binary_cross_entropy_with_logits(z, y, reduction="sum")),
             "the losses were summed; average them over the examples (the gradients are N times too big)."),
            (with_grads(lambda z: ((torch.sigmoid(z) - y) ** 2).mean()), "this is the mean squared error; use binary cross-entropy."),
            (with_grads(lambda z: F.binary_cross_entropy_with_logits(z, 1 - y)), "the labels were flipped: y = 1 must push sigmoid(x @ w + b) up."),
        ]

    check_function(fn, _ref_loss_and_grads, [(case, (x, y, w, b))], name="loss_and_grads", diagnoses=diagnoses,
                   hint="make copies of w and b that require gradients, compute the mean binary cross-entropy of "
                        "the logistic model's predictions, call backward(), and return the loss with both gradients.")


# --- a multilayer perceptron ----------------------------------------------------------


class _RefMLP(nn.Module):
    """Appendix A's classifier: Linear -> ReLU -> Linear -> ReLU -> Linear, in ``self.layers``."""

    def __init__(self, n_inputs: int = 2, n_hidden: int = 32, n_classes: int = 2):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(n_inputs, n_hidden), nn.ReLU(),
            nn.Linear(n_hidden, n_hidden), nn.ReLU(),
            nn.Linear(n_hidden, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, n_inputs) -> (B, n_classes)
        return self.layers(x)


def _mlp_variants(ref: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, str]]:
    l1, l2, l3 = ref.layers[0], ref.layers[2], ref.layers[4]
    return [
        (l3(l2(l1(x))), "there is no activation between the layers: put nn.ReLU() after the first and the second Linear."),
        (torch.relu(l3(torch.relu(l2(torch.relu(l1(x)))))), "a ReLU follows the last layer: the outputs are logits, which may be negative."),
        (l3(torch.relu(l2(l1(x)))), "the ReLU after the first Linear layer is missing."),
        (l3(l2(torch.relu(l1(x)))), "the ReLU after the second Linear layer is missing."),
    ]


def check_mlp(
    cls: Callable,
    *,
    n_inputs: int = 2,
    n_hidden: int = 32,
    n_classes: int = 2,
    batch_size: int = 5,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Grade ``cls(n_inputs, n_hidden, n_classes)``: two hidden ReLU layers of width n_hidden, logits out."""
    case = f"x of shape ({batch_size}, {n_inputs}), n_hidden={n_hidden}, n_classes={n_classes}, {dtype}"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        student = _build(cls, (n_inputs, n_hidden, n_classes), {}, "MLP", case).to(dtype)
        reference = _RefMLP(n_inputs, n_hidden, n_classes).to(dtype)
    x = seeded_randn(batch_size, n_inputs, seed=seed + 1, dtype=dtype)
    check_module_against_reference(
        student, reference, [(case, (x,))], name="MLP", perturb_seed=seed, diagnoses=_mlp_variants,
        transfer_hint="create nn.Linear(n_inputs, n_hidden), nn.Linear(n_hidden, n_hidden) and nn.Linear(n_hidden, n_classes), in that order.",
        hint="three Linear layers with a ReLU after each of the first two, in one nn.Sequential named `layers`.",
    )


# --- a training loop ------------------------------------------------------------------


def _features_loss(features: torch.Tensor, labels: torch.Tensor, model: nn.Module, device: Any) -> torch.Tensor:
    """Appendix A's loss: cross-entropy of the model's (B, classes) outputs."""
    return F.cross_entropy(model(features.to(device)), labels.to(device))


def _ref_train_epochs(model: nn.Module, train_loader: DataLoader, optimizer: torch.optim.Optimizer, num_epochs: int,
                      mistake: str | None = None) -> list[float]:
    """Per-epoch mean of the batch losses, each step the package's :func:`course_utils.train.train_step`.

    ``mistake`` gives what a known slip would have returned, for diagnoses.
    """
    if mistake == "no_zero_grad":
        optimizer.zero_grad = lambda set_to_none=True: None  # this run's optimizer only
    per_epoch = []
    for _ in range(num_epochs):
        model.train()
        losses = [float(_ref_train_step(model, x, y, optimizer, "cpu", loss_fn=_features_loss)) for x, y in train_loader]
        per_epoch.append({"last_batch": losses[-1], "sum": sum(losses)}.get(mistake, sum(losses) / len(losses)))
    return per_epoch


_EPOCH_MISTAKES = {
    "no_zero_grad": "the gradients were never reset, so they pile up: call optimizer.zero_grad() every step.",
    "last_batch": "each entry is the last batch's loss; record the mean of all the epoch's batch losses.",
    "sum": "each entry is the sum of the batch losses; divide by the number of batches.",
}


@_one_thread
def check_train_epochs(
    fn: Callable,
    *,
    num_epochs: int = 10,
    num_points: int = 200,
    batch_size: int = 20,
    lr: float = 0.01,
    n_hidden: int = 32,
    threshold: float | None = 0.1,
    seed: int = 0,
) -> None:
    """Grade ``fn(model, train_loader, optimizer, num_epochs)`` -> a list of per-epoch mean losses.

    Each epoch: model.train(), then for every batch a cross-entropy loss, zero_grad,
    backward, step; an epoch's entry is the mean of its batch losses (``loss.item()``).
    Run on appendix A's MLP and two half-moons with Adam, against the reference loop
    with the same model, shuffling and random state: the losses must match, two runs
    must give the same numbers (determinism), the loss must fall, and (when given)
    the last epoch's loss must be below ``threshold``.
    """
    points, labels = make_moons(num_points, seed=seed)
    case = (f"MLP(2, {n_hidden}, 2) on {num_points} half-moon points, batch_size={batch_size} (shuffled, seeded), "
            f"Adam(lr={lr}), num_epochs={num_epochs}")

    def run(loop: Callable, mistake: str | None = None, student: bool = False) -> list:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = _RefMLP(2, n_hidden, 2)
            optimizer = torch.optim.Adam(model.parameters(), lr=lr)
            loader = DataLoader(TensorDataset(points, labels), batch_size=batch_size, shuffle=True,
                                generator=torch.Generator().manual_seed(seed + 1))
            if student:
                return _call(loop, model, loader, optimizer, num_epochs, what="train_epochs", case=case)
            return loop(model, loader, optimizer, num_epochs, mistake=mistake)

    expected = run(_ref_train_epochs)
    got = run(fn, student=True)
    if not isinstance(got, (list, tuple)) or len(got) != num_epochs:
        what = f"{type(got).__name__}" + (f" of length {len(got)}" if isinstance(got, (list, tuple)) else "")
        raise CheckFailed(_message(f"train_epochs: expected a list of {num_epochs} losses (one per epoch), got {what}.",
                                      case=case, hint="append the epoch's mean loss once per epoch and return the list."))
    got_t = torch.tensor([_as_number(v, name="train_epochs entries", case=case) for v in got], dtype=torch.float64)
    again = torch.tensor([_as_number(v, name="train_epochs entries", case=case) for v in run(fn, student=True)], dtype=torch.float64)
    if not torch.equal(got_t, again):
        raise CheckFailed(_message(
            "train_epochs: two runs with the same seeds gave different losses.", case=case,
            lines=[f"first run  {_fmt_values(got_t, num_epochs)}", f"second run {_fmt_values(again, num_epochs)}"],
            hint="use only the model, loader and optimizer you are given (no new random state, no state kept between calls)."))
    check_tensor_close(got_t, torch.tensor(expected, dtype=torch.float64), name="train_epochs: the epoch losses", case=case,
                       tol=Tolerance(1e-4, 1e-4),
                       diagnoses=lambda: [(torch.tensor(run(_ref_train_epochs, m), dtype=torch.float64), why)
                                          for m, why in _EPOCH_MISTAKES.items()],
                       hint="for each batch: the cross-entropy of the model's logits against the labels, clear the "
                            "gradients, backward, optimizer step, and keep the loss as a number; per epoch, the mean of them.")
    if not got_t[-1] < got_t[0]:
        raise CheckFailed(_message("train_epochs: the loss did not go down.", case=case,
                                      lines=[f"losses {_fmt_values(got_t, num_epochs)}"]))
    if threshold is not None and not float(got_t[-1]) < threshold:
        raise CheckFailed(_message(
            f"train_epochs: the last epoch's loss {_fmt_num(float(got_t[-1]))} is not below {threshold}.", case=case,
            lines=[f"losses {_fmt_values(got_t, num_epochs)}"]))
