"""Tests for course_utils.train: loss, evaluation, one step, the loop, the schedule, the optimizer, resuming."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from course_utils.checkpoint import CheckpointError, save_checkpoint
from course_utils.data import create_dataloader, train_val_split_text
from course_utils.datasets import load_the_verdict
from course_utils.gpt import GPTConfig, GPTModel
from course_utils.history import History
from course_utils.tokenizers import gpt2_tokenizer
from course_utils.train import (
    WarmupCosine,
    calc_loss_batch,
    calc_loss_loader,
    evaluate,
    fit,
    load_training_state,
    lr_at_step,
    make_optimizer,
    sample_text,
    save_training_state,
    train_language_model,
    train_step,
)

SEQ = 16  # tokens per window in these tests
BATCH = 4
PROMPT = "The studio was quiet when"


@pytest.fixture(scope="module")
def loaders() -> tuple[DataLoader, DataLoader]:
    """Non-shuffled loaders over the start of The Verdict; the last training batch is shorter."""
    train_text, val_text = train_val_split_text(load_the_verdict()[:2800], train_ratio=0.8)
    train_loader = create_dataloader(train_text, batch_size=BATCH, max_length=SEQ, stride=SEQ, shuffle=False, drop_last=False)
    val_loader = create_dataloader(val_text, batch_size=BATCH, max_length=SEQ, stride=SEQ, shuffle=False)
    sizes = [x.shape[0] for x, _ in train_loader]
    assert sizes[-1] < BATCH, "the fixture should end with a short batch (it is what some tests are about)"
    return train_loader, val_loader


def tiny_model(seed: int = 0, **overrides) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(GPTConfig.tiny(context_length=SEQ, **overrides))


def token_loader(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
    """A "loader" that yields the given batches as they are (uneven sizes allowed)."""
    return batches


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
    assert loss.requires_grad, "the batch loss must keep its graph for backward()"
    torch.testing.assert_close(loss.detach(), -picked.mean(), rtol=1e-6, atol=1e-6)


def _all_targets_loss(model, batches) -> float:
    """Reference: one cross-entropy over every counted target of every batch together."""
    with torch.no_grad():
        logits = torch.cat([model(x).flatten(0, 1) for x, _ in batches])
        targets = torch.cat([y.flatten() for _, y in batches])
    return F.cross_entropy(logits.double(), targets, ignore_index=-100).item()


def test_calc_loss_loader_weights_batches_by_their_counted_targets():
    """A short last batch and -100 padding weigh what they contain, not one batch's worth."""
    model = tiny_model().eval()
    g = torch.Generator().manual_seed(3)
    x1, y1 = torch.randint(0, 50257, (4, 6), generator=g), torch.randint(0, 50257, (4, 6), generator=g)
    x2, y2 = torch.randint(0, 50257, (1, 6), generator=g), torch.randint(0, 50257, (1, 6), generator=g)
    x3, y3 = torch.randint(0, 50257, (2, 6), generator=g), torch.randint(0, 50257, (2, 6), generator=g)
    y3[:, 1:] = -100  # mostly padding: 2 counted targets
    batches = [(x1, y1), (x2, y2), (x3, y3)]
    got = calc_loss_loader(token_loader(batches), model, "cpu")
    assert got == pytest.approx(_all_targets_loss(model, batches), rel=1e-6)
    with torch.no_grad():
        plain_mean = sum(calc_loss_batch(x, y, model, "cpu").item() for x, y in batches) / 3
    assert abs(got - plain_mean) > 1e-3, "the test data must tell a token-weighted mean from a mean of batch means"
    # num_batches takes the first ones; more than there are means all; a fully masked batch counts nothing
    assert calc_loss_loader(token_loader(batches), model, "cpu", num_batches=2) == pytest.approx(
        _all_targets_loss(model, batches[:2]), rel=1e-6)
    assert calc_loss_loader(token_loader(batches), model, "cpu", num_batches=99) == pytest.approx(got, rel=1e-12)
    masked = (x2, torch.full_like(y2, -100))
    assert calc_loss_loader(token_loader([batches[0], masked]), model, "cpu") == pytest.approx(
        _all_targets_loss(model, batches[:1]), rel=1e-6)


