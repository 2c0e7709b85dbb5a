"""Tests for course_utils.train: the loss, the loops, the schedule, clipping, the optimizer."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from course_utils.data import create_dataloader, train_val_split_text
from course_utils.datasets import load_the_verdict
from course_utils.gpt import GPTConfig, GPTModel
from course_utils.tokenizers import gpt2_tokenizer
from course_utils.train import (
    calc_loss_batch,
    calc_loss_loader,
    evaluate_model,
    generate_and_print_sample,
    lr_at_step,
    make_optimizer,
    train_model,
    train_model_simple,
)

SEQ = 16  # tokens per window in these tests
BATCH = 4


@pytest.fixture(scope="module")
def loaders() -> tuple[DataLoader, DataLoader]:
    """Non-shuffled loaders over the start of The Verdict: 9 training and 2 validation batches."""
    train_text, val_text = train_val_split_text(load_the_verdict()[:3000], train_ratio=0.8)
    train_loader = create_dataloader(train_text, batch_size=BATCH, max_length=SEQ, stride=SEQ, shuffle=False)
    val_loader = create_dataloader(val_text, batch_size=BATCH, max_length=SEQ, stride=SEQ, shuffle=False)
    return train_loader, val_loader


def tiny_model(seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(GPTConfig.tiny(context_length=SEQ))


# --- the loss --------------------------------------------------------------------


def test_calc_loss_batch_matches_hand_computed_cross_entropy():
    model = tiny_model()
    inputs = torch.randint(0, 50257, (2, 8))
    targets = torch.randint(0, 50257, (2, 8))
    targets[0, :3] = -100  # ignored positions must not count
    loss = calc_loss_batch(inputs, targets, model, "cpu")

    with torch.no_grad():
        log_probs = model(inputs).log_softmax(dim=-1)  # (B, T, V)
    keep = targets != -100
    picked = log_probs[keep].gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)  # (N,)
    expected = -picked.mean()
    assert loss.requires_grad, "the batch loss must keep its graph for backward()"
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-6)
    # and torch's own function on the kept positions agrees
    with torch.no_grad():
        logits = model(inputs)
    torch.testing.assert_close(loss.detach(), F.cross_entropy(logits[keep], targets[keep]), rtol=1e-6, atol=1e-6)


def test_calc_loss_loader_is_mean_of_batch_losses_and_nan_when_empty(loaders):
    train_loader, _ = loaders
    model = tiny_model()
    with torch.no_grad():
        per_batch = [calc_loss_batch(x, y, model, "cpu").item() for x, y in train_loader]
    assert calc_loss_loader(train_loader, model, "cpu") == pytest.approx(sum(per_batch) / len(per_batch), rel=1e-6)
    assert calc_loss_loader(train_loader, model, "cpu", num_batches=3) == pytest.approx(sum(per_batch[:3]) / 3, rel=1e-6)
    assert calc_loss_loader(train_loader, model, "cpu", num_batches=999) == pytest.approx(sum(per_batch) / len(per_batch), rel=1e-6)
    empty = DataLoader(TensorDataset(torch.zeros(0, SEQ, dtype=torch.long), torch.zeros(0, SEQ, dtype=torch.long)), batch_size=2)
    assert math.isnan(calc_loss_loader(empty, model, "cpu"))


@pytest.mark.parametrize("start_in_train_mode", [True, False])
def test_evaluate_model_uses_eval_mode_and_restores_the_previous_mode(loaders, start_in_train_mode):
    train_loader, val_loader = loaders
    model = tiny_model()
    model.train(start_in_train_mode)
    seen_modes = []
    model.register_forward_pre_hook(lambda module, args: seen_modes.append(module.training))
    train_loss, val_loss = evaluate_model(model, train_loader, val_loader, "cpu", eval_iter=2)
    assert seen_modes and not any(seen_modes), "evaluation must run in eval mode (dropout off)"
    assert model.training == start_in_train_mode
    assert train_loss == pytest.approx(calc_loss_loader(train_loader, model, "cpu", 2), rel=1e-6)
    assert val_loss == pytest.approx(calc_loss_loader(val_loader, model, "cpu", 2), rel=1e-6)


def test_generate_and_print_sample_prints_one_line(capsys):
    text = generate_and_print_sample(tiny_model(), gpt2_tokenizer(), "cpu", "Every effort moves you", max_new_tokens=10)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("Every effort moves you")
    assert text == out.rstrip("\n")


# --- the simple loop -----------------------------------------------------------------


def test_train_model_simple_lowers_the_loss_and_counts_tokens(loaders, capsys):
    train_loader, val_loader = loaders
    model = tiny_model()
    before = calc_loss_loader(train_loader, model, "cpu")
    optimizer = make_optimizer(model, lr=5e-3)
    train_losses, val_losses, tokens_seen = train_model_simple(
        model, train_loader, val_loader, optimizer, "cpu", num_epochs=2, eval_freq=1, eval_iter=2,
        start_context="Every effort", tokenizer=gpt2_tokenizer(), show_progress=False,
    )
    after = calc_loss_loader(train_loader, model, "cpu")
    steps = 2 * len(train_loader)
    assert len(train_losses) == len(val_losses) == len(tokens_seen) == steps  # eval_freq=1: every step
    assert tokens_seen == [BATCH * SEQ * (step + 1) for step in range(steps)]
    # a fresh model sits near ln(50257) = 10.8; 18 steps at lr 5e-3 bring it well below
    assert after < before - 2.0, f"training did not lower the loss enough: {before:.3f} -> {after:.3f}"

    lines = capsys.readouterr().out.splitlines()
    eval_lines = [line for line in lines if line.startswith("Ep ")]
    assert len(eval_lines) == steps
    assert re.fullmatch(r"Ep 1 \(Step 000000\): Train loss \d+\.\d{3}, Val loss \d+\.\d{3}", eval_lines[0])
    assert eval_lines[-1].startswith(f"Ep 2 (Step {steps - 1:06d})")
    samples = [line for line in lines if line.startswith("Every effort")]
    assert len(samples) == 2, "one sample per epoch"


def test_train_model_simple_eval_freq(loaders):
    train_loader, val_loader = loaders
    model = tiny_model()
    _, _, tokens_seen = train_model_simple(
        model, train_loader, val_loader, make_optimizer(model), "cpu", num_epochs=1, eval_freq=3, eval_iter=1,
        start_context="Every", tokenizer=gpt2_tokenizer(), show_progress=False,
    )
    evaluated_steps = [s for s in range(len(train_loader)) if s % 3 == 0]  # steps 0, 3, 6
    assert tokens_seen == [BATCH * SEQ * (s + 1) for s in evaluated_steps]


# --- the learning-rate schedule ------------------------------------------------------


def test_lr_at_step_warmup_peak_decay_and_end():
    total, warmup, peak, initial, low = 101, 10, 1e-3, 1e-5, 1e-6
    lrs = [lr_at_step(s, total, peak, warmup, initial, low) for s in range(total)]
    assert lrs[0] == pytest.approx(initial)
    # warm-up is a straight line from initial towards peak
    for s in range(warmup):
        assert lrs[s] == pytest.approx(initial + (peak - initial) * s / warmup)
    assert lrs[warmup] == pytest.approx(peak)
    assert max(lrs) == pytest.approx(peak)
    decay = lrs[warmup:]
    assert all(a >= b for a, b in zip(decay, decay[1:])), "the cosine part must never increase"
    assert lrs[-1] == pytest.approx(low), "the last step reaches min_lr"
    mid = warmup + (total - 1 - warmup) // 2  # progress exactly 0.5 (90 decay steps)
    assert lrs[mid] == pytest.approx(low + (peak - low) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[mid] == pytest.approx((peak + low) / 2)
    quarter = warmup + (total - 1 - warmup) // 4  # not exactly 0.25: use the formula
    progress = (quarter - warmup) / (total - 1 - warmup)
    assert lrs[quarter] == pytest.approx(low + (peak - low) * 0.5 * (1 + math.cos(math.pi * progress)))
    assert lr_at_step(500, total, peak, warmup, initial, low) == pytest.approx(low), "past the end: min_lr"


def test_lr_at_step_without_warmup_and_bad_arguments():
    assert lr_at_step(0, 10, 1.0, 0) == pytest.approx(1.0)
    assert lr_at_step(9, 10, 1.0, 0) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="total_steps"):
        lr_at_step(0, 0, 1.0, 0)
    with pytest.raises(ValueError):
        lr_at_step(-1, 10, 1.0, 2)


# --- appendix D's loop: schedule and clipping ----------------------------------------


def _record_grad_norms_and_lrs(optimizer: torch.optim.Optimizer) -> tuple[list[float], list[float]]:
    """Record the total gradient norm and learning rate the optimizer sees at every step."""
    norms: list[float] = []
    lrs: list[float] = []

    def hook(opt, args, kwargs):
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        lrs.append(opt.param_groups[0]["lr"])

    optimizer.register_step_pre_hook(hook)
    return norms, lrs


@pytest.mark.parametrize("max_grad_norm", [0.01, None])
def test_train_model_clips_every_step_and_follows_the_schedule(loaders, max_grad_norm):
    train_loader, val_loader = loaders
    model = tiny_model()
    optimizer = make_optimizer(model, lr=1e-3)
    norms, lrs_seen = _record_grad_norms_and_lrs(optimizer)
    history = train_model(
        model, train_loader, val_loader, optimizer, "cpu", n_epochs=1, eval_freq=4, eval_iter=1,
        start_context="Every", tokenizer=gpt2_tokenizer(), warmup_steps=3, initial_lr=1e-5, min_lr=1e-6,
        max_grad_norm=max_grad_norm, show_progress=False,
    )
    steps = len(train_loader)
    assert set(history) >= {"train_losses", "val_losses", "tokens_seen", "track_lrs"}
    expected_lrs = [lr_at_step(s, steps, 1e-3, 3, 1e-5, 1e-6) for s in range(steps)]
    assert history["track_lrs"] == pytest.approx(expected_lrs)
    assert lrs_seen == pytest.approx(expected_lrs), "the optimizer must step with the scheduled rate"
    assert len(norms) == steps
    if max_grad_norm is None:
        # unclipped gradients of this model are far larger than 0.01: the clipped run is a real test
        assert min(norms) > 0.05
    else:
        # clip_grad_norm_ scales a too-large gradient to exactly max_norm (up to its 1e-6 epsilon)
        assert max(norms) <= max_grad_norm * (1 + 1e-4)
        assert min(norms) == pytest.approx(max_grad_norm, rel=1e-3), "every step (warm-up included) is clipped"


# --- the optimizer -------------------------------------------------------------------


def test_make_optimizer_is_adamw_with_course_settings():
    model = tiny_model()
    model.tok_emb.weight.requires_grad = False  # frozen parameters stay out of the optimizer
    optimizer = make_optimizer(model)
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert group["weight_decay"] == 0.1 and group["lr"] == 4e-4
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert params == {id(p) for p in model.parameters() if p.requires_grad}
    assert group["fused"] is True, "PyTorch >= 2.4 has a fused AdamW for CPU float32 parameters"


def test_make_optimizer_falls_back_when_fused_is_unsupported(monkeypatch):
    real_adamw = torch.optim.AdamW

    class NoFusedAdamW(real_adamw):
        def __init__(self, params, fused=None, **kwargs):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be on a supported device")
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", NoFusedAdamW)
    optimizer = make_optimizer(tiny_model(), lr=1e-3, weight_decay=0.05)
    assert not optimizer.param_groups[0]["fused"]
    assert optimizer.param_groups[0]["weight_decay"] == 0.05


def test_make_optimizer_refuses_a_fully_frozen_model():
    model = tiny_model()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(model)


def test_one_training_step_matches_torch_adamw_reference():
    """make_optimizer's step equals a plain (non-fused) AdamW step with the same settings."""
    model_a, model_b = tiny_model(1), tiny_model(1)
    inputs = torch.randint(0, 50257, (2, 8))
    targets = torch.randint(0, 50257, (2, 8))
    opt_a = make_optimizer(model_a, lr=1e-3)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
    for model, opt in ((model_a, opt_a), (model_b, opt_b)):
        opt.zero_grad()
        calc_loss_batch(inputs, targets, model, "cpu").backward()
        opt.step()
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} differs after one step")


def test_loops_refuse_a_zero_eval_freq(loaders):
    train_loader, val_loader = loaders
    model = tiny_model()
    with pytest.raises(ValueError, match="eval_freq"):
        train_model_simple(model, train_loader, val_loader, make_optimizer(model), "cpu", 1, 0, 1, "Every", gpt2_tokenizer())
    with pytest.raises(ValueError, match="eval_iter"):
        train_model(model, train_loader, val_loader, make_optimizer(model), "cpu", 1, 1, 0, "Every", gpt2_tokenizer(), warmup_steps=1)
