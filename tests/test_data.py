"""Shipped datasets, sliding-window loaders, spam splits and instruction batching."""
from __future__ import annotations

import collections
import shutil

import pytest
import torch

import course_utils.datasets as datasets
from course_utils.data import SlidingWindowDataset, create_dataloader, train_val_split_text
from course_utils.download import ChecksumError, sha256_of
from course_utils.instruct import (
    IGNORE_INDEX,
    InstructionDataset,
    create_instruction_dataloader,
    format_example,
    format_input,
    instruction_collate,
    split_instruction_data,
)
from course_utils.spam import LABELS, SpamDataset, balance_classes, load_spam_splits, split_examples
from course_utils.tokenizers import GPT2_EOT_ID, gpt2_tokenizer

# --- shipped files ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(datasets.SHIPPED_FILES))
def test_shipped_file_checksums(name):
    assert sha256_of(datasets.ASSETS_DIR / name) == datasets.SHIPPED_FILES[name]
    assert datasets.asset_path(name).is_file()


def test_corrupt_asset_is_refused(tmp_path, monkeypatch):
    shutil.copytree(datasets.ASSETS_DIR, tmp_path / "assets")
    with open(tmp_path / "assets" / "the-verdict.txt", "a", encoding="utf-8") as handle:
        handle.write("an edit")
    monkeypatch.setattr(datasets, "ASSETS_DIR", tmp_path / "assets")
    datasets.asset_path.cache_clear()
    try:
        with pytest.raises(ChecksumError, match="the-verdict.txt"):
            datasets.load_the_verdict()
    finally:
        datasets.asset_path.cache_clear()


def test_dataset_contents():
    assert len(datasets.load_the_verdict()) == 20479
    rows = datasets.load_sms_spam()
    assert len(rows) == 5574
    assert collections.Counter(label for label, _ in rows) == {"ham": 4827, "spam": 747}
    data = datasets.load_instruction_data()
    assert len(data) == 1100 and set(data[0]) == {"instruction", "input", "output"}
    pref = datasets.load_instruction_data(with_preference=True)
    assert len(pref) == 1100 and {"chosen", "rejected"} <= set(pref[0])


# --- sliding windows -------------------------------------------------------------


@pytest.mark.parametrize("max_length,stride", [(4, 1), (4, 4), (8, 3), (256, 128)])
def test_windows_are_shifted_by_one(max_length, stride):
    text = datasets.load_the_verdict()
    ids = torch.tensor(gpt2_tokenizer().encode(text))
    ds = SlidingWindowDataset(text, gpt2_tokenizer(), max_length, stride)
    assert len(ds) == len(range(0, len(ids) - max_length, stride))
    for i in (0, 1, len(ds) - 1):
        x, y = ds[i]
        assert x.shape == y.shape == (max_length,)
        assert torch.equal(x, ids[i * stride : i * stride + max_length])
        assert torch.equal(y, ids[i * stride + 1 : i * stride + max_length + 1])


