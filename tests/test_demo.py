"""The README's demo command trains a GPT end to end and the loss goes down."""
from __future__ import annotations

import math

from course_utils.demo import START_CONTEXT, main


def test_demo_pretraining_lowers_the_loss(capsys):
    result = main(["--size", "tiny", "--epochs", "2", "--context-length", "64", "--eval-batches", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert START_CONTEXT in out and "final train loss" in out
    assert "sample after epoch 2:" in out  # the loop printed a sample per epoch
    losses = result["history"]["train_loss"]
    assert all(math.isfinite(x) for x in losses)
    # the first row is the untrained model: near ln(50257) = 10.8 with GPT-2's initialisation
    assert losses[-1] < losses[0] - 0.5, losses
