"""The training-chapter grading checks against the reference, correct variants, and mistakes.

As in ``test_grading.py``: every check (1) passes the ``course_utils`` reference,
(2) passes implementations that are correct but written differently, and (3) fails
each deliberately broken implementation with a message that names the problem (the
tests assert on its key words). The broken implementations are written here, by
hand, not taken from the diagnoses inside the checks.
"""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_utils import classify, generate, instruct, lora, train
from course_utils import grading as G
from course_utils import grading_training as T
from grading_asserts import fails


def stub(*args, **kwargs):
    raise NotImplementedError()


def test_checks_leave_the_global_random_state_and_threads_alone():
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    T.check_train_loop(T.reference_train_loop, drop_rate=0.1)
    T.check_classification_head(classify.add_classification_head)
    T.check_replace_linear_with_lora(lora.replace_linear_with_lora)
    T.check_sample_next_token(_next_token)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == threads


# --- chapter 5: losses ---------------------------------------------------------------------------


def loss_by_hand(input_batch, target_batch, model, device):
    """Correct: log-softmax and gather, skipping -100 targets by hand."""
    logits = model(input_batch.to(device))
    log_probs = logits.log_softmax(dim=-1)
    keep = target_batch != -100
    picked = log_probs.gather(-1, target_batch.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum() / keep.sum()


def loss_channels_first(input_batch, target_batch, model, device):
    """Correct: cross_entropy's (N, C, d) form."""
    return F.cross_entropy(model(input_batch).transpose(1, 2), target_batch)


def make_loss(mistake):
    def fn(x, y, model, device):
        logits = model(x)
        if mistake == "sum":
            return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        if mistake == "inputs":
            return F.cross_entropy(logits.flatten(0, 1), x.flatten())
        if mistake == "double_shift":
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), y[:, 1:].flatten())
        if mistake == "softmax":
            return F.cross_entropy(logits.softmax(-1).flatten(0, 1), y.flatten())
        if mistake == "time_dim":
            return -logits.log_softmax(dim=1).gather(-1, y.unsqueeze(-1)).mean()
        if mistake == "item":
            return F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
        if mistake == "detached":
            return F.cross_entropy(logits.flatten(0, 1), y.flatten()).detach()
        if mistake == "none":
            return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        if mistake == "row_means":
            return torch.stack([F.cross_entropy(l, t) for l, t in zip(logits, y)]).mean()
        if mistake == "all_positions":
            return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / y.numel()
        raise ValueError(mistake)
    return fn


def test_loss_batch_reference_and_variants():
    for fn in (train.calc_loss_batch, loss_by_hand, loss_channels_first):
        T.check_loss_batch(fn)
        T.check_loss_batch(fn, batch_size=3, num_tokens=4, masked=True, seed=3)
        T.check_loss_batch(fn, masked=True, seed=4, dtype=torch.float64)


@pytest.mark.parametrize("mistake, words, kwargs", [
    ("sum", ["summed"], {}),
    ("inputs", ["INPUTS"], {}),
    ("double_shift", ["shifted again"], {}),
    ("softmax", ["softmax was applied before"], {}),
    ("time_dim", ["positions (dim=1)"], {}),
    ("item", ["expected a tensor", ".item()"], {}),
    ("detached", ["no gradient graph"], {}),
    ("none", ["wrong shape", "()"], {}),
    ("row_means", ["each sequence was averaged"], {"masked": True}),
    ("all_positions", ["including the ignored"], {"masked": True}),
])
def test_loss_batch_mistakes(mistake, words, kwargs):
    fails(T.check_loss_batch, make_loss(mistake), words=["calc_loss_batch", *words], **kwargs)


def test_loss_batch_stub():
    fails(T.check_loss_batch, stub, words=["not implemented yet"])


def loader_loss_islice(data_loader, model, device, num_batches=None):
    """Correct: islice and a tensor total (returned as a 0-dim tensor)."""
    n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    if n == 0:
        return torch.tensor(float("nan"))
    total = torch.zeros(())
    with torch.no_grad():
        for x, y in itertools.islice(data_loader, n):
            total += F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    return total / n


def make_loader_loss(mistake):
    def fn(data_loader, model, device, num_batches=None):
        losses, sizes = [], []
        for i, (x, y) in enumerate(data_loader):
            if mistake == "off_by_one" and num_batches is not None and i > num_batches:
                break
            if mistake not in ("ignore", "off_by_one") and num_batches is not None and i >= num_batches:
                break
            losses.append(train.calc_loss_batch(x, y, model, device).item())
            sizes.append(x.shape[0])
        if mistake == "zero_when_empty" and not losses:
            return 0.0
        if mistake == "divide_by_num_batches":
            return sum(losses) / (num_batches or len(data_loader))
        if mistake == "weighted":
            return sum(l * s for l, s in zip(losses, sizes)) / sum(sizes)
        return sum(losses) / len(losses)
    return fn