def test_calc_loss_loader_on_a_real_loader_and_empty_loader(loaders):
    train_loader, _ = loaders
    model = tiny_model().eval()
    assert calc_loss_loader(train_loader, model, "cpu") == pytest.approx(_all_targets_loss(model, list(train_loader)), rel=1e-6)
    empty = DataLoader(TensorDataset(torch.zeros(0, SEQ, dtype=torch.long), torch.zeros(0, SEQ, dtype=torch.long)), batch_size=2)
    assert math.isnan(calc_loss_loader(empty, model, "cpu"))


@pytest.mark.parametrize("start_in_train_mode", [True, False])
def test_evaluate_runs_in_eval_mode_without_grad_and_restores_every_modules_mode(loaders, start_in_train_mode):
    train_loader, _ = loaders
    model = tiny_model(drop_rate=0.5)
    model.train(start_in_train_mode)
    model.trf_blocks[0].eval()  # a partly frozen model: this submodule must stay in eval mode
    before = {name: m.training for name, m in model.named_modules()}
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append((module.training, torch.is_grad_enabled())))
    first = evaluate(model, train_loader, "cpu", num_batches=2)
    again = evaluate(model, train_loader, "cpu", num_batches=2)
    assert seen and all(mode == (False, False) for mode in seen), "evaluation must run in eval mode without gradients"
    assert {name: m.training for name, m in model.named_modules()} == before
    assert first == again, "with dropout off, evaluating twice gives the same numbers"


def test_sample_text_is_one_line_starting_with_the_prompt():
    model = tiny_model()
    model.train()
    text = sample_text(model, gpt2_tokenizer(), "cpu", PROMPT + "\n", max_new_tokens=10)
    assert "\n" not in text and text.startswith(PROMPT)
    assert model.training, "sampling must leave the model's mode as it was"


# --- one step ---------------------------------------------------------------------


def _manual_steps(model, optimizer, batches, max_grad_norm=None):
    """The textbook update, written out: zero, forward, backward, (clip), step."""
    for x, y in batches:
        optimizer.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()


def test_train_step_is_one_clean_update(loaders):
    train_loader, _ = loaders
    batches = list(train_loader)[:3]
    a, b = tiny_model(1), tiny_model(1)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-3)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-3)
    for x, y in batches:
        loss = train_step(a, x, y, opt_a, "cpu")
        assert not loss.requires_grad and loss.dim() == 0
    _manual_steps(b, opt_b, batches)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7, msg=f"{name} differs")


# --- the loop ----------------------------------------------------------------------


def test_fit_trains_exactly_like_the_written_out_loop(loaders):
    """Same weights as zero/forward/backward/step per batch: catches a missing zero_grad,
    a skipped or doubled step, or evaluation that changes the model."""
    train_loader, val_loader = loaders
    a, b = tiny_model(2), tiny_model(2)
    opt_a = torch.optim.AdamW(a.parameters(), lr=2e-3)
    opt_b = torch.optim.AdamW(b.parameters(), lr=2e-3)
    fit(a, train_loader, val_loader, opt_a, "cpu", num_epochs=2, eval_every=3, eval_batches=1, show_progress=False, log=False)
    _manual_steps(b, opt_b, list(train_loader) * 2)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=f"{name} differs")


