"""What a training run records: one row per evaluation, plus the rate of every step.

A :class:`History` is a small table. Each evaluation adds a row: how many optimizer
steps were done, how far into the data that is (epochs, and tokens or examples
seen), and one value per metric (``train_loss``, ``val_loss``, ``train_acc``, ...).
Besides the rows it keeps the learning rate used at every step and the text samples
printed along the way. It turns into plain JSON (:meth:`History.to_dict`), so it can
travel inside a checkpoint and a run can be resumed from where it stopped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class History:
    """Columns of a training run's evaluations; ``history["val_loss"]`` is one column."""

    unit: str = "tokens"  # what ``seen`` counts: "tokens" (language model) or "examples"
    step: list[int] = field(default_factory=list)  # optimizer steps done at each evaluation
    epoch: list[float] = field(default_factory=list)  # epochs done (fractional) at each evaluation
    seen: list[int] = field(default_factory=list)  # tokens/examples trained on, all processes
    metrics: dict[str, list[float]] = field(default_factory=dict)  # name -> one value per evaluation
    lr: list[float] = field(default_factory=list)  # learning rate of every optimizer step
    samples: list[dict[str, Any]] = field(default_factory=list)  # {"step", "epoch", "text"}
    steps_done: int = 0  # optimizer steps taken so far (may run ahead of the last row)
    seen_total: int = 0  # tokens/examples trained on so far (all processes)

    def record(self, step: int, epoch: float, seen: int, **values: float) -> None:
        """Append one evaluation row. Every row must give the same metric names."""
        if self.step and set(values) != set(self.metrics):
            raise ValueError(
                f"This row has metrics {sorted(values)}, earlier rows have {sorted(self.metrics)}; "
                f"record the same metrics at every evaluation."
            )
        self.step.append(int(step))
        self.epoch.append(float(epoch))
        self.seen.append(int(seen))
        for name, value in values.items():
            self.metrics.setdefault(name, []).append(float(value))

    def __getitem__(self, name: str) -> list[float]:
        if name in self.metrics:
            return self.metrics[name]
        if name in ("step", "epoch", "seen", "lr"):
            return getattr(self, name)
        raise KeyError(f"No column {name!r}; this history has {['step', 'epoch', 'seen', *self.metrics]}.")

    def __len__(self) -> int:
        return len(self.step)

    def last(self) -> dict[str, float]:
        """The newest row as a dict (empty before the first evaluation)."""
        if not self.step:
            return {}
        row: dict[str, float] = {"step": self.step[-1], "epoch": self.epoch[-1], "seen": self.seen[-1]}
        row.update({name: values[-1] for name, values in self.metrics.items()})
        return row

    # --- printing ---------------------------------------------------------------------

    def header(self) -> str:
        """Column titles matching :meth:`format_row`."""
        names = "".join(f"{name:>12}" for name in self.metrics)
        return f"{'step':>6} {'epoch':>6} {self.unit:>10}{names}"

    def format_row(self, i: int = -1) -> str:
        """Row ``i`` as fixed-width text: losses with 3 decimals, accuracies as percentages."""
        cells = []
        for name, values in self.metrics.items():
            value = values[i]
            if name.endswith("acc") and not math.isnan(value):
                cells.append(f"{100 * value:>11.1f}%")
            else:
                cells.append(f"{value:>12.3f}")
        return f"{self.step[i]:>6} {self.epoch[i]:>6.2f} {self.seen[i]:>10,}" + "".join(cells)

    def table(self) -> str:
        """Every row, under a header: the run at a glance."""
        return "\n".join([self.header(), *(self.format_row(i) for i in range(len(self)))])

    # --- saving -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (for a checkpoint's ``extra``)."""
        return {
            "unit": self.unit,
            "step": list(self.step),
            "epoch": list(self.epoch),
            "seen": list(self.seen),
            "metrics": {name: list(values) for name, values in self.metrics.items()},
            "lr": list(self.lr),
            "samples": [dict(sample) for sample in self.samples],
            "steps_done": self.steps_done,
            "seen_total": self.seen_total,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "History":
        """The inverse of :meth:`to_dict`."""
        known = {"unit", "step", "epoch", "seen", "metrics", "lr", "samples", "steps_done", "seen_total"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Not a History: unexpected keys {sorted(unknown)}.")
        return cls(**{key: data[key] for key in known if key in data})
