"""Checks of assignment ch07 (fine-tuning to follow instructions).

:func:`check_format_input` (the Alpaca prompt), :func:`check_instruction_collate`
(padding, shifting, -100 after the first end-of-text, truncation) and
:func:`check_collate_masks` (prompt masking, and an end-of-text token inside a text),
against :mod:`course_utils.instruct`.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

from ..instruct import IGNORE_INDEX
from ..instruct import format_input as _ref_format_input
from ..instruct import instruction_collate as _ref_instruction_collate
from ..tokenizers import GPT2_EOT_ID
from .core import CheckFailed, _call, _message, check_shape

__all__ = ["check_format_input", "check_instruction_collate", "check_collate_masks"]


# --- the Alpaca prompt ----------------------------------------------------------------


_FORMAT_ENTRIES = (
    {"instruction": "Rewrite the sentence in the passive voice.", "input": "The chef cooked the meal.", "output": "The meal was cooked by the chef."},
    {"instruction": "Name the largest planet of the solar system.", "input": "", "output": "Jupiter."},
    {"instruction": "What is the opposite of 'ancient'?", "output": "Modern."},
)


def check_format_input(fn: Callable, *, entries: Sequence[dict[str, str]] | None = None) -> None:
    """Grade ``fn(entry)``: the Alpaca-style prompt of an instruction example.

    As :func:`course_utils.instruct.format_input`: the preamble, a blank line,
    ``### Instruction:`` and the instruction, then, only when the input is present
    and not empty, a blank line, ``### Input:`` and the input. Nothing after it (the
    response header belongs to the full training text).
    """
    entries = list(entries) if entries is not None else list(_FORMAT_ENTRIES)
    hint = ("the preamble, a blank line, the instruction header on its own line and the instruction; then, only for a "
            "non-empty input, a blank line, the input header on its own line and the input.")
    for entry in entries:
        case = f"entry {({k: entry[k] for k in ('instruction', 'input') if k in entry})!r}"
        expected = _ref_format_input(entry)
        got = _call(fn, dict(entry), what="format_input", case=case, hint=hint)
        if not isinstance(got, str):
            raise CheckFailed(_message(f"format_input: expected a str, got {type(got).__name__}.", case=case,
                                          hint="build the text and return it."))
        if got == expected:
            continue
        at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        lines = [f"expected {expected!r}", f"got      {got!r}",
                 f"first difference at character {at}: expected {expected[at:at + 20]!r}, got {got[at:at + 20]!r}"]
        cause = None
        if "### Response" in got and "### Response" not in expected:
            cause = "the response header was included: format_input ends after the instruction (or the input)."
        elif "### Input" in got and "### Input" not in expected:
            cause = "the '### Input:' section was added for an entry without input: leave it out when the input is missing or ''."
        elif "### Input" in expected and "### Input" not in got:
            cause = "the entry's input is missing: add '\\n\\n### Input:\\n' and the input when it is not empty."
        elif got.split() == expected.split():
            cause = "the words are right but the spacing is not: sections are separated by one blank line ('\\n\\n'), each header is followed by '\\n'."
        raise CheckFailed(_message("format_input: wrong text.", case=case, lines=lines, cause=cause, hint=hint))


# --- batches: padding, shifting, masking ----------------------------------------------


def check_instruction_collate(
    fn: Callable,
    *,
    lengths: Sequence[int] = (5, 2, 4),
    pad_token_id: int = 50256,
    ignore_index: int = -100,
    allowed_max_length: int | None = None,
    seed: int = 0,
) -> None:
    """Grade ``fn(batch, pad_token_id=..., ignore_index=..., allowed_max_length=...)``.

    ``batch`` is a list of token-id lists. Expected: (B, L) inputs padded with
    ``pad_token_id``; targets shifted left by one, the first padding position kept as
    ``pad_token_id`` (it teaches the model to stop), every later one ``ignore_index``.
    """
    g = torch.Generator().manual_seed(seed)
    batch = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in lengths]
    case = f"{len(batch)} examples of lengths {list(lengths)}, pad_token_id={pad_token_id}, allowed_max_length={allowed_max_length}"
    kwargs = dict(pad_token_id=pad_token_id, ignore_index=ignore_index, allowed_max_length=allowed_max_length)
    exp_in, exp_tg = _ref_instruction_collate([list(b) for b in batch], **kwargs)
    got = _call(fn, [list(b) for b in batch], what="your collate function", case=case, **kwargs)
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        raise CheckFailed(_message("your collate function must return (inputs, targets).", case=case))
    got_in, got_tg = got
    for what, g_t, e_t in (("inputs", got_in, exp_in), ("targets", got_tg, exp_tg)):
        check_shape(g_t, e_t.shape, name=what, case=case)
        if not torch.equal(g_t.long(), e_t):
            row = int((g_t.long() != e_t).any(dim=1).nonzero()[0])
            cause = None
            if what == "targets":
                if not (g_t == ignore_index).any():
                    cause = f"no padding position is masked with {ignore_index}: the loss would learn to predict padding."
                elif torch.equal(g_t.long()[g_t != ignore_index], exp_in[g_t != ignore_index]):
                    cause = "the targets are not shifted: target j must be input j + 1."
                elif ((g_t == ignore_index) | (g_t == pad_token_id)).sum() == ((e_t == ignore_index) | (e_t == pad_token_id)).sum():
                    cause = f"the first padding token after each text must stay a target ({pad_token_id}, 'stop here'); only the later ones become {ignore_index}."
            raise CheckFailed(_message(
                f"{what}: wrong values in row {row}.", case=case,
                lines=[f"expected {e_t[row].tolist()}", f"got      {g_t[row].tolist()}"], cause=cause,
                hint=f"pad every example with {pad_token_id} to the longest length + 1; inputs drop the last column, "
                     f"targets drop the first; in the targets replace every padding token except the first by {ignore_index}.",
            ))


def check_collate_masks(
    fn: Callable,
    *,
    lengths: Sequence[int] = (6, 3, 5),
    prompt_lengths: Sequence[int] | None = (3, 2, 4),
    eot_inside: bool = False,
    pad_token_id: int = GPT2_EOT_ID,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
    seed: int = 0,
) -> None:
    """Grade ``fn(batch, pad_token_id=, ignore_index=, allowed_max_length=, mask_prompt=)`` on masking.

    With ``prompt_lengths`` the items are ``(ids, prompt_length)`` pairs and
    ``mask_prompt=True``: the targets of the prompt's positions (the first
    ``prompt_length - 1``) become ``ignore_index`` too. With ``eot_inside`` the first
    example holds ``pad_token_id`` in its text: masking goes by position (what comes
    after each example's end), so that token stays a target.
    Compared with :func:`course_utils.instruct.instruction_collate`.
    """
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in lengths]
    if eot_inside:
        ids[0][len(ids[0]) // 2] = pad_token_id
    mask_prompt = prompt_lengths is not None
    batch = [(list(x), p) for x, p in zip(ids, prompt_lengths)] if mask_prompt else [list(x) for x in ids]
    case = (f"{len(batch)} examples of lengths {list(lengths)}"
            f"{f', prompt lengths {list(prompt_lengths)}, mask_prompt=True' if mask_prompt else ', mask_prompt=False'}"
            f"{f', token {pad_token_id} inside the first text' if eot_inside else ''}, allowed_max_length={allowed_max_length}")
    kwargs = dict(pad_token_id=pad_token_id, ignore_index=ignore_index, allowed_max_length=allowed_max_length, mask_prompt=mask_prompt)
    exp_in, exp_tg = _ref_instruction_collate(copy.deepcopy(batch), **kwargs)
    plain_tg = _ref_instruction_collate([list(x) for x in ids], pad_token_id, ignore_index, allowed_max_length)[1]
    if mask_prompt:  # judge only what the flag changes: your own mask_prompt=False output, prompts masked
        own = _own_plain_collate(fn, ids, {**kwargs, "mask_prompt": False}, exp_in.shape)
        if own is not None:
            exp_in, plain_tg = own
            exp_tg = plain_tg.clone()
            for r, (_, p) in enumerate(batch):
                exp_tg[r, : max(p - 1, 0)] = ignore_index
            case += " (expected: your output for mask_prompt=False with the prompt targets masked)"
    got = _call(fn, copy.deepcopy(batch), what="your collate function", case=case, **kwargs)
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        raise CheckFailed(_message("your collate function must return (inputs, targets).", case=case))
    hint = ("mask by position: for an example of n tokens, target n-1 (the first end-of-text) stays, the later ones are "
            f"{ignore_index}; with mask_prompt, the first prompt_length - 1 targets are {ignore_index} as well.")
    for what, g_t, e_t in (("inputs", got[0], exp_in), ("targets", got[1], exp_tg)):
        check_shape(g_t, e_t.shape, name=what, case=case)
        if torch.equal(g_t.long(), e_t):
            continue
        row = int((g_t.long() != e_t).any(dim=1).nonzero()[0])
        cause = None
        if what == "targets":
            if mask_prompt and torch.equal(g_t.long(), plain_tg):
                cause = "the prompt was not masked: with mask_prompt=True, set the prompt's targets to the ignore index."
            elif eot_inside and bool((g_t.long()[0] == ignore_index).sum() > (e_t[0] == ignore_index).sum()):
                cause = (f"the end-of-text token inside the text was masked too: find each example's end by its length "
                         f"(position), not by looking for the value {pad_token_id}.")
            elif mask_prompt:
                for shift, why in ((1, "one target too many was masked: target j predicts token j + 1, so the prompt's "
                                       "targets are the first prompt_length - 1 positions."),
                                   (-1, "one target too few was masked: mask the first prompt_length - 1 targets.")):
                    variant = plain_tg.clone()
                    for r, (_, p) in enumerate(batch):
                        variant[r, : max(p - 1 + shift, 0)] = ignore_index
                    if torch.equal(g_t.long(), variant):
                        cause = why
        raise CheckFailed(_message(
            f"{what}: wrong values in row {row}.", case=case,
            lines=[f"expected {e_t[row].tolist()}", f"got      {g_t[row].tolist()}"], cause=cause, hint=hint))


def _own_plain_collate(fn: Callable, ids: list[list[int]], kwargs: dict, shape: torch.Size) -> tuple | None:
    """The student's (inputs, targets) for the same texts without prompt masking, if it gives a valid pair
    of the expected shape; None otherwise (then the reference's output is the yardstick)."""
    try:
        got = fn([list(x) for x in ids], **kwargs)
    except Exception:  # graded by the check without mask_prompt, not here
        return None
    if (isinstance(got, (tuple, list)) and len(got) == 2
            and all(isinstance(t, torch.Tensor) and tuple(t.shape) == tuple(shape) for t in got)):
        return got[0].long(), got[1].long()
    return None