def test_train_language_model_rows_steps_tokens_and_samples(loaders, capsys):
    train_loader, val_loader = loaders
    model = tiny_model()
    optimizer = make_optimizer(model, lr=5e-3)
    untrained = calc_loss_loader(train_loader, model, "cpu", 2)
    history = train_language_model(
        model, train_loader, val_loader, optimizer, "cpu", num_epochs=2, eval_every=4, eval_batches=2,
        tokenizer=gpt2_tokenizer(), prompt=PROMPT, sample_tokens=5, show_progress=False,
    )
    steps = 2 * len(train_loader)  # 18: evaluations before training, after 4, 8, 12, 16 and the last
    assert history.step == [0, 4, 8, 12, 16, steps]
    sizes = [x.numel() for x, _ in train_loader] * 2  # the short last batch counts what it holds
    assert history.seen == [sum(sizes[:s]) for s in history.step]
    assert history.seen_total == sum(sizes) and history.steps_done == steps
    assert history.epoch == pytest.approx([s / len(train_loader) for s in history.step])
    assert history["train_loss"][0] == pytest.approx(untrained, rel=1e-6), "row 0 is the untrained model"
    assert history["train_loss"][-1] < history["train_loss"][0] - 1.0
    assert len(history.lr) == steps and set(history.lr) == {5e-3}
    assert [s["epoch"] for s in history.samples] == [1, 2] and all(s["text"].startswith(PROMPT) for s in history.samples)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["step", "epoch", "tokens", "train_loss", "val_loss"]
    assert lines[1].split()[:3] == ["0", "0.00", "0"]
    assert sum("sample after epoch" in line for line in lines) == 2
    assert history.table().splitlines()[-1] == history.format_row()


def test_fit_counts_examples_when_asked(loaders):
    from course_utils.train import count_examples

    train_loader, val_loader = loaders
    model = tiny_model()
    history = fit(model, train_loader, val_loader, make_optimizer(model), "cpu", num_epochs=1, eval_every=100,
                  count=count_examples, unit="examples", show_progress=False, log=False)
    assert history.seen == [0, len(train_loader.dataset)] and history.unit == "examples"