def test_loss_loader_reference_and_variants():
    for fn in (train.calc_loss_loader, loader_loss_islice):
        T.check_loss_loader(fn)
        T.check_loss_loader(fn, num_batches=2)
        T.check_loss_loader(fn, num_batches=9, num_sequences=5, batch_size=3, seed=2)
        T.check_loss_loader(fn, empty=True)


def test_loss_loader_mistakes():
    fails(T.check_loss_loader, make_loader_loss("ignore"), num_batches=2, words=["num_batches was ignored"])
    fails(T.check_loss_loader, make_loader_loss("off_by_one"), num_batches=2, words=["one batch too many"])
    fails(T.check_loss_loader, make_loader_loss("divide_by_num_batches"), num_batches=9, words=["min(num_batches, len(data_loader))"])
    fails(T.check_loss_loader, make_loader_loss("weighted"), words=["weighted by batch size"])
    fails(T.check_loss_loader, make_loader_loss("zero_when_empty"), empty=True, words=["NaN"])
    fails(T.check_loss_loader, make_loader_loss(None), empty=True, words=["ZeroDivisionError"])
    fails(T.check_loss_loader, lambda *a: [1.0], words=["expected a number", "list"])


# --- chapter 5: the training loop ----------------------------------------------------------------


def train_simple_via_package(monkeypatch):
    """The package's own loop, without its printed samples."""
    monkeypatch.setattr(train, "generate_and_print_sample", lambda *a, **k: None)

    def fn(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq, eval_iter):
        return train.train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq,
                                        eval_iter, start_context="", tokenizer=None, show_progress=False)
    return fn


def make_loop(mistake=None):
    """A student's loop written from the chapter's description (counter from 0, own evaluation)."""
    def fn(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq, eval_iter):
        train_losses, val_losses, track = [], [], []
        tokens, steps_done = 0, 0
        for _ in range(num_epochs):
            model.train()
            for x, y in train_loader:
                if mistake != "no_zero_grad":
                    optimizer.zero_grad()
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                loss.backward()
                optimizer.step()
                tokens += x.shape[0] if mistake == "count_examples" else x.numel()
                if mistake == "steps_from_1":
                    steps_done += 1
                    due = steps_done % eval_freq == 0
                else:
                    due = steps_done % eval_freq == 0
                    steps_done += 1
                if due:
                    if mistake != "no_eval_mode":
                        model.eval()
                    with torch.no_grad():
                        tr = train.calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
                        va = train.calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
                    if mistake not in ("no_train_after", "no_eval_mode"):
                        model.train()
                    train_losses.append(tr)
                    val_losses.append(va)
                    track.append(tokens)
        if mistake == "two_lists":
            return train_losses, val_losses
        return train_losses, val_losses, track
    return fn


def test_train_loop_reference_matches_the_package(monkeypatch):
    package_loop = train_simple_via_package(monkeypatch)
    for fn in (T.reference_train_loop, package_loop, make_loop()):
        T.check_train_loop(fn)
        T.check_train_loop(fn, num_epochs=2, eval_freq=3, eval_iter=2, batch_size=3, seed=5, drop_rate=0.1)


@pytest.mark.parametrize("mistake, words, kwargs", [
    ("no_zero_grad", ["train_losses", "optimizer.zero_grad()"], {}),
    ("count_examples", ["tokens_seen", "input_batch.numel()"], {}),
    ("steps_from_1", ["tokens_seen", "counted from 1"], {}),
    ("no_eval_mode", ["model.eval()"], {"drop_rate": 0.2}),
    ("no_train_after", ["model.train() again"], {"drop_rate": 0.2}),
    ("two_lists", ["expected (train_losses, val_losses, tokens_seen)"], {}),
])
def test_train_loop_mistakes(mistake, words, kwargs):
    fails(T.check_train_loop, make_loop(mistake), words=words, **kwargs)


def test_train_loop_fixed_token_count():
    def fixed(model, train_loader, *rest):
        out = T.reference_train_loop(model, train_loader, *rest, mistake="count_fixed")
        return out
    fails(T.check_train_loop, fixed, words=["last batch is shorter"])


# --- chapter 5: temperature and top-k --------------------------------------------------------


def probs_by_power(logits, temperature=1.0, top_k=None):
    """Correct: keep exactly the top-k indices (no ties in the data), softmax, then p ** (1 / T) renormalised."""
    if top_k is not None and top_k < logits.shape[-1]:
        idx = logits.topk(top_k, dim=-1).indices
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, idx, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    p = torch.softmax(logits, dim=-1) ** (1.0 / temperature)
    return p / p.sum(dim=-1, keepdim=True)


