"""Tests for course_utils.plots: each function returns a Figure with the expected content."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # headless: no window, works in CI

import pytest
from matplotlib.figure import Figure

from course_utils.plots import plot_losses, plot_lr, plot_values

EPOCHS = [0.0, 0.5, 1.0, 1.5]
TOKENS = [512, 1024, 1536, 2048]
TRAIN = [9.0, 7.5, 6.0, 5.5]
VAL = [9.2, 8.0, 7.1, 6.9]


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def test_plot_losses_has_two_curves_and_a_tokens_axis():
    fig = plot_losses(EPOCHS, TOKENS, TRAIN, VAL)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2, "epochs axis plus the twin tokens-seen axis"
    main, top = fig.axes
    assert len(main.get_lines()) == 2 and len(top.get_lines()) == 1
    assert list(main.get_lines()[0].get_ydata()) == TRAIN
    assert list(main.get_lines()[1].get_ydata()) == VAL
    assert list(top.get_lines()[0].get_xdata()) == TOKENS
    assert top.get_lines()[0].get_alpha() == 0, "the twin axis' line only sets the scale"
    assert main.get_xlabel() == "Epochs" and top.get_xlabel() == "Tokens seen"
    assert [t.get_text() for t in main.get_legend().get_texts()] == ["Training loss", "Validation loss"]
    assert png_bytes(fig).startswith(b"\x89PNG")


def test_plot_values_for_accuracies():
    accs_train, accs_val = [0.5, 0.7, 0.8, 0.9], [0.5, 0.6, 0.75, 0.8]
    fig = plot_values(EPOCHS, [8, 16, 24, 32], accs_train, accs_val, label="accuracy")
    main, top = fig.axes
    assert main.get_ylabel() == "Accuracy" and top.get_xlabel() == "Examples seen"
    assert [t.get_text() for t in main.get_legend().get_texts()] == ["Training accuracy", "Validation accuracy"]
    assert len(main.get_lines()) == 2
    with pytest.raises(ValueError, match="one entry per evaluation"):
        plot_values(EPOCHS, [8, 16], accs_train, accs_val)


def test_plot_lr_has_one_line_per_step():
    lrs = [1e-5, 5e-4, 1e-3, 7e-4, 2e-4, 1e-6]
    fig = plot_lr(lrs)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_ydata()) == lrs and list(line.get_xdata()) == list(range(len(lrs)))
    assert png_bytes(fig).startswith(b"\x89PNG")


def test_plots_do_not_register_with_pyplot():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plot_losses(EPOCHS, TOKENS, TRAIN, VAL)
    plot_lr([1.0, 0.5])
    assert plt.get_fignums() == before, "figures outside pyplot cannot pile up in notebooks or tests"