@pytest.mark.parametrize("max_grad_norm", [0.01, None])
def test_fit_clips_every_step_and_follows_the_schedule(loaders, max_grad_norm):
    train_loader, val_loader = loaders
    model = tiny_model()
    optimizer = make_optimizer(model, lr=1e-3)
    norms, lrs_seen = [], []

    def hook(opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        lrs_seen.append(opt.param_groups[0]["lr"])

    optimizer.register_step_pre_hook(hook)
    steps = len(train_loader)
    schedule = WarmupCosine(peak_lr=1e-3, total_steps=steps, warmup_steps=3, initial_lr=1e-5, min_lr=1e-6)
    history = fit(model, train_loader, val_loader, optimizer, "cpu", num_epochs=1, eval_every=4, eval_batches=1,
                  schedule=schedule, max_grad_norm=max_grad_norm, show_progress=False, log=False)
    expected = [lr_at_step(s, steps, 1e-3, 3, 1e-5, 1e-6) for s in range(steps)]
    assert history.lr == pytest.approx(expected) and lrs_seen == pytest.approx(expected)
    assert all(g["lr"] == pytest.approx(expected[-1]) for g in optimizer.param_groups), "every group follows the schedule"
    if max_grad_norm is None:
        assert min(norms) > 0.05  # unclipped gradients are far above 0.01, so the clipped run is a real test
    else:
        assert max(norms) <= max_grad_norm * (1 + 1e-4)
        assert min(norms) == pytest.approx(max_grad_norm, rel=1e-3), "every step (warm-up included) is clipped"


def test_fit_refuses_bad_evaluation_settings(loaders):
    train_loader, val_loader = loaders
    model = tiny_model()
    with pytest.raises(ValueError, match="eval_every"):
        fit(model, train_loader, val_loader, make_optimizer(model), "cpu", num_epochs=1, eval_every=0)
    with pytest.raises(ValueError, match="eval_batches"):
        fit(model, train_loader, val_loader, make_optimizer(model), "cpu", num_epochs=1, eval_every=1, eval_batches=0)


# --- resuming ------------------------------------------------------------------------


class _StopAt:
    """A schedule that interrupts training at a given step (as Ctrl-C or a crash would)."""

    def __init__(self, schedule, stop: int):
        self.schedule, self.stop = schedule, stop

    def __call__(self, step: int) -> float:
        if step == self.stop:
            raise KeyboardInterrupt
        return self.schedule(step)


@pytest.mark.parametrize("stop", [5, 9])  # mid-epoch, and exactly at an epoch's end
def test_an_interrupted_run_resumes_from_its_checkpoint_exactly(loaders, tmp_path, stop):
    train_loader, val_loader = loaders
    steps = 2 * len(train_loader)
    schedule = WarmupCosine(peak_lr=2e-3, total_steps=steps, warmup_steps=4, initial_lr=1e-4, min_lr=1e-5)
    kwargs = dict(num_epochs=2, eval_every=3, eval_batches=1, max_grad_norm=1.0, show_progress=False, log=False)

    straight = tiny_model(4)
    straight_opt = make_optimizer(straight, lr=2e-3)
    expected = fit(straight, train_loader, val_loader, straight_opt, "cpu", schedule=schedule, **kwargs)

    first = tiny_model(4)
    first_opt = make_optimizer(first, lr=2e-3)
    history = History()
    with pytest.raises(KeyboardInterrupt):
        fit(first, train_loader, val_loader, first_opt, "cpu", schedule=_StopAt(schedule, stop), history=history, **kwargs)
    assert history.steps_done == stop
    save_training_state(tmp_path / "run", first, first_opt, history)

    resumed = tiny_model(99)  # other weights: everything must come from the checkpoint
    resumed_opt = make_optimizer(resumed, lr=0.5)
    restored = load_training_state(tmp_path / "run", resumed, resumed_opt)
    assert restored.steps_done == stop
    got = fit(resumed, train_loader, val_loader, resumed_opt, "cpu", schedule=schedule, history=restored, **kwargs)

    assert got.lr == pytest.approx(expected.lr) and got.step == expected.step and got.seen == expected.seen
    for name in ("train_loss", "val_loss"):
        assert got[name] == pytest.approx(expected[name], rel=1e-5)
    for (name, a), (_, b) in zip(resumed.named_parameters(), straight.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} differs after resuming")


def test_load_training_state_refuses_a_checkpoint_without_history(tmp_path):
    model = tiny_model()
    optimizer = make_optimizer(model)
    save_checkpoint(tmp_path / "plain", model, optimizer)
    with pytest.raises(CheckpointError, match="no training history"):
        load_training_state(tmp_path / "plain", model, optimizer)


def test_history_round_trips_and_rejects_mismatched_rows():
    history = History(unit="examples")
    history.record(0, 0.0, 0, train_loss=1.0, val_acc=0.5)
    history.record(4, 0.5, 32, train_loss=0.8, val_acc=0.75)
    history.lr.extend([1e-3] * 4)
    history.steps_done, history.seen_total = 4, 32
    assert History.from_dict(history.to_dict()) == history
    assert history.format_row().split() == ["4", "0.50", "32", "0.800", "75.0%"]
    with pytest.raises(ValueError, match="same metrics"):
        history.record(8, 1.0, 64, train_loss=0.7)
    with pytest.raises(KeyError, match="val_loss"):
        history["val_loss"]


# --- the learning-rate schedule ------------------------------------------------------


def test_lr_at_step_warmup_peak_decay_and_end():
    total, peak, warmup, initial, minimum = 20, 1e-3, 5, 1e-5, 1e-6
    rates = [lr_at_step(s, total, peak, warmup, initial, minimum) for s in range(total + 3)]
    assert rates[0] == pytest.approx(initial)
    assert rates[warmup] == pytest.approx(peak) and max(rates) == pytest.approx(peak)
    assert all(b > a for a, b in zip(rates[:warmup], rates[1 : warmup + 1])), "warm-up rises"
    assert all(b <= a for a, b in zip(rates[warmup : total - 1], rates[warmup + 1 : total])), "decay falls"
    assert rates[total - 1] == pytest.approx(minimum) and rates[total + 2] == pytest.approx(minimum)
    mid = warmup + (total - 1 - warmup) / 2  # half-way through the decay: half-way down
    assert lr_at_step(int(mid), total, peak, warmup, initial, minimum) == pytest.approx(
        minimum + (peak - minimum) * 0.5 * (1 + math.cos(math.pi * (int(mid) - warmup) / (total - 1 - warmup))))


def test_lr_at_step_without_warmup_and_bad_arguments():
    assert lr_at_step(0, 10, 1e-3, 0) == pytest.approx(1e-3)
    assert lr_at_step(0, 3, 1e-3, 3) == 0.0 and lr_at_step(3, 3, 1e-3, 3) == pytest.approx(1e-3)
    for bad in (dict(step=-1, total_steps=5), dict(step=0, total_steps=0)):
        with pytest.raises(ValueError):
            lr_at_step(peak_lr=1e-3, warmup_steps=1, **bad)
    assert WarmupCosine(1e-3, 10, 2)(1) == lr_at_step(1, 10, 1e-3, 2)


# --- the optimizer -------------------------------------------------------------------


def test_make_optimizer_decays_matrices_only():
    model = tiny_model(tie_weights=True)
    model.trf_blocks[0].requires_grad_(False)  # frozen parameters stay out of the optimizer
    optimizer = make_optimizer(model, lr=3e-4, weight_decay=0.2)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert all(g["lr"] == 3e-4 and g["fused"] is True for g in optimizer.param_groups)
    trainable = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}  # a tied matrix once
    assert {id(p) for p in decay["params"]} == {i for i, (n, p) in trainable.items() if p.dim() >= 2}
    assert {id(p) for p in no_decay["params"]} == {i for i, (n, p) in trainable.items() if p.dim() < 2}
    names_without_decay = {trainable[id(p)][0] for p in no_decay["params"]}
    assert "final_norm.scale" in names_without_decay and "trf_blocks.1.ff.layers.0.bias" in names_without_decay
    assert id(model.tok_emb.weight) in {id(p) for p in decay["params"]}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)

    undecayed = make_optimizer(model, decay_embeddings=False)
    emb_ids = {id(model.tok_emb.weight), id(model.pos_emb.weight)}
    assert emb_ids <= {id(p) for p in undecayed.param_groups[1]["params"]}