def make_probs(mistake):
    def fn(logits, temperature=1.0, top_k=None):
        k = top_k
        if mistake == "k_minus_1":
            kth = logits.topk(k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits <= kth, float("-inf"))
        elif mistake == "k_plus_1":
            kth = logits.topk(k + 1, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        elif mistake == "zero_fill":
            kth = logits.topk(k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, 0.0)
        elif mistake != "no_filter":
            kth = logits.topk(k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if mistake == "after_softmax":
            return torch.softmax(logits, dim=-1) / temperature
        if mistake == "multiply":
            return torch.softmax(logits * temperature, dim=-1)
        if mistake == "dim0":
            return torch.softmax(logits / temperature, dim=0)
        return torch.softmax(logits / temperature, dim=-1)
    return fn


def test_sampling_probs_reference_and_variants():
    for fn in (T.reference_sampling_probs, probs_by_power):
        T.check_sampling_probs(fn)
        T.check_sampling_probs(fn, temperature=0.5, top_k=None)
        T.check_sampling_probs(fn, batch_size=4, vocab_size=50, temperature=2.0, top_k=1, seed=3)
        T.check_sampling_probs(fn, vocab_size=7, top_k=12, seed=4, dtype=torch.float64)


@pytest.mark.parametrize("mistake, words", [
    ("k_minus_1", ["top_k - 1 tokens were kept"]),
    ("k_plus_1", ["top_k + 1 tokens were kept"]),
    ("zero_fill", ["exp(0) = 1"]),
    ("no_filter", ["top_k was ignored"]),
    ("after_softmax", ["after the softmax"]),
    ("multiply", ["multiplied by the temperature"]),
    ("dim0", ["dim=0"]),
])
def test_sampling_probs_mistakes(mistake, words):
    fails(T.check_sampling_probs, make_probs(mistake), words=["sampling_probs", *words])


def _next_token(logits, temperature=0.0, top_k=None, generator=None):
    return generate.next_token(logits, temperature, top_k, generator=generator)


def sample_inverse_cdf(logits, temperature=0.0, top_k=None, generator=None):
    """Correct: inverse-CDF sampling with uniform numbers from the generator."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = T.reference_sampling_probs(logits, temperature, top_k)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=probs.dtype)
    cdf = probs.cumsum(dim=-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp(max=probs.shape[-1] - 1)


def make_sampler(mistake):
    def fn(logits, temperature=0.0, top_k=None, generator=None):
        if temperature == 0.0 and mistake != "never_greedy":
            return logits.argmax(dim=-1, keepdim=mistake != "no_keepdim")
        t = 1.0 if mistake == "no_temperature" else temperature
        k = None if mistake == "no_top_k" else top_k
        probs = T.reference_sampling_probs(logits, t if t > 0 else 1.0, k)
        if mistake == "global_rng":
            return torch.multinomial(probs, 1)
        if mistake == "always_argmax":
            return probs.argmax(dim=-1, keepdim=True)
        return torch.multinomial(probs, 1, generator=generator)
    return fn


def test_sample_next_token_reference_and_variants():
    for fn in (_next_token, sample_inverse_cdf):
        T.check_sample_next_token(fn)
        T.check_sample_next_token(fn, vocab_size=8, temperature=0.7, top_k=3, seed=2)
        T.check_sample_next_token(fn, temperature=2.0, top_k=1, seed=3)


@pytest.mark.parametrize("mistake, words, kwargs", [
    ("no_keepdim", ["wrong shape", "(3, 1)"], {}),
    ("never_greedy", ["temperature 0", "greedy"], {}),
    ("global_rng", ["global random state"], {}),
    ("no_top_k", ["filters out"], {"top_k": 2}),
    ("no_temperature", ["temperature was ignored"], {"temperature": 0.4}),
    ("always_argmax", ["most likely token"], {}),
])
def test_sample_next_token_mistakes(mistake, words, kwargs):
    fails(T.check_sample_next_token, make_sampler(mistake), words=["sample_next_token", *words], **kwargs)


# --- chapter 6 -----------------------------------------------------------------------------------


def head_by_names(model, num_classes=2, train_last_blocks=1):
    """Correct: freeze/unfreeze by parameter name, head built last."""
    n = len(model.trf_blocks)
    unfrozen = ("final_norm.",) + tuple(f"trf_blocks.{i}." for i in range(n - train_last_blocks, n))
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(unfrozen)
    model.out_head = nn.Linear(model.out_head.in_features, num_classes)
    return model


def make_head(mistake):
    def fn(model, num_classes=2, train_last_blocks=1):
        emb = model.out_head.in_features
        if mistake == "head_first":
            model.out_head = nn.Linear(emb, num_classes)
        if mistake != "no_freeze":
            for p in model.parameters():
                p.requires_grad = False
        if mistake == "no_bias":
            model.out_head = nn.Linear(emb, num_classes, bias=False)
        elif mistake == "swapped":
            model.out_head = nn.Linear(num_classes, emb)
        elif mistake != "head_first":
            model.out_head = nn.Linear(emb, num_classes)
        blocks = list(model.trf_blocks)
        chosen = blocks[len(blocks) - train_last_blocks:]
        if mistake == "first_blocks":
            chosen = blocks[:train_last_blocks]
        elif mistake == "minus_zero":
            chosen = blocks[-train_last_blocks:]
        modules = chosen if mistake == "no_norm" else [model.final_norm, *chosen]
        for m in modules:
            for p in m.parameters():
                p.requires_grad = True
        if mistake == "reinit":
            model.tok_emb.reset_parameters()
        return model
    return fn


def test_classification_head_reference_and_variants():
    for fn in (classify.add_classification_head, head_by_names, make_head(None)):
        T.check_classification_head(fn)
        T.check_classification_head(fn, num_classes=3, train_last_blocks=2, seed=3)
        T.check_classification_head(fn, cfg=G.grading_config(n_layers=3, drop_rate=0.0), train_last_blocks=0, seed=4)


@pytest.mark.parametrize("mistake, words", [
    ("no_freeze", ["left trainable", "tok_emb.weight"]),
    ("head_first", ["new head is frozen"]),
    ("first_blocks", ["LAST 1"]),
    ("no_norm", ["final_norm"]),
    ("no_bias", ["no bias"]),
    ("swapped", ["out_head", "(2, 16)"]),
    ("reinit", ["other weights must stay"]),
])
def test_classification_head_mistakes(mistake, words):
    fails(T.check_classification_head, make_head(mistake), words=["add_classification_head" if mistake != "reinit" else "classifier logits", *words])


def test_classification_head_minus_zero_slice():
    T.check_classification_head(make_head("minus_zero"))  # right whenever train_last_blocks > 0
    fails(T.check_classification_head, make_head("minus_zero"), train_last_blocks=0, words=["trf_blocks[-0:]"])


def accuracy_with_tensors(data_loader, model, device, num_batches=None):
    """Correct: softmax before argmax, counts kept as tensors, batches taken with islice."""
    model.eval()
    n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    correct = total = torch.zeros((), dtype=torch.long)
    with torch.no_grad():
        for x, y in itertools.islice(data_loader, n):
            pred = model(x)[:, -1].softmax(-1).argmax(-1)
            correct = correct + (pred == y).sum()
            total = total + y.numel()
    return correct / total


def make_accuracy(mistake):
    def fn(data_loader, model, device, num_batches=None):
        model.eval()
        per_batch, correct, total = [], 0, 0
        with torch.no_grad():
            for i, (x, y) in enumerate(data_loader):
                if mistake != "ignore" and num_batches is not None and i >= num_batches:
                    break
                pos = 0 if mistake == "first" else -1
                hits = (model(x)[:, pos].argmax(-1) == y)
                per_batch.append(hits.float().mean().item())
                correct += int(hits.sum())
                total += len(y)
        if mistake == "batch_mean":
            return sum(per_batch) / len(per_batch)
        if mistake == "percent":
            return 100 * correct / total
        return correct / total
    return fn


def test_accuracy_reference_and_variants():
    for fn in (classify.calc_accuracy_loader, accuracy_with_tensors):
        T.check_accuracy_loader(fn)
        T.check_accuracy_loader(fn, num_batches=2)
        T.check_accuracy_loader(fn, num_examples=13, batch_size=5, num_classes=3, num_batches=7, drop_rate=0.5, seed=2)


def test_accuracy_mistakes():
    fails(T.check_accuracy_loader, make_accuracy("first"), words=["FIRST position"])
    fails(T.check_accuracy_loader, make_accuracy("batch_mean"), words=["per-batch accuracies"])
    fails(T.check_accuracy_loader, make_accuracy("percent"), words=["percent"])
    fails(T.check_accuracy_loader, make_accuracy("ignore"), num_batches=1, words=["num_batches was ignored"])


def classification_loss_nll(input_batch, target_batch, model, device):
    """Correct: log-softmax and nll_loss on the last position."""
    return F.nll_loss(model(input_batch)[:, -1, :].log_softmax(-1), target_batch)


def make_classification_loss(mistake):
    def fn(x, y, model, device):
        logits = model(x)
        if mistake == "first":
            return F.cross_entropy(logits[:, 0], y)
        if mistake == "all":
            return F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(x.shape[1]))
        if mistake == "softmax":
            return F.cross_entropy(logits[:, -1].softmax(-1), y)
        if mistake == "sum":
            return F.cross_entropy(logits[:, -1], y, reduction="sum")
        raise ValueError(mistake)
    return fn


def test_classification_loss():
    for fn in (classify.calc_loss_batch_classification, classification_loss_nll):
        T.check_classification_loss(fn)
        T.check_classification_loss(fn, batch_size=4, num_tokens=3, num_classes=3, seed=2, dtype=torch.float64)
    fails(T.check_classification_loss, make_classification_loss("first"), words=["FIRST position"])
    fails(T.check_classification_loss, make_classification_loss("all"), words=["every position"])
    fails(T.check_classification_loss, make_classification_loss("softmax"), words=["softmax was applied"])
    fails(T.check_classification_loss, make_classification_loss("sum"), words=["summed"])


# --- chapter 7 -----------------------------------------------------------------------------------


def format_by_parts(entry):
    """Correct: sections joined with blank lines."""
    parts = [instruct.PREAMBLE, "### Instruction:\n" + entry["instruction"]]
    if entry.get("input", ""):
        parts.append("### Input:\n" + entry["input"])
    return "\n\n".join(parts)


def test_format_input():
    for fn in (instruct.format_input, format_by_parts):
        T.check_format_input(fn)
        T.check_format_input(fn, entries=[{"instruction": "Add:\n2 + 2", "input": "línea\ndos", "output": "4"}])
    fails(T.check_format_input, lambda e: instruct.format_input(e) + instruct.RESPONSE_HEADER, words=["response header"])
    fails(T.check_format_input, lambda e: format_by_parts({**e, "input": e.get("input") or "-"}).replace("\n### Input:\n-", "\n### Input:\n"),
          words=["'### Input:' section was added"])
    fails(T.check_format_input, lambda e: format_by_parts(e).replace("\n\n", "\n"), words=["spacing"])
    fails(T.check_format_input, lambda e: format_by_parts({"instruction": e["instruction"]}), words=["input is missing"])
    fails(T.check_format_input, lambda e: None, words=["expected a str"])


def make_collate(mistake=None):
    """A student's collate written from the chapter's description (lists or (ids, prompt_length) items)."""
    def fn(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None, mask_prompt=False):
        items = [b if isinstance(b, tuple) else (b, 0) for b in batch]
        width = max(len(ids) for ids, _ in items) + 1
        inputs, targets = [], []
        for ids, prompt_length in items:
            padded = list(ids) + [pad_token_id] * (width - len(ids))
            x, y = padded[:-1], padded[1:]
            if mistake == "by_value":
                pads = [j for j, t in enumerate(y) if t == pad_token_id]
                for j in pads[1:]:
                    y[j] = ignore_index
            else:
                for j in range(len(ids), len(y)):
                    y[j] = ignore_index
            if mask_prompt and mistake != "no_prompt_mask":
                cut = prompt_length - 1 + (1 if mistake == "one_too_many" else 0)
                y[:cut] = [ignore_index] * len(y[:cut])
            inputs.append(x[:allowed_max_length])
            targets.append(y[:allowed_max_length])
        return torch.tensor(inputs), torch.tensor(targets)
    return fn


def test_collate_masks_reference_and_variants():
    for fn in (instruct.instruction_collate, make_collate()):
        T.check_collate_masks(fn)
        T.check_collate_masks(fn, lengths=(2, 7, 4, 4), prompt_lengths=(1, 5, 4, 2), allowed_max_length=5, seed=2)
        T.check_collate_masks(fn, prompt_lengths=None, eot_inside=True, seed=3)
        T.check_collate_masks(fn, eot_inside=True, seed=4)
        G.check_instruction_collate(fn)  # the same function passes chapter 7's padding check


def test_collate_masks_mistakes():
    fails(T.check_collate_masks, make_collate("no_prompt_mask"), words=["targets", "prompt was not masked"])
    fails(T.check_collate_masks, make_collate("one_too_many"), words=["one target too many"])
    fails(T.check_collate_masks, make_collate("by_value"), prompt_lengths=None, eot_inside=True, words=["by its length"])
    fails(T.check_collate_masks, lambda batch, **k: torch.zeros(2), words=["(inputs, targets)"])


# --- appendix A ------------------------------------------------------------------------------------


def sq_dist_expanded(a, b):
    """Correct: |a|^2 + |b|^2 - 2 a.b."""
    return (a**2).sum(-1).unsqueeze(-1) + (b**2).sum(-1).unsqueeze(-2) - 2 * a @ b.transpose(-2, -1)


def test_pairwise_sq_distances():
    for fn in (lambda a, b: torch.cdist(a, b) ** 2, sq_dist_expanded):
        T.check_pairwise_sq_distances(fn)
        T.check_pairwise_sq_distances(fn, num_a=5, num_b=2, dim=3, batch_shape=(2,), seed=1, dtype=torch.float64)
    fails(T.check_pairwise_sq_distances, torch.cdist, words=["these are the distances"])
    fails(T.check_pairwise_sq_distances, lambda a, b: torch.cdist(a, b, p=1), words=["L1"])
    fails(T.check_pairwise_sq_distances, lambda a, b: torch.cdist(b, a) ** 2, words=["wrong shape", "(4, 3)"])


def loss_and_grads_by_hand(x, y, w, b):
    """Correct: the gradients derived by hand."""
    p = torch.sigmoid(x @ w + b)
    loss = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    return loss, x.T @ (p - y) / len(y), (p - y).mean()


def make_loss_and_grads(mistake):
    def fn(x, y, w, b):
        w = w.clone().requires_grad_()
        b = b.clone().requires_grad_()
        p = torch.sigmoid(x @ w + b)
        if mistake == "sum":
            loss = F.binary_cross_entropy(p, y, reduction="sum")
        elif mistake == "mse":
            loss = F.mse_loss(p, y)
        elif mistake == "flipped":
            loss = F.binary_cross_entropy(p, 1 - y)
        loss.backward()
        return loss.detach(), w.grad, b.grad
    return fn


def test_loss_and_grads():
    for fn in (T._ref_loss_and_grads, loss_and_grads_by_hand):
        T.check_loss_and_grads(fn)
        T.check_loss_and_grads(fn, num_examples=5, dim=4, seed=2, dtype=torch.float64)
    fails(T.check_loss_and_grads, make_loss_and_grads("sum"), words=["summed"])
    fails(T.check_loss_and_grads, make_loss_and_grads("mse"), words=["mean squared error"])
    fails(T.check_loss_and_grads, make_loss_and_grads("flipped"), words=["flipped"])
    fails(T.check_loss_and_grads, lambda x, y, w, b: (torch.zeros(()), torch.zeros(3)), words=["expected 3 return value(s)"])


class MLPNamed(nn.Module):
    """Correct: named layers and F.relu."""

    def __init__(self, n_inputs, n_hidden, n_classes):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(n_inputs, n_hidden), nn.Linear(n_hidden, n_hidden), nn.Linear(n_hidden, n_classes)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def make_mlp(mistake):
    class Broken(MLPNamed):
        def forward(self, x):
            if mistake == "linear":
                return self.fc3(self.fc2(self.fc1(x)))
            return F.relu(super().forward(x))
    return Broken


def test_mlp():
    for cls in (T._RefMLP, MLPNamed):
        T.check_mlp(cls)
        T.check_mlp(cls, n_inputs=3, n_hidden=8, n_classes=4, seed=2, dtype=torch.float64)
    fails(T.check_mlp, make_mlp("linear"), words=["no activation"])
    fails(T.check_mlp, make_mlp("relu_out"), words=["follows the last layer"])


def epochs_tensor_total(model, train_loader, optimizer, num_epochs):
    """Correct: zero_grad first, a tensor total per epoch."""
    out = []
    for _ in range(num_epochs):
        model.train()
        total = torch.zeros(())
        for features, labels in train_loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(features), labels)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        out.append(float(total / len(train_loader)))
    return out


def make_epochs(mistake):
    def fn(model, train_loader, optimizer, num_epochs):
        out = []
        for _ in range(num_epochs):
            losses = []
            for features, labels in train_loader:
                if mistake == "noisy":
                    features = features + 1e-3 * random.random()
                loss = F.cross_entropy(model(features), labels)
                if mistake != "no_zero_grad":
                    optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            out.append(losses[-1] if mistake == "last" else sum(losses) / len(losses))
        return out
    return fn


def test_train_epochs():
    for fn in (T._ref_train_epochs, epochs_tensor_total):
        T.check_train_epochs(fn)
        T.check_train_epochs(fn, num_epochs=4, num_points=120, batch_size=16, lr=0.02, threshold=None, seed=3)
    fails(T.check_train_epochs, make_epochs("no_zero_grad"), words=["optimizer.zero_grad()"])
    fails(T.check_train_epochs, make_epochs("last"), words=["last batch's loss"])
    fails(T.check_train_epochs, make_epochs("noisy"), words=["two runs"])
    fails(T.check_train_epochs, lambda *a: [1.0], words=["list of 10 losses"])


# --- appendix D ------------------------------------------------------------------------------------


def lr_written_differently(step, total_steps, peak_lr, warmup_steps, initial_lr=0.0, min_lr=0.0):
    """Correct: the fraction of the warm-up, then the decay with an explicit end."""
    if step < warmup_steps:
        frac = step / warmup_steps
        return (1 - frac) * initial_lr + frac * peak_lr
    last = total_steps - 1
    if last <= warmup_steps:
        return peak_lr
    if step >= last:
        return min_lr
    angle = math.pi * (step - warmup_steps) / (last - warmup_steps)
    return min_lr + (peak_lr - min_lr) * (math.cos(angle) + 1) / 2


def make_lr(mistake):
    def fn(step, total_steps, peak_lr, warmup_steps, initial_lr=0.0, min_lr=0.0):
        if mistake == "ahead" and step < warmup_steps:
            return initial_lr + (peak_lr - initial_lr) * (step + 1) / warmup_steps
        if mistake == "early_peak" and step < warmup_steps:
            return initial_lr + (peak_lr - initial_lr) * step / (warmup_steps - 1)
        if mistake == "from_zero" and step < warmup_steps:
            return peak_lr * step / warmup_steps
        if step < warmup_steps:
            return initial_lr + (peak_lr - initial_lr) * step / warmup_steps
        if mistake == "short":
            progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        else:
            progress = (step - warmup_steps) / (total_steps - 1 - warmup_steps)  # ZeroDivisionError at the edge
            if mistake != "no_clamp":
                progress = min(1.0, progress)
        if mistake == "to_zero":
            return peak_lr * 0.5 * (1 + math.cos(math.pi * progress))
        if mistake == "linear":
            return min_lr + (peak_lr - min_lr) * (1 - progress)
        return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return fn


def test_lr_schedule_reference_and_variants():
    for fn in (train.lr_at_step, lr_written_differently):
        T.check_lr_schedule(fn)
        T.check_lr_schedule(fn, total_steps=50, peak_lr=3e-4, warmup_steps=10, initial_lr=1e-5, min_lr=1e-6, extra_steps=5)
        T.check_lr_schedule(fn, total_steps=12, warmup_steps=0, min_lr=1e-3)
        for warmup in (10, 11, 12):  # no step, or no step at all, left for the decay
            T.check_lr_schedule(fn, total_steps=11, warmup_steps=warmup, initial_lr=1e-4)
        T.check_lr_schedule(fn, total_steps=1, warmup_steps=0)


@pytest.mark.parametrize("mistake, words, kwargs", [
    ("ahead", ["one step ahead"], {}),
    ("early_peak", ["one step early"], {}),
    ("from_zero", ["starts from 0"], {"initial_lr": 1e-3}),
    ("short", ["does not reach min_lr"], {}),
    ("no_clamp", ["past the end"], {}),
    ("to_zero", ["ends at 0"], {"min_lr": 1e-3}),
    ("linear", ["straight line"], {}),
    (None, ["ZeroDivisionError"], {"total_steps": 6, "warmup_steps": 5}),
])
def test_lr_schedule_mistakes(mistake, words, kwargs):
    fails(T.check_lr_schedule, make_lr(mistake), words=["lr_at_step", *words], **kwargs)


def clip_by_hand(parameters, max_norm):
    """Correct: one list, the squares summed, one factor clamped at 1."""
    params = [p for p in parameters if p.grad is not None]
    total = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    for p in params:
        p.grad.mul_(coef)
    return total


def make_clip(mistake):
    def fn(parameters, max_norm):
        if mistake == "twice":
            total = torch.sqrt(sum((p.grad**2).sum() for p in parameters if p.grad is not None))
            for p in parameters:  # a generator is empty by now
                p.grad.mul_(min(1.0, max_norm / float(total)))
            return total
        params = list(parameters) if mistake == "no_skip" else [p for p in parameters if p.grad is not None]
        norms = [p.grad.norm() for p in params]
        total = torch.sqrt(sum(n**2 for n in norms))
        for p, n in zip(params, norms):
            if mistake == "per_param":
                p.grad.mul_(min(1.0, max_norm / float(n)))
            elif mistake == "always":
                p.grad.mul_(max_norm / float(total))
            elif mistake == "sum_norms":
                p.grad.mul_(min(1.0, max_norm / float(sum(norms))))
            elif mistake == "by_value":
                p.grad.clamp_(-max_norm, max_norm)
            else:
                p.grad.mul_(min(1.0, max_norm / float(total)))
        if mistake == "after":
            return torch.sqrt(sum((p.grad**2).sum() for p in params))
        return total
    return fn


def test_clip_grad_norm_reference_and_variants():
    for fn in (torch.nn.utils.clip_grad_norm_, clip_by_hand, make_clip(None)):
        T.check_clip_grad_norm(fn)
        T.check_clip_grad_norm(fn, scale=0.05)  # below max_norm: nothing changes
        T.check_clip_grad_norm(fn, shapes=((5,), (2, 3)), max_norm=0.5, missing_grad=True, as_generator=True, seed=2)
        T.check_clip_grad_norm(fn, max_norm=2.0, scale=3.0, seed=3, dtype=torch.float64)


@pytest.mark.parametrize("mistake, words, kwargs", [
    ("per_param", ["clipped on its own", "TOTAL norm"], {}),
    ("always", ["below max_norm"], {"scale": 0.05}),
    ("sum_norms", ["added up"], {}),
    ("by_value", ["by value"], {"max_norm": 0.5}),
    ("twice", ["generator", "list first"], {"as_generator": True}),
    ("no_skip", ["AttributeError", "None"], {"missing_grad": True}),
    ("after", ["after clipping was returned"], {}),
])
def test_clip_grad_norm_mistakes(mistake, words, kwargs):
    fails(T.check_clip_grad_norm, make_clip(mistake), words=["clip_grad_norm", *words], **kwargs)


# --- appendix E ------------------------------------------------------------------------------------


class LoRAWithLinears(nn.Module):
    """Correct: A and B as bias-free nn.Linear layers."""

    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = nn.Linear(in_dim, rank, bias=False)
        self.B = nn.Linear(rank, out_dim, bias=False)
        nn.init.zeros_(self.B.weight)
        self.scaling = alpha / rank

    def forward(self, x):
        return self.B(self.A(x)) * self.scaling


def make_lora(mistake):
    class Broken(nn.Module):
        def __init__(self, in_dim, out_dim, rank, alpha):
            super().__init__()
            self.A = nn.Parameter(torch.zeros(in_dim, rank) if mistake == "zero_A" else torch.randn(in_dim, rank))
            self.B = nn.Parameter(torch.randn(rank, out_dim) if mistake == "random_B" else torch.zeros(rank, out_dim))
            if mistake == "not_parameter":
                del self.A
                self.A = torch.randn(in_dim, rank)
            self.scale = alpha if mistake == "alpha" else alpha / rank

        def forward(self, x):
            return self.scale * (x @ self.A @ self.B)
    return Broken


def test_lora_layer():
    for cls in (lora.LoRALayer, LoRAWithLinears):
        T.check_lora_layer(cls)
        T.check_lora_layer(cls, in_dim=3, out_dim=7, rank=1, alpha=1.0, batch_shape=(2, 5), seed=2, dtype=torch.float64)
    fails(T.check_lora_layer, make_lora("alpha"), words=["multiplied by alpha", "alpha / rank"])
    fails(T.check_lora_layer, make_lora("random_B"), words=["B does not start at zero", "pretrained model"])
    fails(T.check_lora_layer, make_lora("zero_A"), words=["A does not start random"])
    fails(T.check_lora_layer, make_lora("not_parameter"), words=["A is not a trainable parameter"])
    fails(T.check_lora_layer, stub, words=["not implemented yet"])


def make_linear_with_lora(mistake=None, lora_cls=LoRAWithLinears):
    class Wrapper(nn.Module):
        def __init__(self, linear, rank, alpha):
            super().__init__()
            self.linear = nn.Linear(linear.in_features, linear.out_features) if mistake == "new_linear" else linear
            self.lora = lora_cls(linear.in_features, linear.out_features, rank, alpha)

        def forward(self, x):
            if mistake == "no_lora":
                return self.linear(x)
            if mistake == "only_lora":
                return self.lora(x)
            return self.lora(x) + self.linear(x)
    return Wrapper


def test_linear_with_lora():
    for cls in (lora.LinearWithLoRA, make_linear_with_lora()):
        T.check_linear_with_lora(cls)
        T.check_linear_with_lora(cls, in_dim=4, out_dim=6, rank=3, alpha=2.0, bias=False, batch_shape=(3,), seed=2)
    fails(T.check_linear_with_lora, make_linear_with_lora("new_linear"), words=["not those of the layer you were given"])
    fails(T.check_linear_with_lora, make_linear_with_lora("no_lora"), words=["update is not added"])
    fails(T.check_linear_with_lora, make_linear_with_lora("only_lora"), words=["only the LoRA update"])


def replace_via_named_modules(model, rank, alpha):
    """Correct: collect (parent, name) pairs first, then swap; freeze by identity."""
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear)]
    for p in model.parameters():
        p.requires_grad = False
    for parent, name in targets:
        setattr(parent, name, make_linear_with_lora()(getattr(parent, name), rank, alpha))
    return model


def make_replace(mistake):
    def fn(model, rank, alpha):
        if mistake != "no_freeze" and mistake != "freeze_after":
            for p in model.parameters():
                p.requires_grad = False

        def swap(module):
            for name, child in module.named_children():
                if isinstance(child, nn.Linear):
                    setattr(module, name, lora.LinearWithLoRA(child, rank, alpha))
                elif mistake != "shallow":
                    swap(child)

        swap(model)
        if mistake == "freeze_after":
            for p in model.parameters():
                p.requires_grad = False
        return model
    return fn


def test_replace_linear_with_lora():
    for fn in (lora.replace_linear_with_lora, replace_via_named_modules):
        T.check_replace_linear_with_lora(fn)
        T.check_replace_linear_with_lora(fn, cfg=G.grading_config(n_layers=3, qkv_bias=True, drop_rate=0.0), rank=1,
                                         alpha=1.0, seed=2)
    fails(T.check_replace_linear_with_lora, make_replace("shallow"), words=["were not wrapped", "recursive"])
    fails(T.check_replace_linear_with_lora, make_replace("no_freeze"), words=["left trainable", "tok_emb.weight"])
    fails(T.check_replace_linear_with_lora, make_replace("freeze_after"), words=["frozen too"])
