"""Tests for course_utils.history: the record of a run, its printed table and its JSON form."""
from __future__ import annotations

import json
import math

import pytest
import torch

from course_utils.history import History


def _run() -> History:
    """Three evaluations of a classifier run, with rates, a sample and running totals."""
    history = History(unit="examples")
    history.record(0, 0.0, 0, train_loss=0.9, train_acc=0.5)
    history.record(5, 0.5, 40, train_loss=0.6, train_acc=0.625)
    history.record(10, 1.0, 12_345, train_loss=0.4, train_acc=0.875)
    history.lr.extend([1e-3] * 10 + [5e-4])
    history.samples.append({"step": 10, "epoch": 1, "text": "a sample"})
    history.steps_done, history.seen_total = 11, 12_353
    return history


def test_columns_len_and_last_row():
    history = _run()
    assert len(history) == 3, "one row per evaluation (not per step: there are 11 rates)"
    assert history["step"] == [0, 5, 10] and history["seen"] == [0, 40, 12_345]
    assert history["epoch"] == [0.0, 0.5, 1.0]
    assert history["lr"] is history.lr and len(history["lr"]) == 11
    assert history["train_acc"] == [0.5, 0.625, 0.875]
    assert history.last() == {"step": 10, "epoch": 1.0, "seen": 12_345, "train_loss": 0.4, "train_acc": 0.875}
    assert History().last() == {}


def test_record_stores_plain_numbers():
    """Tensors and other number types become int/float, so the history stays JSON-ready."""
    history = History()
    history.record(torch.tensor(3), torch.tensor(0.5), torch.tensor(96), val_loss=torch.tensor(2.5))
    assert type(history.step[0]) is int and type(history.seen[0]) is int
    assert type(history.epoch[0]) is float and type(history["val_loss"][0]) is float
    json.dumps(history.to_dict())  # would raise on a tensor


def test_rows_are_fixed_width_under_their_header():
    history = _run()
    lines = history.table().splitlines()
    assert lines[0] == history.header() and lines[1:] == [history.format_row(i) for i in range(3)]
    assert len({len(line) for line in lines}) == 1, "every line of the table has the same width"
    # each column ends where its title ends: right-aligned numbers under right-aligned titles
    header = lines[0]
    ends = [header.index(title) + len(title) for title in ("step", "epoch", "examples", "train_loss", "train_acc")]
    for line in lines[1:]:
        for end in ends:
            assert line[end - 1] != " " and (end == len(line) or line[end] == " "), (line, end)
    assert lines[-1].split() == ["10", "1.00", "12,345", "0.400", "87.5%"]


def test_nan_accuracy_prints_as_nan_without_a_percent_sign():
    history = History()
    history.record(0, 0.0, 0, val_acc=math.nan, val_loss=math.nan)
    assert history.format_row().split() == ["0", "0.00", "0", "nan", "nan"]


def test_dict_round_trip_keeps_everything_and_is_a_copy():
    history = _run()
    data = history.to_dict()
    restored = History.from_dict(json.loads(json.dumps(data)))  # through real JSON, as in a checkpoint
    assert restored == history
    assert restored.samples == [{"step": 10, "epoch": 1, "text": "a sample"}]
    assert (restored.unit, restored.steps_done, restored.seen_total) == ("examples", 11, 12_353)
    # the dict is a snapshot: the run going on afterwards does not change it
    history.record(15, 1.5, 12_400, train_loss=0.3, train_acc=0.9)
    history.lr.append(1e-4)
    history.samples.append({"step": 15, "epoch": 2, "text": "later"})
    assert data["step"] == [0, 5, 10] and data["seen"] == [0, 40, 12_345] and data["epoch"] == [0.0, 0.5, 1.0]
    assert data["metrics"]["train_loss"] == [0.9, 0.6, 0.4] and len(data["lr"]) == 11 and len(data["samples"]) == 1


def test_from_dict_refuses_unknown_keys():
    data = _run().to_dict()
    data["val_perplexity"] = [1.0]
    with pytest.raises(ValueError, match="val_perplexity"):
        History.from_dict(data)