def test_create_dataloader_batches_and_drop_last():
    text = datasets.load_the_verdict()  # 5,145 tokens
    loader = create_dataloader(text, batch_size=8, max_length=4, stride=4, shuffle=False)
    x, y = next(iter(loader))
    assert x.shape == y.shape == (8, 4)
    assert x.dtype == torch.long
    assert torch.equal(x[0], torch.tensor([40, 367, 2885, 1464]))
    assert torch.equal(x[1, 0], y[0, -1])  # stride == max_length: windows tile the text
    n_windows = len(range(0, 5145 - 4, 4))
    assert len(loader) == n_windows // 8
    keep = create_dataloader(text, batch_size=8, max_length=4, stride=4, shuffle=False, drop_last=False)
    assert len(keep) == -(-n_windows // 8)


def test_short_text_gives_clear_error():
    with pytest.raises(ValueError, match="too few"):
        SlidingWindowDataset("tiny", gpt2_tokenizer(), max_length=16, stride=16)


def test_train_val_split_text():
    train, val = train_val_split_text("abcdefghij", 0.9)
    assert (train, val) == ("abcdefghi", "j")


# --- spam ------------------------------------------------------------------------


def test_spam_split_sizes_and_balance():
    train, val, test = load_spam_splits()
    assert (len(train), len(val), len(test)) == (1045, 149, 300)
    every = train + val + test
    assert collections.Counter(label for label, _ in every) == {"ham": 747, "spam": 747}
    original = collections.Counter(datasets.load_sms_spam())
    assert not collections.Counter(every) - original  # every row comes from the collection
    assert load_spam_splits() == (train, val, test)  # seeded: same split every time
    assert load_spam_splits(seed=1) != (train, val, test)


def test_balance_and_split_helpers():
    rows = [("ham", f"h{i}") for i in range(10)] + [("spam", f"s{i}") for i in range(3)]
    balanced = balance_classes(rows, seed=0)
    assert collections.Counter(label for label, _ in balanced) == {"ham": 3, "spam": 3}
    a, b, c = split_examples(list(range(100)), 0.7, 0.1, seed=0)
    assert (len(a), len(b), len(c)) == (70, 10, 20)
    assert sorted(a + b + c) == list(range(100))


def test_spam_dataset_pads_to_longest_or_given_length():
    rows = [("ham", "Hi there"), ("spam", "WIN a FREE prize now!!! Call 0800")]
    tok = gpt2_tokenizer()
    longest = max(len(tok.encode(t)) for _, t in rows)
    ds = SpamDataset(rows)
    assert ds.input_ids.shape == (2, longest)
    x0, y0 = ds[0]
    n0 = len(tok.encode("Hi there"))
    assert torch.all(x0[n0:] == GPT2_EOT_ID) and y0.item() == LABELS["ham"]
    assert ds[1][1].item() == LABELS["spam"]
    cut = SpamDataset(rows, max_length=3)
    assert cut.input_ids.shape == (2, 3)
    assert cut.input_ids[1].tolist() == tok.encode(rows[1][1])[:3]
    with pytest.raises(ValueError, match="Unknown labels"):
        SpamDataset([("maybe", "x")])


# --- instruction data ------------------------------------------------------------

ENTRY = {"instruction": "Rewrite the sentence.", "input": "The cake was eaten.", "output": "Someone ate the cake."}


def test_alpaca_prompt_format():
    prompt = format_input(ENTRY)
    assert prompt.startswith("Below is an instruction that describes a task.")
    assert "\n\n### Instruction:\nRewrite the sentence." in prompt
    assert prompt.endswith("\n\n### Input:\nThe cake was eaten.")
    assert "### Input" not in format_input({**ENTRY, "input": ""})
    assert format_example(ENTRY) == prompt + "\n\n### Response:\nSomeone ate the cake."


def test_collate_pads_shifts_and_masks():
    inputs, targets = instruction_collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.tolist() == [
        [0, 1, 2, 3, 4],
        [5, 6, GPT2_EOT_ID, GPT2_EOT_ID, GPT2_EOT_ID],
        [7, 8, 9, GPT2_EOT_ID, GPT2_EOT_ID],
    ]
    assert targets.tolist() == [
        [1, 2, 3, 4, GPT2_EOT_ID],
        [6, GPT2_EOT_ID, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
        [8, 9, GPT2_EOT_ID, IGNORE_INDEX, IGNORE_INDEX],
    ]


def test_collate_keeps_end_of_text_inside_the_text():
    inputs, targets = instruction_collate([[1, GPT2_EOT_ID, 2], [3]])
    assert targets[0].tolist() == [GPT2_EOT_ID, 2, GPT2_EOT_ID]
    assert targets[1].tolist() == [GPT2_EOT_ID, IGNORE_INDEX, IGNORE_INDEX]


def test_collate_truncates_and_masks_prompt():
    inputs, targets = instruction_collate([[0, 1, 2, 3, 4], [5, 6]], allowed_max_length=3)
    assert inputs.shape == targets.shape == (2, 3)
    inputs, targets = instruction_collate([([0, 1, 2, 3, 4], 3), ([5, 6], 1)], mask_prompt=True)
    assert targets.tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, 3, 4, GPT2_EOT_ID],
        [6, GPT2_EOT_ID, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
    ]
    with pytest.raises(ValueError, match="prompt_length"):
        instruction_collate([[1, 2]], mask_prompt=True)


def test_collate_targets_match_cross_entropy_masking():
    # The ignored positions must contribute nothing to the loss.
    logits = torch.randn(2, 5, 10)
    inputs, targets = instruction_collate([[0, 1, 2, 3, 4], [5, 6]], pad_token_id=9)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    keep = targets.flatten() != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits.flatten(0, 1)[keep], targets.flatten()[keep])
    assert torch.allclose(loss, manual)
    assert keep.sum() == 5 + 2


def test_instruction_dataset_and_loader():
    data = datasets.load_instruction_data()
    train, test, val = split_instruction_data(data)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    ds = InstructionDataset(train[:4], with_prompt_length=True)
    ids, prompt_len = ds[0]
    tok = gpt2_tokenizer()
    assert tok.decode(ids) == format_example(train[0])
    assert tok.decode(ids[:prompt_len]).endswith("### Response:\n")
    loader = create_instruction_dataloader(train[:16], batch_size=4, allowed_max_length=64, mask_prompt=True)
    x, y = next(iter(loader))
    assert x.shape[0] == 4 and x.shape == y.shape and x.shape[1] <= 64
    assert (y == IGNORE_INDEX).any()