def test_make_optimizer_step_equals_torch_adamw_with_the_same_groups():
    model_a, model_b = tiny_model(1), tiny_model(1)
    inputs, targets = torch.randint(0, 50257, (2, 8)), torch.randint(0, 50257, (2, 8))
    opt_a = make_optimizer(model_a, lr=1e-3)
    groups = [{"params": [p for p in model_b.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in model_b.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt_b = torch.optim.AdamW(groups, lr=1e-3, foreach=False)
    for _ in range(2):
        _manual_steps(model_a, opt_a, [(inputs, targets)])
        _manual_steps(model_b, opt_b, [(inputs, targets)])
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} differs after two steps")


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
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]


def test_make_optimizer_refuses_a_fully_frozen_model():
    model = tiny_model()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(model)


def test_how_often_we_evaluate_does_not_change_what_is_trained(loaders):
    """Evaluating draws from the shuffling generator and torch's RNG; fit must undo that,
    or the weights would depend on eval_every (shuffled loader, dropout on)."""
    train_loader, val_loader = loaders
    results = []
    for eval_every in (1, 100):
        shuffled = DataLoader(train_loader.dataset, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(5))
        model = tiny_model(3, drop_rate=0.3)
        torch.manual_seed(11)  # the dropout masks
        fit(model, shuffled, val_loader, make_optimizer(model, lr=1e-3), "cpu", num_epochs=2, eval_every=eval_every,
            eval_batches=2, show_progress=False, log=False)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


# --- the finer points of the contract (small-vocabulary models: fast) -----------------

SMALL_VOCAB = 300  # the GPT-2 byte tokens and the first merges: "Q!" encodes to [48, 0]


def small_model(seed: int = 0, **overrides) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(GPTConfig.tiny(vocab_size=SMALL_VOCAB, context_length=8, emb_dim=32, n_heads=2, **overrides))


def random_windows(n: int, seed: int = 0, seq: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, SMALL_VOCAB, (n, seq + 1), generator=g)
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


def test_evaluate_is_nan_when_no_target_counts():
    model = small_model()
    x = torch.randint(0, SMALL_VOCAB, (2, 8))
    masked = [(x, torch.full_like(x, -100))] * 2
    assert math.isnan(calc_loss_loader(token_loader(masked), model, "cpu"))
    assert math.isnan(evaluate(model, token_loader(masked), "cpu")["loss"])


def test_make_optimizer_defaults_and_empty_groups():
    model = small_model()
    decay, no_decay = make_optimizer(model).param_groups  # chapter 5's AdamW settings
    assert decay["lr"] == no_decay["lr"] == 4e-4
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    # a group with nothing in it is left out: only LayerNorms trainable -> one group, no decay
    model.requires_grad_(False)
    model.final_norm.requires_grad_(True)
    (only,) = make_optimizer(model, weight_decay=0.3).param_groups
    assert only["weight_decay"] == 0.0 and len(only["params"]) == 2
    matrices = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False))
    (only,) = make_optimizer(matrices, weight_decay=0.3).param_groups
    assert only["weight_decay"] == 0.3


