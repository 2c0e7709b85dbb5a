"""Tests for course_utils.plots: the figures show the history's numbers, headless."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from course_utils.history import History
from course_utils.plots import plot_history, plot_lr


def _history(unit: str = "tokens") -> History:
    """Two epochs of 4 steps, evaluated every 2 steps; 100 tokens per step."""
    history = History(unit=unit)
    for step in range(0, 9, 2):
        history.record(step, step / 4, 100 * step, train_loss=5 - 0.5 * step, val_loss=5 - 0.2 * step,
                       train_acc=0.1 * step, val_acc=0.05 * step)
    history.lr.extend([1e-3 * (s + 1) / 8 for s in range(8)])
    return history


def test_plot_history_draws_train_and_val_against_what_was_seen():
    history = _history()
    fig = plot_history(history)
    (ax,) = fig.axes
    lines = [line for line in ax.get_lines() if line.get_label() in ("training", "validation")]
    assert [line.get_label() for line in lines] == ["training", "validation"]
    assert list(lines[0].get_xdata()) == history.seen and list(lines[0].get_ydata()) == history["train_loss"]
    assert list(lines[1].get_ydata()) == history["val_loss"]
    assert ax.get_xlabel() == "tokens seen"
    # one marker line per finished epoch: after 4 steps (400 tokens) and after 8 (800)
    epoch_lines = [line for line in ax.get_lines() if line not in lines]
    assert sorted(line.get_xdata()[0] for line in epoch_lines) == [400, 800]


def test_plot_history_one_panel_per_metric_with_percent_accuracy():
    fig = plot_history(_history("examples"), metrics=("loss", "acc"))
    assert [ax.get_title() for ax in fig.axes] == ["Cross-entropy loss", "Accuracy"]
    assert fig.axes[1].get_xlabel() == "examples seen"
    assert fig.axes[1].yaxis.get_major_formatter()(0.5, 0).startswith("50")


def test_plot_history_refuses_unknown_metrics_and_empty_histories():
    with pytest.raises(KeyError, match="train_perplexity"):
        plot_history(_history(), metrics=("perplexity",))
    with pytest.raises(ValueError, match="no evaluations"):
        plot_history(History())


def test_plot_lr_has_one_point_per_step():
    history = _history()
    (line,) = plot_lr(history).axes[0].get_lines()
    assert list(line.get_ydata()) == history.lr and list(line.get_xdata()) == list(range(1, 9))
    assert list(plot_lr([1.0, 2.0]).axes[0].get_lines()[0].get_ydata()) == [1.0, 2.0]
    with pytest.raises(ValueError):
        plot_lr(History())


def test_plots_do_not_register_with_pyplot():
    before = plt.get_fignums()
    plot_history(_history())
    plot_lr(_history())
    assert plt.get_fignums() == before


def test_epoch_lines_are_interpolated_between_evaluations():
    """Evaluations every 3 steps, 4 steps per epoch: the epochs end between rows."""
    history = History()
    for step in (0, 3, 6, 8):
        history.record(step, step / 4, 100 * step, train_loss=1.0, val_loss=1.0)
    (ax,) = plot_history(history).axes
    curves = [line for line in ax.get_lines() if line.get_label() in ("training", "validation")]
    ends = sorted(line.get_xdata()[0] for line in ax.get_lines() if line not in curves)
    assert ends == pytest.approx([400, 800])


def test_plot_history_legend_formats_and_distinct_curves():
    history = History()
    for step in range(3):
        history.record(step, step / 2, 6000 * step, train_perplexity=9.0 - step, val_perplexity=9.5 - step)
    (ax,) = plot_history(history, metrics=("perplexity",)).axes
    assert ax.get_title() == "perplexity", "a metric without a set title is named as it is"
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["training", "validation"]
    assert ax.xaxis.get_major_formatter()(12_000, 0) == "12k", "tokens seen in engineering notation"
    train, val = [line for line in ax.get_lines() if line.get_label() in ("training", "validation")]
    assert train.get_linestyle() != val.get_linestyle() and train.get_color() != val.get_color()


def test_plot_lr_axis_label():
    ax = plot_lr([1e-4, 2e-4, 1.5e-4]).axes[0]
    assert ax.get_xlabel() == "optimizer step" and ax.get_title() == "Learning rate per step"
    assert ax.yaxis.get_major_formatter()(0.0002, 0) in ("200\u00b5", "200\u03bc")  # micro sign or Greek mu
