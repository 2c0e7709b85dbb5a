"""The README's demo command trains a GPT end to end and the loss goes down; its wiring and defaults."""
from __future__ import annotations

import math

import torch
from torch.utils.data import RandomSampler, SequentialSampler

from course_utils import demo
from course_utils.datasets import load_the_verdict
from course_utils.demo import START_CONTEXT, main
from course_utils.history import History
from course_utils.settings import SMOKE_ENV_VAR
from course_utils.tokenizers import gpt2_tokenizer


def test_demo_pretraining_lowers_the_loss(capsys):
    result = main(["--size", "tiny", "--epochs", "2", "--context-length", "64", "--eval-batches", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert START_CONTEXT in out and "final train loss" in out
    assert "sample after epoch 2:" in out  # the loop printed a sample per epoch
    losses = result["history"]["train_loss"]
    assert all(math.isfinite(x) for x in losses)
    # the first row is the untrained model: near ln(50257) = 10.8 with GPT-2's initialisation
    assert losses[-1] < losses[0] - 0.5, losses


# --- the wiring, with the training replaced by a stand-in (fast) ---------------------------


def _stand_in(calls: list, draws: int):
    """Replaces train_language_model: records what it was given, draws ``draws`` random numbers."""

    def train(model, train_loader, val_loader, optimizer, device, **kwargs):
        calls.append(dict(weights={k: v.clone() for k, v in model.state_dict().items()}, train_loader=train_loader,
                          val_loader=val_loader, optimizer=optimizer, **kwargs))
        torch.rand(draws)  # real training uses the random generator (dropout, shuffling)
        history = History()
        history.record(0, 0.0, 0, train_loss=10.9, val_loss=10.95)
        history.record(5, 1.0, 640, train_loss=7.5, val_loss=7.9)
        return history

    return train


def test_demo_wires_data_model_and_optimizer_as_chapter_5_does(monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setattr(demo, "train_language_model", _stand_in(calls, draws=1))
    png = tmp_path / "loss.png"
    result = main(["--size", "tiny", "--context-length", "32", "--lr", "1e-3", "--epochs", "3", "--no-progress",
                   "--plot", str(png)])
    (call,) = calls
    text = load_the_verdict()
    tokenizer = gpt2_tokenizer()
    cut = int(0.9 * len(text))  # the first 90% trains, the rest validates
    train_set, val_set = call["train_loader"].dataset, call["val_loader"].dataset
    assert tokenizer.decode(train_set.token_ids.tolist()) == text[:cut]
    assert tokenizer.decode(val_set.token_ids.tolist()) == text[cut:]
    for dataset in (train_set, val_set):  # windows of the context length, side by side
        assert dataset.max_length == 32 and dataset.starts.step == 32
    train_loader, val_loader = call["train_loader"], call["val_loader"]
    assert isinstance(train_loader.sampler, RandomSampler) and train_loader.drop_last and train_loader.batch_size == 2
    assert isinstance(val_loader.sampler, SequentialSampler) and not val_loader.drop_last
    decay, no_decay = call["optimizer"].param_groups
    assert decay["lr"] == no_decay["lr"] == 1e-3 and decay["weight_decay"] == 0.1
    assert call["num_epochs"] == 3 and call["eval_every"] == 5 and call["prompt"] == demo.START_CONTEXT
    assert set(result) == {"history", "seconds", "peak_rss_gib"} and result["peak_rss_gib"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "final train loss 7.500, val loss 7.900; 640 tokens seen" in out


def test_demo_is_repeatable_whatever_training_draws(monkeypatch, capsys):
    """Same seed, same initial weights; the sample is reseeded, so it does not depend on training's draws."""
    calls, samples = [], []
    for draws in (1, 1000):
        monkeypatch.setattr(demo, "train_language_model", _stand_in(calls, draws))
        main(["--size", "tiny", "--context-length", "32", "--no-progress"])
        samples.append([line for line in capsys.readouterr().out.splitlines() if line.startswith("sample (")])
    first, second = (call["weights"] for call in calls)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert samples[0] == samples[1] and len(samples[0]) == 1


def test_demo_defaults_and_model_sizes(monkeypatch):
    monkeypatch.delenv(SMOKE_ENV_VAR, raising=False)
    args = demo.parse_args([])
    assert (args.size, args.epochs, args.context_length, args.batch_size) == ("small", 10, 256, 2)
    assert (args.lr, args.eval_every, args.eval_batches, args.seed, args.plot) == (4e-4, 5, 5, 123, None)
    monkeypatch.setenv(SMOKE_ENV_VAR, "1")
    quick = demo.parse_args([])
    assert (quick.size, quick.epochs, quick.context_length, quick.eval_batches) == ("tiny", 1, 64, 1)

    small = demo.build_config("small", 128)
    assert (small.emb_dim, small.n_heads, small.n_layers, small.drop_rate, small.context_length) == (256, 4, 4, 0.1, 128)
    medium = demo.build_config("355M", 64)
    assert (medium.emb_dim, medium.n_layers, medium.n_heads, medium.drop_rate, medium.context_length) == (1024, 24, 16, 0.1, 64)
    assert demo.build_config("tiny", 32).context_length == 32
