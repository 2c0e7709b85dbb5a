"""Instruction fine-tuning data (chapter 7): prompts, datasets, and batching.

Each example becomes one text in the Alpaca layout: a fixed preamble, the
instruction, an optional input, then the response the model should learn to write.
Batches are padded with ``<|endoftext|>``; the targets are the inputs shifted by one,
and padding positions in the targets are set to -100 so the loss skips them. The
first end-of-text after each response stays a target: it teaches the model to stop.

After training, :func:`generate_responses` answers each test entry greedily (stopping
at ``<|endoftext|>``), and :func:`save_responses` keeps the answers as JSON, for the
scores of :mod:`course_utils.response_scores` and :mod:`course_utils.judge`.
"""
from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .data import IGNORE_INDEX, build_loader
from .generate import generate
from .gpt import context_length_of
from .tokenizers import GPT2_EOT_ID, gpt2_tokenizer

PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
RESPONSE_HEADER = "\n\n### Response:\n"


def format_input(entry: dict[str, str]) -> str:
    """The prompt part of an example: preamble, instruction, and the input if any."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text


def format_example(entry: dict[str, str]) -> str:
    """Prompt plus the response header and the expected output: the full training text."""
    return format_input(entry) + RESPONSE_HEADER + entry["output"]


def split_instruction_data(
    data: Sequence[dict], train_frac: float = 0.85, test_frac: float = 0.1, seed: int | None = None
) -> tuple[list, list, list]:
    """Train / test / validation lists (validation is the remainder, 5% by default).

    With ``seed=None`` the file's order is kept, so everyone gets the same split.
    """
    rows = list(data)
    if seed is not None:
        random.Random(seed).shuffle(rows)
    n_train = int(len(rows) * train_frac)
    n_test = int(len(rows) * test_frac)
    return rows[:n_train], rows[n_train : n_train + n_test], rows[n_train + n_test :]


class InstructionDataset(Dataset):
    """Token ids of each formatted example.

    Items are lists of ids, or ``(ids, prompt_length)`` pairs when
    ``with_prompt_length=True`` (needed to mask the prompt out of the loss).
    """

    def __init__(self, data: Sequence[dict], tokenizer: tiktoken.Encoding | None = None, with_prompt_length: bool = False):
        tokenizer = tokenizer or gpt2_tokenizer()
        self.with_prompt_length = with_prompt_length
        self.encoded = [tokenizer.encode(format_example(entry)) for entry in data]
        self.prompt_lengths = [len(tokenizer.encode(format_input(entry) + RESPONSE_HEADER)) for entry in data]

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int):
        if self.with_prompt_length:
            return self.encoded[i], self.prompt_lengths[i]
        return self.encoded[i]


def instruction_collate(
    batch: Sequence,
    pad_token_id: int = GPT2_EOT_ID,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
    mask_prompt: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch of id lists to (B, L) inputs and targets.

    For an example of n tokens: inputs are the n tokens then padding; targets are
    tokens 2..n, one end-of-text (the "stop here" signal), then ``ignore_index``. The
    masking goes by position, not by value, so an end-of-text inside the text is kept.
    With ``mask_prompt`` (items must be ``(ids, prompt_length)``) the targets that are
    prompt tokens are ignored too. ``allowed_max_length`` cuts both to that many columns.
    """
    items = [item if isinstance(item, tuple) else (item, None) for item in batch]
    if mask_prompt and any(length is None for _, length in items):
        raise ValueError("mask_prompt=True needs (ids, prompt_length) items: use InstructionDataset(..., with_prompt_length=True).")
    width = max(len(ids) for ids, _ in items)  # inputs are at most this long
    inputs = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    targets = torch.full((len(items), width), ignore_index, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(items):
        n = len(ids)
        ids_t = torch.as_tensor(list(ids), dtype=torch.long)
        inputs[row, :n] = ids_t
        targets[row, : n - 1] = ids_t[1:]  # next-token targets
        targets[row, n - 1] = pad_token_id  # the end-of-text after the response
        if mask_prompt:
            targets[row, : max(prompt_length - 1, 0)] = ignore_index
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs.to(device), targets.to(device)


def create_instruction_dataloader(
    data: Sequence[dict],
    batch_size: int = 8,
    shuffle: bool = True,
    drop_last: bool = True,
    allowed_max_length: int | None = 1024,
    mask_prompt: bool = False,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    tokenizer: tiktoken.Encoding | None = None,
    seed: int = 123,
) -> DataLoader:
    """A DataLoader of padded (inputs, targets) batches for instruction fine-tuning.

    Batches come from :func:`instruction_collate` (``allowed_max_length``,
    ``mask_prompt`` and ``device`` are passed on); ``seed`` fixes the shuffled order.
    Under ``torchrun`` each process gets its own share (see :func:`course_utils.data.build_loader`).
    """
    dataset = InstructionDataset(data, tokenizer, with_prompt_length=mask_prompt)
    collate = partial(instruction_collate, allowed_max_length=allowed_max_length, mask_prompt=mask_prompt, device=device)
    return build_loader(
        dataset, batch_size, shuffle, drop_last, num_workers=num_workers, collate_fn=collate, seed=seed
    )


# --- the fine-tuned model's answers (chapter 7, sections on responses and scoring) ---------

RESPONSES_FILE = "instruction-responses.json"  # where the notebook saves the test set's answers


def response_prompt(entry: dict[str, str]) -> str:
    """What the model is given to answer ``entry``: the prompt and the response header.

    It is exactly the start of :func:`format_example`'s training text, so the model
    continues where, during training, the expected output began.
    """
    return format_input(entry) + RESPONSE_HEADER


@torch.no_grad()
def generate_response(
    model: torch.nn.Module,
    entry: dict[str, str],
    tokenizer: tiktoken.Encoding | None = None,
    device: str | torch.device = "cpu",
    max_new_tokens: int = 64,
) -> str:
    """The model's greedy answer to one entry: new tokens only, up to ``<|endoftext|>``.

    The prompt is cut to its last tokens if it would not leave room for
    ``max_new_tokens`` in the model's context. Leading and trailing whitespace is
    stripped from the decoded answer.
    """
    tokenizer = tokenizer or gpt2_tokenizer()
    prompt_ids = tokenizer.encode(response_prompt(entry))
    context = context_length_of(model) or len(prompt_ids) + max_new_tokens
    keep = max(1, context - max_new_tokens)
    idx = torch.tensor([prompt_ids[-keep:]], dtype=torch.long, device=device)  # (1, T)
    out = generate(model, idx, max_new_tokens=max_new_tokens, context_size=context, temperature=0.0, eos_id=GPT2_EOT_ID)
    new_ids = [i for i in out[0, idx.shape[1]:].tolist() if i != GPT2_EOT_ID]
    return tokenizer.decode(new_ids).strip()


def generate_responses(
    model: torch.nn.Module,
    entries: Sequence[dict[str, str]],
    tokenizer: tiktoken.Encoding | None = None,
    device: str | torch.device = "cpu",
    max_new_tokens: int = 64,
    response_key: str = "model_response",
    show_progress: bool = True,
) -> list[dict[str, str]]:
    """Copies of ``entries``, each with the model's answer under ``response_key``."""
    tokenizer = tokenizer or gpt2_tokenizer()
    answered = []
    for entry in tqdm(entries, desc="responses", unit="entry", disable=not show_progress):
        answer = generate_response(model, entry, tokenizer, device, max_new_tokens)
        answered.append({**entry, response_key: answer})
    return answered


def save_responses(entries: Sequence[dict], path: str | os.PathLike = RESPONSES_FILE) -> Path:
    """Write the entries (with their responses) as readable JSON; returns the path."""
    path = Path(path)
    path.write_text(json.dumps(list(entries), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def load_responses(path: str | os.PathLike = RESPONSES_FILE) -> list[dict]:
    """Read back what :func:`save_responses` wrote."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
