"""Training curves: losses, accuracies and learning rates (chapters 5-6, appendix D).

Every function builds a :class:`matplotlib.figure.Figure` directly (not through
``pyplot``) and returns it without showing it: a notebook displays a returned
figure once, the static site renders it the same way, a script can call
``fig.savefig(...)``, and tests run headless with no window and no figures piling
up in pyplot's global state.
"""
from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def plot_values(
    epochs_seen: Sequence[float],
    examples_seen: Sequence[float],
    train_values: Sequence[float],
    val_values: Sequence[float],
    label: str = "loss",
    examples_label: str = "Examples seen",
) -> Figure:
    """Training and validation curves against epochs, with a second x-axis on top.

    The top axis shows how many examples (or tokens) had been seen at each point;
    it shares the data of the bottom axis, only its scale differs.
    """
    if not (len(epochs_seen) == len(examples_seen) == len(train_values) == len(val_values)):
        raise ValueError(
            f"All four sequences need one entry per evaluation; got lengths {len(epochs_seen)}, "
            f"{len(examples_seen)}, {len(train_values)}, {len(val_values)}."
        )
    fig = Figure(figsize=(5, 3), layout="constrained")
    ax = fig.subplots()
    ax.plot(epochs_seen, train_values, label=f"Training {label}")
    ax.plot(epochs_seen, val_values, linestyle="-.", label=f"Validation {label}")
    ax.set_xlabel("Epochs")
    ax.set_ylabel(label.capitalize())
    ax.legend()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs only

    top = ax.twiny()  # same y-axis, second x-axis
    top.plot(examples_seen, train_values, alpha=0)  # invisible: only sets the top scale
    top.set_xlabel(examples_label)
    return fig


def plot_losses(
    epochs_seen: Sequence[float],
    tokens_seen: Sequence[float],
    train_losses: Sequence[float],
    val_losses: Sequence[float],
) -> Figure:
    """Chapter 5's loss plot: losses against epochs, tokens seen on the top axis."""
    return plot_values(epochs_seen, tokens_seen, train_losses, val_losses, label="loss", examples_label="Tokens seen")


def plot_lr(lrs: Sequence[float]) -> Figure:
    """The learning rate of every optimizer step (appendix D's warm-up and decay)."""
    fig = Figure(figsize=(5, 3), layout="constrained")
    ax = fig.subplots()
    ax.plot(range(len(lrs)), lrs)
    ax.set_xlabel("Step")
    ax.set_ylabel("Learning rate")
    return fig
