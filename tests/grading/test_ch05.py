"""Assignment ch05's checks against the reference, correct variants, and deliberate mistakes.

As for every assignment: each check passes the ``course_utils`` reference and
implementations that are correct but written differently, and fails each deliberately
broken implementation with a message that names the problem (the table gives its key
words). The broken implementations are written here, by hand, not taken from the
diagnoses inside the checks.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from course_utils import generate, train
from course_utils.grading import ch05

from .handin_cases import TRAIN
from .helpers import Cases, leaves_state_alone, registry_tests, right, stub, wrong


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


def loader_loss_islice(data_loader, model, device, num_batches=None):
    """Correct: islice and per-token sums from reduction='sum' (returned as a 0-dim tensor)."""
    n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for x, y in itertools.islice(data_loader, n):
            total += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").double()
            count += int((y != -100).sum())
    return total / count if count else torch.tensor(float("nan"))


def _loader_loss_with_grad(data_loader, model, device, num_batches=None):
    """Wrong: right numbers, but the model runs with gradients on (the exercise asks for no_grad)."""
    n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total, count = 0.0, 0
    for x, y in itertools.islice(data_loader, n):
        k = int((y != -100).sum())
        total += train.calc_loss_batch(x, y, model, device).item() * k
        count += k
    return total / count if count else float("nan")



def make_loader_loss(mistake):
    def fn(data_loader, model, device, num_batches=None):
        losses, weights = [], []
        for i, (x, y) in enumerate(data_loader):
            if mistake == "off_by_one" and num_batches is not None and i > num_batches:
                break
            if mistake not in ("ignore", "off_by_one") and num_batches is not None and i >= num_batches:
                break
            losses.append(train.calc_loss_batch(x, y, model, device).item())
            if mistake == "numel_weights":
                weights.append(y.numel())
            elif mistake == "plain_mean":
                weights.append(1)
            else:
                weights.append(int((y != -100).sum()))
        if mistake == "zero_when_empty" and not losses:
            return 0.0
        if mistake == "not_divided":
            return sum(l * w for l, w in zip(losses, weights))
        return sum(l * w for l, w in zip(losses, weights)) / sum(weights)
    return fn


def _notebook_loop(eval_mode="model.eval()", train_mode="model.train()"):
    """A loop as a notebook defines it: calling `calc_loss_batch` and `calc_loss_loader` by name (here the
    student's broken batch loss, which the check replaces by the reference). With drop_rate 0 a mode slip
    changes no number; the check sees it all the same."""
    source = TRAIN.format(eval_mode=eval_mode, zero="optimizer.zero_grad()").replace("model.train()", train_mode)
    namespace = {"torch": torch, "calc_loss_batch": lambda x, y, m, d: 2 * train.calc_loss_batch(x, y, m, d),
                 "calc_loss_loader": lambda *a, **k: 0.0}
    exec(source, namespace)
    return namespace["train_language_model"]


def make_loop(mistake=None):
    """A student's loop written from the exercise's description."""
    def fn(model, train_loader, val_loader, optimizer, device, num_epochs, eval_every, eval_batches):
        rows = {"step": [], "seen": [], "train_loss": [], "val_loss": []}

        def evaluate(steps, seen):
            if mistake != "no_eval_mode":
                model.eval()
            # a loader loss written by hand, which (unlike the package's) does not switch to eval mode itself
            rows["train_loss"].append(float(loader_loss_islice(train_loader, model, device, eval_batches)))
            rows["val_loss"].append(float(loader_loss_islice(val_loader, model, device, eval_batches)))
            if mistake not in ("no_train_after", "no_eval_mode"):
                model.train()
            rows["step"].append(steps)
            rows["seen"].append(seen)

        last = num_epochs * len(train_loader)
        steps, seen = 0, 0
        if mistake != "no_first_row":
            evaluate(0, 0)
        for _ in range(num_epochs):
            model.train()
            for x, y in train_loader:
                if mistake != "no_zero_grad":
                    optimizer.zero_grad()
                F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
                optimizer.step()
                if mistake == "count_before_step_number":
                    due = steps % eval_every == 0
                steps += 1
                if mistake != "count_after_eval":
                    seen += x.shape[0] if mistake == "count_examples" else x.numel()
                if mistake != "count_before_step_number":
                    due = steps % eval_every == 0 or (steps == last and mistake != "no_last_row")
                if due:
                    evaluate(steps, seen)
                if mistake == "count_after_eval":
                    seen += x.numel()
        if mistake == "tuple":
            return rows["train_loss"], rows["val_loss"], rows["seen"]
        return rows
    return fn


def package_loop(model, train_loader, val_loader, optimizer, device, num_epochs, eval_every, eval_batches):
    """Correct: the package's own loop, returning its History."""
    return train.train_language_model(model, train_loader, val_loader, optimizer, device, num_epochs=num_epochs,
                                      eval_every=eval_every, eval_batches=eval_batches, show_progress=False, log=False)


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


def _next_token(logits, temperature=0.0, top_k=None, generator=None):
    return generate.next_token(logits, temperature, top_k, generator=generator)


def sample_inverse_cdf(logits, temperature=0.0, top_k=None, generator=None):
    """Correct: inverse-CDF sampling with uniform numbers from the generator."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = ch05.reference_sampling_probs(logits, temperature, top_k)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=probs.dtype)
    cdf = probs.cumsum(dim=-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp(max=probs.shape[-1] - 1)


def make_sampler(mistake):
    def fn(logits, temperature=0.0, top_k=None, generator=None):
        if temperature == 0.0 and mistake != "never_greedy":
            return logits.argmax(dim=-1, keepdim=mistake != "no_keepdim")
        t = 1.0 if mistake == "no_temperature" else temperature
        k = None if mistake == "no_top_k" else top_k
        probs = ch05.reference_sampling_probs(logits, t if t > 0 else 1.0, k)
        if mistake == "global_rng":
            return torch.multinomial(probs, 1)
        if mistake == "always_argmax":
            return probs.argmax(dim=-1, keepdim=True)
        return torch.multinomial(probs, 1, generator=generator)
    return fn



def loop_with_an_extra_step(*args):
    """Wrong: the right rows, then one optimizer step more than there are batches."""
    out = make_loop()(*args)
    args[3].step()
    return out


def loop_counting_fixed_batches(model, train_loader, *rest):
    """Wrong: adds the first batch's token count for every batch, the short last one too."""
    fixed = next(iter(train_loader))[0].numel()
    out = make_loop()(model, train_loader, *rest)
    out["seen"] = [fixed * s for s in out["step"]]
    return out


def sample_with_own_generator(logits, temperature=0.0, top_k=None, generator=None):
    """Wrong: ignores the generator it is given and draws from a fixed one of its own."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = ch05.reference_sampling_probs(logits, temperature, top_k)
    return torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0))


def test_checks_leave_the_global_random_state_and_threads_alone():
    leaves_state_alone(lambda: ch05.check_train_loop(package_loop, drop_rate=0.1))
    leaves_state_alone(lambda: ch05.check_sample_next_token(_next_token))


def test_the_history_of_the_package_loop_is_accepted_as_the_answer():
    ch05.check_train_loop(package_loop)
    ch05.check_train_loop(package_loop, num_epochs=2, eval_every=3, eval_batches=2, batch_size=3, seed=5, drop_rate=0.1)


LOSS_SETTINGS = {"default": {}, "masked": dict(batch_size=3, num_tokens=4, masked=True, seed=3),
                 "masked_float64": dict(masked=True, seed=4, dtype=torch.float64)}
LOADER_SETTINGS = {"default": {}, "2_batches": dict(num_batches=2), "masked": dict(num_batches=3, masked=True, seed=6),
                   "more_than_there_are": dict(num_batches=9, num_sequences=5, batch_size=3, seed=2), "empty": dict(empty=True)}
LOOP_SETTINGS = {"default": {}, "2_epochs_dropout": dict(num_epochs=2, eval_every=3, eval_batches=2, batch_size=3, seed=5, drop_rate=0.1),
                 "last_step_on_the_grid": dict(num_epochs=2, eval_every=5, num_sequences=10, seed=7)}
PROBS_SETTINGS = {"default": {}, "no_top_k": dict(temperature=0.5, top_k=None),
                  "top_1": dict(batch_size=4, vocab_size=50, temperature=2.0, top_k=1, seed=3),
                  "top_k_beyond_vocab_float64": dict(vocab_size=7, top_k=12, seed=4, dtype=torch.float64)}
SAMPLER_SETTINGS = {"default": {}, "top_3": dict(vocab_size=8, temperature=0.7, top_k=3, seed=2), "top_1": dict(temperature=2.0, top_k=1, seed=3)}

CASES = {
    "check_loss_batch": Cases(
        right=[right(f"{name}-{label}", fn, **kw)
               for name, fn in (("reference", train.calc_loss_batch), ("by_hand", loss_by_hand), ("channels_first", loss_channels_first))
               for label, kw in LOSS_SETTINGS.items()],
        wrong=[wrong(mistake, make_loss(mistake), "calc_loss_batch", *words, **kwargs) for mistake, words, kwargs in (
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
        )] + [wrong("stub", stub, "not implemented yet")],
    ),
    "check_loss_loader": Cases(
        right=[right(f"{name}-{label}", fn, **kw) for name, fn in (("reference", train.calc_loss_loader), ("islice", loader_loss_islice))
               for label, kw in LOADER_SETTINGS.items()],
        wrong=[wrong("ignore", make_loader_loss("ignore"), "num_batches was ignored", num_batches=2),
               wrong("off_by_one", make_loader_loss("off_by_one"), "one batch too many", num_batches=2),
               wrong("plain_mean", make_loader_loss("plain_mean"), "plain mean of the batch losses"),
               wrong("numel_weights", make_loader_loss("numel_weights"), "-100 targets were counted", masked=True),
               wrong("not_divided", make_loader_loss("not_divided"), "not divided"),
               wrong("zero_when_empty", make_loader_loss("zero_when_empty"), "NaN", empty=True),
               wrong("divides_by_zero", make_loader_loss(None), "ZeroDivisionError", empty=True),
               wrong("list", lambda *a: [1.0], "expected a number", "list"),
               wrong("grad_on", _loader_loss_with_grad, "gradients switched on", "torch.no_grad()")],
    ),
    "check_train_loop": Cases(
        right=[right(f"{name}-{label}", fn, **kw) for name, fn in (("package", package_loop), ("by_hand", make_loop()))
               for label, kw in LOOP_SETTINGS.items()],
        wrong=[wrong(mistake, make_loop(mistake), *words, **kwargs) for mistake, words, kwargs in (
            ("no_zero_grad", ["train_loss", "optimizer.zero_grad()"], {}),
            ("count_examples", ["seen", "input_batch.numel()"], {}),
            ("count_after_eval", ["seen", "misses the current step"], {}),
            ("no_first_row", ["step", "untrained model"], {}),
            ("no_last_row", ["step", "final evaluation"], {"num_sequences": 9, "eval_every": 2}),
            ("count_before_step_number", ["step", "one step early"], {}),
            ("no_eval_mode", ["model.eval()"], {"drop_rate": 0.2}),
            ("no_train_after", ["model.train() again"], {"drop_rate": 0.2}),
            ("tuple", ["expected a dict"], {}),
        )] + [wrong("no_eval_mode_named", _notebook_loop(eval_mode="pass"), "measured in train mode", "model.eval()"),
              wrong("no_train_mode_named", _notebook_loop(train_mode="pass"), "training step ran in eval mode"),
              wrong("fixed_token_count", loop_counting_fixed_batches, "last batch is shorter"),
              wrong("extra_step", loop_with_an_extra_step, "the trained weights", "one optimizer step per training batch")],
    ),
    "check_sampling_probs": Cases(
        right=[right(f"{name}-{label}", fn, **kw) for name, fn in (("reference", ch05.reference_sampling_probs), ("by_power", probs_by_power))
               for label, kw in PROBS_SETTINGS.items()],
        wrong=[wrong(mistake, make_probs(mistake), "sampling_probs", *words) for mistake, words in (
            ("k_minus_1", ["top_k - 1 tokens were kept"]),
            ("k_plus_1", ["top_k + 1 tokens were kept"]),
            ("zero_fill", ["exp(0) = 1"]),
            ("no_filter", ["top_k was ignored"]),
            ("after_softmax", ["after the softmax"]),
            ("multiply", ["multiplied by the temperature"]),
            ("dim0", ["dim=0"]),
        )],
    ),
    "check_sample_next_token": Cases(
        right=[right(f"{name}-{label}", fn, **kw) for name, fn in (("package", _next_token), ("inverse_cdf", sample_inverse_cdf))
               for label, kw in SAMPLER_SETTINGS.items()],
        wrong=[wrong(mistake, make_sampler(mistake), "sample_next_token", *words, **kwargs) for mistake, words, kwargs in (
            ("no_keepdim", ["wrong shape", "(3, 1)"], {}),
            ("never_greedy", ["temperature 0", "greedy"], {}),
            ("global_rng", ["global random state"], {}),
            ("no_top_k", ["filters out"], {"top_k": 2}),
            ("no_temperature", ["temperature was ignored"], {"temperature": 0.4}),
            ("always_argmax", ["most likely token"], {}),
        )] + [wrong("own_generator", sample_with_own_generator, "two different generator seeds")],
    ),
}

test_correct_passes, test_mistake_fails, test_early_return_is_caught = registry_tests(ch05, CASES)
