"""Assignment ch07's checks against the reference, correct variants, and deliberate mistakes."""
from __future__ import annotations

import torch

from course_utils import instruct
from course_utils.grading import ch07

from .helpers import Cases, registry_tests, right, wrong


def format_by_parts(entry):
    """Correct: sections joined with blank lines."""
    parts = [instruct.PREAMBLE, "### Instruction:\n" + entry["instruction"]]
    if entry.get("input", ""):
        parts.append("### Input:\n" + entry["input"])
    return "\n\n".join(parts)


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


def collate(mistake=None):
    def fn(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None):
        width = max(len(b) for b in batch) + 1
        inputs, targets = [], []
        for ids in batch:
            padded = list(ids) + [pad_token_id] * (width - len(ids))
            x, y = padded[:-1], padded[1:]
            if mistake == "no_shift":
                y = padded[:-1]
            if mistake != "no_mask":
                first_pad = len(ids) - 1 + (1 if mistake == "no_shift" else 0)
                keep = first_pad + (0 if mistake == "mask_all" else 1)
                y = y[:keep] + [ignore_index] * (len(y) - keep)
            inputs.append(x[:allowed_max_length])
            targets.append(y[:allowed_max_length])
        return torch.tensor(inputs), torch.tensor(targets)

    return fn


COLLATE_SETTINGS = {"default": {}, "truncated": dict(lengths=(3, 7, 1, 7), allowed_max_length=5, seed=2)}
MASK_SETTINGS = {"default": {}, "truncated": dict(lengths=(2, 7, 4, 4), prompt_lengths=(1, 5, 4, 2), allowed_max_length=5, seed=2),
                 "eot_inside_no_prompt": dict(prompt_lengths=None, eot_inside=True, seed=3), "eot_inside": dict(eot_inside=True, seed=4)}

CASES = {
    "check_format_input": Cases(
        right=[right(f"{name}-{label}", fn, **kw) for name, fn in (("reference", instruct.format_input), ("by_parts", format_by_parts))
               for label, kw in (("default", {}), ("multiline", dict(entries=[{"instruction": "Add:\n2 + 2", "input": "línea\ndos", "output": "4"}])))],
        wrong=[wrong("response_header", lambda e: instruct.format_input(e) + instruct.RESPONSE_HEADER, "response header"),
               wrong("empty_input_section",
                     lambda e: format_by_parts({**e, "input": e.get("input") or "-"}).replace("\n### Input:\n-", "\n### Input:\n"),
                     "'### Input:' section was added"),
               wrong("spacing", lambda e: format_by_parts(e).replace("\n\n", "\n"), "spacing"),
               wrong("no_input", lambda e: format_by_parts({"instruction": e["instruction"]}), "input is missing"),
               wrong("none", lambda e: None, "expected a str")],
    ),
    "check_instruction_collate": Cases(
        right=[right(f"{name}-{label}", fn, **kw)
               for name, fn in (("reference", instruct.instruction_collate), ("by_hand", collate()), ("with_prompt_masks", make_collate()))
               for label, kw in COLLATE_SETTINGS.items()],
        wrong=[wrong("no_mask", collate("no_mask"), "targets", "-100"),
               wrong("no_shift", collate("no_shift"), "not shifted"),
               wrong("mask_all", collate("mask_all"), "first padding token"),
               wrong("one_tensor", lambda batch, **k: torch.zeros(2), "(inputs, targets)")],
    ),
    "check_collate_masks": Cases(
        right=[right(f"{name}-{label}", fn, **kw) for name, fn in (("reference", instruct.instruction_collate), ("by_hand", make_collate()))
               for label, kw in MASK_SETTINGS.items()],
        wrong=[wrong("no_prompt_mask", make_collate("no_prompt_mask"), "targets", "prompt was not masked"),
               wrong("one_too_many", make_collate("one_too_many"), "one target too many"),
               wrong("by_value", make_collate("by_value"), "by its length", prompt_lengths=None, eot_inside=True),
               wrong("one_tensor", lambda batch, **k: torch.zeros(2), "(inputs, targets)")],
    ),
}

test_correct_passes, test_mistake_fails, test_early_return_is_caught = registry_tests(ch07, CASES)
