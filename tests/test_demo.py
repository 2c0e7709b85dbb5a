"""The README's demo command trains a GPT end to end and the loss goes down."""
from __future__ import annotations

import math

from course_utils.demo import main


def test_demo_pretraining_lowers_the_loss(capsys):
    result = main(["--size", "tiny", "--epochs", "2", "--context-length", "64", "--eval-iter", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert "Every effort moves you" in out and "final train loss" in out
    losses = result["train_losses"]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses  # a random model starts near ln(50257) = 10.8