def test_lr_at_step_with_no_decay_steps_and_negative_warmup():
    # warm-up of 3 in a 4-step run: the last step (3) is the first and only one at the peak
    assert [lr_at_step(s, 4, 1e-3, 3) for s in range(4)] == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3, 1e-3])
    assert lr_at_step(4, 4, 1e-3, 3) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_at_step(0, 10, 1e-3, -1)


class _EpochSampler(torch.utils.data.DistributedSampler):
    """A one-process DistributedSampler that remembers which epochs it was told."""

    def __init__(self, dataset):
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False)
        self.told: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.told.append(epoch)
        super().set_epoch(epoch)


def test_fit_tells_the_sampler_each_epoch_and_a_resumed_run_does_only_what_is_left():
    """Epoch bookkeeping: set_epoch and after_epoch once per epoch, finished epochs not replayed."""
    dataset = random_windows(12)  # 3 steps per epoch
    kwargs = dict(num_epochs=3, eval_every=100, eval_batches=1, show_progress=False, log=False)

    def run(model, history=None, stop=None):
        sampler = _EpochSampler(dataset)
        loader = DataLoader(dataset, batch_size=4, sampler=sampler)
        ended = []

        def after_epoch(trained, epoch):
            ended.append(epoch)
            return f"end of {epoch}"

        schedule = _StopAt(lambda step: 1e-3, stop) if stop is not None else None
        history = fit(model, loader, loader, make_optimizer(model, lr=1e-3), "cpu", history=history,
                      schedule=schedule, after_epoch=after_epoch, **kwargs)
        return history, sampler.told, ended

    straight, told, ended = run(small_model())
    assert told == [0, 1, 2] and ended == [0, 1, 2]
    assert straight.samples == [{"step": 3 * (e + 1), "epoch": e + 1, "text": f"end of {e}"} for e in range(3)]

    model, history = small_model(), History()
    with pytest.raises(KeyboardInterrupt):
        run(model, history, stop=4)  # in the middle of the second epoch
    resumed, told, ended = run(model, history)
    assert told == [1, 2] and ended == [1, 2], "finished epochs are skipped, not replayed"
    assert resumed.samples == straight.samples and resumed.step == straight.step


def test_fit_trains_in_train_mode_even_when_handed_a_model_in_eval_mode():
    model = small_model(drop_rate=0.5).eval()  # as load_model_from_checkpoint returns it
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training) if torch.is_grad_enabled() else None)
    loader = DataLoader(random_windows(8), batch_size=4)
    fit(model, loader, loader, make_optimizer(model), "cpu", num_epochs=1, eval_every=1, show_progress=False, log=False)
    assert modes == [True, True], "both training forwards run with dropout on"


def test_seen_adds_up_over_several_interrupted_calls():
    loader = DataLoader(random_windows(10), batch_size=4)  # batches of 4, 4 and 2 windows
    sizes = [4 * 8, 4 * 8, 2 * 8] * 2
    kwargs = dict(num_epochs=2, eval_every=2, eval_batches=1, show_progress=False, log=False)
    model, history = small_model(), History()
    optimizer = make_optimizer(model)
    for stop in (2, 5):
        with pytest.raises(KeyboardInterrupt):
            fit(model, loader, loader, optimizer, "cpu", schedule=_StopAt(lambda s: 1e-3, stop), history=history, **kwargs)
        assert history.steps_done == stop and history.seen_total == sum(sizes[:stop])
    fit(model, loader, loader, optimizer, "cpu", history=history, **kwargs)
    assert history.step == [0, 2, 4, 6] and history.seen == [0, 64, 112, 160] and history.seen_total == sum(sizes)


