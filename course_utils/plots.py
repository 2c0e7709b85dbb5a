"""Pictures of a training run: metric curves and the learning rate (chapters 5-6, appendix D).

Each function draws a :class:`~course_utils.history.History` onto a
:class:`matplotlib.figure.Figure` made directly (not through ``pyplot``) and returns
it without showing it. A notebook displays a returned figure once, the static site
renders it the same way, a script calls ``fig.savefig(...)``, and tests run headless
with no figures piling up in pyplot's global state.

The x-axis is how much the model has read (tokens or examples seen), the quantity
that drives learning; thin vertical lines mark where each epoch ended, so a
repeat of the same data (and the overfitting it brings) is easy to spot.
"""
from __future__ import annotations

from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, PercentFormatter

from .history import History

_TITLES = {"loss": "Cross-entropy loss", "acc": "Accuracy"}
_SPLITS = (("train", "training", "-", "tab:blue"), ("val", "validation", "--", "tab:orange"))


def _epoch_ends(history: History) -> list[float]:
    """``seen`` values at which whole epochs finished (interpolated between rows)."""
    ends = []
    points = list(zip(history.epoch, history.seen))
    for (e0, s0), (e1, s1) in zip(points, points[1:]):
        for k in range(int(e0) + 1, int(e1) + 1):
            if e1 > e0:
                ends.append(s0 + (s1 - s0) * (k - e0) / (e1 - e0))
    return ends


def _draw_metric(ax: Axes, history: History, metric: str) -> None:
    drawn = False
    for split, label, style, colour in _SPLITS:
        name = f"{split}_{metric}"
        if name in history.metrics:
            ax.plot(history.seen, history.metrics[name], style, color=colour, marker="o", markersize=2.5, label=label)
            drawn = True
    if not drawn:
        raise KeyError(f"The history has no train_{metric} or val_{metric}; it has {sorted(history.metrics)}.")
    for end in _epoch_ends(history):
        ax.axvline(end, color="0.8", linewidth=0.8, zorder=0)
    ax.set_title(_TITLES.get(metric, metric))
    ax.set_xlabel(f"{history.unit} seen")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 12k, 1.2M
    if metric == "acc":
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)


def plot_history(history: History, metrics: Sequence[str] = ("loss",)) -> Figure:
    """One panel per metric (e.g. ``("loss", "acc")``): training and validation curves
    against tokens/examples seen, with the epochs' ends marked."""
    if len(history) == 0:
        raise ValueError("The history has no evaluations yet; train first (or evaluate at least once).")
    fig = Figure(figsize=(4.2 * len(metrics) + 0.6, 3.2), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        _draw_metric(ax, history, metric)
    return fig


def plot_lr(history: History | Sequence[float]) -> Figure:
    """The learning rate of every optimizer step (appendix D's warm-up and decay)."""
    rates = history.lr if isinstance(history, History) else list(history)
    if not rates:
        raise ValueError("No learning rates to plot: the history has no training steps.")
    fig = Figure(figsize=(4.6, 3.0), layout="constrained")
    ax = fig.subplots()
    ax.plot(range(1, len(rates) + 1), rates, color="tab:green")
    ax.set_title("Learning rate per step")
    ax.set_xlabel("optimizer step")
    ax.yaxis.set_major_formatter(EngFormatter(sep=""))
    ax.grid(alpha=0.3)
    return fig