def test_fit_counts_what_count_says_about_the_inputs():
    """count() is applied to the input batch: with (B,) class targets, tokens are B x T."""
    from course_utils.classify import calc_loss_batch_classification, classification_measure
    from course_utils.train import count_tokens

    g = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randint(0, SMALL_VOCAB, (6, 8), generator=g), torch.randint(0, 2, (6,), generator=g))
    loader = DataLoader(dataset, batch_size=4)  # 4 and 2 examples
    model = small_model()
    history = fit(model, loader, loader, make_optimizer(model), "cpu", num_epochs=1, eval_every=1,
                  loss_fn=calc_loss_batch_classification, measure=classification_measure, count=count_tokens,
                  show_progress=False, log=False)
    assert history.seen == [0, 32, 48] and history.seen_total == 48


def test_fit_refuses_runs_it_cannot_do():
    loader = DataLoader(random_windows(8), batch_size=4)  # 2 steps per epoch
    model = small_model()
    too_far = History(steps_done=5)
    with pytest.raises(ValueError, match="5 steps done, more than this run's 4"):
        fit(model, loader, loader, make_optimizer(model), "cpu", num_epochs=2, eval_every=1, history=too_far,
            show_progress=False, log=False)
    with pytest.raises(ValueError, match="num_epochs must be at least 0"):
        fit(model, loader, loader, make_optimizer(model), "cpu", num_epochs=-1, eval_every=1, show_progress=False, log=False)


def test_train_language_model_passes_on_schedule_clipping_and_sample_length():
    tokenizer = gpt2_tokenizer()
    prompt = "Q!"
    assert max(tokenizer.encode(prompt)) < SMALL_VOCAB
    loader = DataLoader(random_windows(8), batch_size=4)  # 2 steps per epoch
    model = small_model()
    optimizer = make_optimizer(model, lr=1.0)
    seen = []

    def hook(opt, args, kwargs):
        grads = [p.grad.flatten() for g in opt.param_groups for p in g["params"] if p.grad is not None]
        seen.append((opt.param_groups[0]["lr"], torch.linalg.vector_norm(torch.cat(grads)).item()))

    optimizer.register_step_pre_hook(hook)
    schedule = WarmupCosine(peak_lr=1e-3, total_steps=4, warmup_steps=1, initial_lr=1e-4)
    history = train_language_model(model, loader, loader, optimizer, "cpu", num_epochs=2, eval_every=10, eval_batches=1,
                                   tokenizer=tokenizer, prompt=prompt, sample_tokens=3, schedule=schedule,
                                   max_grad_norm=1e-3, show_progress=False, log=False)
    assert [lr for lr, _ in seen] == pytest.approx([schedule(s) for s in range(4)])
    assert [norm for _, norm in seen] == pytest.approx([1e-3] * 4, rel=1e-3), "every step clipped"
    assert history.samples[-1]["text"] == sample_text(model, tokenizer, "cpu", prompt, max_new_tokens=3)

    default = train_language_model(model, loader, loader, make_optimizer(model), "cpu", num_epochs=1, eval_every=10,
                                   eval_batches=1, tokenizer=tokenizer, prompt=prompt, show_progress=False, log=False)
    assert default.samples[-1]["text"] == sample_text(model, tokenizer, "cpu", prompt, max_new_tokens=50), "50 tokens by default"


def test_save_training_state_keeps_extra_next_to_the_history(tmp_path):
    from course_utils.checkpoint import load_checkpoint

    model = small_model()
    optimizer = make_optimizer(model)
    history = History()
    history.record(0, 0.0, 0, train_loss=5.0)
    save_training_state(tmp_path / "run", model, optimizer, history, epoch=3, note="warm-up done")
    extra = load_checkpoint(tmp_path / "run", small_model(1), make_optimizer(small_model(1)))
    assert extra["epoch"] == 3 and extra["note"] == "warm-up done" and extra["history"] == history.to_dict()
    assert load_training_state(tmp_path / "run", small_model(1), make_optimizer(small_model(1))) == history
