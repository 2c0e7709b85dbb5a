"""Shipped datasets, sliding-window loaders, spam splits and instruction batching."""
from __future__ import annotations

import collections
import shutil

import pytest
import torch

import course_utils.datasets as datasets
from course_utils.data import SlidingWindowDataset, build_loader, create_dataloader, train_val_split_text
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
from course_utils.spam import (
    LABELS,
    SpamDataset,
    balance_classes,
    create_spam_dataloaders,
    load_spam_splits,
    split_examples,
)
from course_utils.tokenizers import GPT2_EOT_ID, gpt2_tokenizer
from course_utils.toy_data import make_moons

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


def test_split_examples_defaults_are_70_10_20():
    train, val, test = split_examples(list(range(1000)))
    assert (len(train), len(val), len(test)) == (700, 100, 200)
    assert (train, val, test) == split_examples(list(range(1000)), 0.7, 0.1, 123), "default seed is 123"
    assert split_examples(list(range(1000)), seed=1) != (train, val, test)
    assert train + val + test != list(range(1000)), "shuffled before splitting"


def test_split_examples_rounds_down_and_gives_the_rest_to_test():
    train, val, test = split_examples(list(range(10)), 0.57, 0.18, seed=0)  # 5.7 and 1.8 round down
    assert (len(train), len(val), len(test)) == (5, 1, 4)
    assert split_examples([], 0.7, 0.1) == ([], [], [])
    assert [len(part) for part in split_examples(list(range(10)), 0.7, 0.3)] == [7, 3, 0]
    assert [len(part) for part in split_examples(list(range(10)), 1.0, 0.0)] == [10, 0, 0]


@pytest.mark.parametrize("train_frac,val_frac", [(0.0, 0.1), (-0.1, 0.1), (0.7, -0.1), (0.8, 0.3)])
def test_split_examples_refuses_impossible_fractions(train_frac, val_frac):
    with pytest.raises(ValueError, match="train_frac"):
        split_examples(list(range(10)), train_frac, val_frac)


def test_balance_classes_is_seeded_mixed_and_keeps_rows_intact():
    rows = [("ham", f"h{i}") for i in range(50)] + [("spam", f"s{i}") for i in range(20)]
    balanced = balance_classes(rows)
    assert len(balanced) == 40 and set(balanced) <= set(rows) and len(set(balanced)) == 40
    assert balanced == balance_classes(rows, seed=123), "default seed is 123"
    assert balanced != balance_classes(rows, seed=5)
    labels = [label for label, _ in balanced]
    assert labels != sorted(labels), "labels must be shuffled together, not one block per label"
    # the ham kept is a random sample, not the first 20
    assert {text for label, text in balanced if label == "ham"} != {f"h{i}" for i in range(20)}
    three = balance_classes(rows + [("other", "o0"), ("other", "o1")], seed=0)
    assert collections.Counter(label for label, _ in three) == {"ham": 2, "spam": 2, "other": 2}


def test_spam_splits_default_seed_and_split_seed():
    assert load_spam_splits() == load_spam_splits(seed=123)
    balanced = balance_classes(datasets.load_sms_spam(), seed=7)
    assert load_spam_splits(seed=7) == split_examples(balanced, 0.7, 0.1, seed=7)


def test_create_spam_dataloaders_shapes_order_and_padding():
    train_loader, val_loader, test_loader = create_spam_dataloaders(batch_size=8)
    train_rows, val_rows, test_rows = load_spam_splits(123)
    assert len(train_loader.dataset) == 1045 and len(val_loader.dataset) == 149 and len(test_loader.dataset) == 300
    width = train_loader.dataset.max_length
    assert val_loader.dataset.max_length == test_loader.dataset.max_length == width
    assert train_loader.dataset.input_ids.shape == (1045, width)
    assert len(train_loader) == 1045 // 8, "training drops the short last batch"
    assert len(val_loader) == -(-149 // 8) and len(test_loader) == -(-300 // 8), "evaluation keeps every message"
    # validation and test keep the split's order; training is shuffled with the seed
    first_val_x, first_val_y = next(iter(val_loader))
    assert torch.equal(first_val_x, val_loader.dataset.input_ids[:8])
    assert first_val_y.tolist() == [LABELS[label] for label, _ in val_rows[:8]]
    reference = torch.utils.data.DataLoader(
        train_loader.dataset, 8, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(123)
    )
    x, _ = next(iter(train_loader))
    assert torch.equal(x, next(iter(reference))[0]), "shuffled by a generator seeded with seed"
    again, _ = next(iter(create_spam_dataloaders(batch_size=8)[0]))
    assert torch.equal(again, x)
    other, _ = next(iter(create_spam_dataloaders(batch_size=8, seed=1)[0]))
    assert not torch.equal(other, x)
    four = create_spam_dataloaders(batch_size=4)[0]
    assert next(iter(four))[0].shape == (4, width)


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


def test_collate_truncation_keeps_the_first_columns_with_aligned_targets():
    # Cut after shifting: every kept target is still the token after its input, so the
    # last kept column of a long row predicts the token just past the cut (3), not a pad.
    inputs, targets = instruction_collate([[0, 1, 2, 3, 4], [5, 6]], allowed_max_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, GPT2_EOT_ID]]
    assert targets.tolist() == [[1, 2, 3], [6, GPT2_EOT_ID, IGNORE_INDEX]]
    # a cut wider than the batch changes nothing
    full = instruction_collate([[0, 1, 2, 3, 4], [5, 6]])
    wide = instruction_collate([[0, 1, 2, 3, 4], [5, 6]], allowed_max_length=9)
    assert all(torch.equal(a, b) for a, b in zip(full, wide))
    # with a masked prompt, the mask is applied by position before the cut
    inputs, targets = instruction_collate([([0, 1, 2, 3, 4], 3), ([5, 6], 1)], allowed_max_length=3, mask_prompt=True)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, GPT2_EOT_ID]]
    assert targets.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 3], [6, GPT2_EOT_ID, IGNORE_INDEX]]


def test_collate_masks_prompt():
    inputs, targets = instruction_collate([([0, 1, 2, 3, 4], 3), ([5, 6], 1)], mask_prompt=True)
    assert targets.tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, 3, 4, GPT2_EOT_ID],
        [6, GPT2_EOT_ID, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
    ]
    # a prompt of length 0 masks nothing; prompt_length is ignored without mask_prompt
    _, unmasked = instruction_collate([([0, 1, 2], 0)], mask_prompt=True)
    assert unmasked.tolist() == [[1, 2, GPT2_EOT_ID]]
    _, plain = instruction_collate([([0, 1, 2], 2)])
    assert plain.tolist() == [[1, 2, GPT2_EOT_ID]]
    with pytest.raises(ValueError, match="prompt_length"):
        instruction_collate([[1, 2]], mask_prompt=True)


def test_collate_custom_pad_ignore_index_and_device():
    inputs, targets = instruction_collate([[1, 2, 3], [4]], pad_token_id=0, ignore_index=-1, device="meta")
    assert inputs.device.type == targets.device.type == "meta"
    inputs, targets = instruction_collate([[1, 2, 3], [4]], pad_token_id=0, ignore_index=-1)
    assert inputs.tolist() == [[1, 2, 3], [4, 0, 0]] and targets.tolist() == [[2, 3, 0], [0, -1, -1]]
    assert inputs.dtype == targets.dtype == torch.long
    # ids given as a tensor work the same as a list
    from_tensor = instruction_collate([torch.tensor([1, 2, 3]), torch.tensor([4])], pad_token_id=0, ignore_index=-1)
    assert from_tensor[1].tolist() == targets.tolist()


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


def test_split_instruction_data_seed_and_fractions():
    data = [{"instruction": str(i), "input": "", "output": ""} for i in range(100)]
    train, test, val = split_instruction_data(data)
    assert train + test + val == data, "no seed: the file's order, split 85 / 10 / 5"
    assert (len(train), len(test), len(val)) == (85, 10, 5)
    shuffled = split_instruction_data(data, seed=3)
    assert sum(shuffled, []) != data and sorted(sum(shuffled, []), key=lambda e: int(e["instruction"])) == data
    assert shuffled == split_instruction_data(data, seed=3)
    assert [len(p) for p in split_instruction_data(data, train_frac=0.5, test_frac=0.3)] == [50, 30, 20]


def test_instruction_dataset_items_and_prompt_lengths():
    tok = gpt2_tokenizer()
    entries = [ENTRY, {**ENTRY, "input": ""}]
    plain = InstructionDataset(entries)
    assert len(plain) == 2 and plain[0] == tok.encode(format_example(ENTRY))
    with_lengths = InstructionDataset(entries, with_prompt_length=True)
    ids, prompt_len = with_lengths[1]
    assert ids == plain[1]
    assert prompt_len == len(tok.encode(format_input(entries[1]) + "\n\n### Response:\n"))
    assert tok.decode(ids[prompt_len:]) == ENTRY["output"], "the response starts right after the prompt"


def test_prompt_length_is_a_true_prefix_of_every_shipped_example():
    """Masking goes by position, so the prompt's own tokens must begin every example's tokens."""
    tok = gpt2_tokenizer()
    data = datasets.load_instruction_data()
    dataset = InstructionDataset(data, with_prompt_length=True)
    for entry, (ids, prompt_len) in zip(data, dataset):
        assert ids[:prompt_len] == tok.encode(format_input(entry) + "\n\n### Response:\n"), entry["instruction"]


def test_create_instruction_dataloader_settings_reach_the_batches():
    data = datasets.load_instruction_data()[:20]
    dataset = InstructionDataset(data)
    longest = max(len(ids) for ids in dataset.encoded)

    def first_inputs(**kwargs):
        return next(iter(create_instruction_dataloader(data, batch_size=4, **kwargs)))[0]

    unshuffled = first_inputs(shuffle=False)
    assert torch.equal(unshuffled, instruction_collate([dataset[i] for i in range(4)])[0])
    shuffled = first_inputs()
    assert not torch.equal(shuffled, unshuffled), "shuffle=True by default"
    assert torch.equal(first_inputs(), shuffled), "seeded: the same order every time"
    assert not torch.equal(first_inputs(seed=1), shuffled)
    assert first_inputs(shuffle=False, allowed_max_length=16).shape == (4, 16)
    assert first_inputs(shuffle=False, allowed_max_length=None).shape[1] <= longest
    assert first_inputs(shuffle=False, device="meta").device.type == "meta"
    loader = create_instruction_dataloader(data[:10], batch_size=4)
    assert len(loader) == 2, "drop_last=True by default"
    assert len(create_instruction_dataloader(data[:10], batch_size=4, drop_last=False)) == 3
    _, masked = next(iter(create_instruction_dataloader(data, batch_size=4, shuffle=False, mask_prompt=True)))
    _, unmasked = next(iter(create_instruction_dataloader(data, batch_size=4, shuffle=False)))
    assert (masked == IGNORE_INDEX).sum() > (unmasked == IGNORE_INDEX).sum()


def test_instruction_loader_default_cut_is_1024_columns():
    long_entry = {"instruction": "word " * 1100, "input": "", "output": "ok"}
    x, y = next(iter(create_instruction_dataloader([long_entry], batch_size=1)))
    assert x.shape == y.shape == (1, 1024)


# --- loaders -----------------------------------------------------------------------


def test_create_dataloader_defaults_and_generator():
    text = datasets.load_the_verdict()
    loader = create_dataloader(text)
    assert loader.batch_size == 4 and loader.drop_last
    assert isinstance(loader.sampler, torch.utils.data.RandomSampler), "shuffle=True by default"
    dataset = loader.dataset
    assert (dataset.max_length, len(dataset)) == (256, len(range(0, 5145 - 256, 128))), "max_length 256, stride 128"

    def first(seed):
        return next(iter(create_dataloader(text, max_length=8, stride=8, generator=torch.Generator().manual_seed(seed))))[0]

    assert torch.equal(first(1), first(1)) and not torch.equal(first(1), first(2))
    class ByCharacter:  # any object with tiktoken's encode(text, allowed_special=...) will do
        def encode(self, text, allowed_special=()):
            return [ord(ch) for ch in text]

    own = create_dataloader(text, batch_size=2, max_length=4, stride=4, shuffle=False, tokenizer=ByCharacter())
    assert next(iter(own))[0][0].tolist() == [ord(ch) for ch in text[:4]]


def test_build_loader_in_one_process():
    dataset = torch.utils.data.TensorDataset(torch.arange(10))

    def batches(loader):
        return [b[0].tolist() for b in loader]

    plain = build_loader(dataset, 4)
    assert not isinstance(plain.sampler, torch.utils.data.DistributedSampler), "no process group: no sharding"
    assert batches(plain) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]], "defaults: no shuffle, keep the short batch"
    assert batches(build_loader(dataset, 4, drop_last=True)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    seeded = batches(build_loader(dataset, 4, shuffle=True, seed=3))
    assert seeded == batches(build_loader(dataset, 4, shuffle=True, seed=3)) != batches(plain)
    assert seeded != batches(build_loader(dataset, 4, shuffle=True, seed=4))
    assert seeded == batches(build_loader(dataset, 4, shuffle=True, generator=torch.Generator().manual_seed(3)))
    sharded = build_loader(dataset, 4, shard=True)
    assert isinstance(sharded.sampler, torch.utils.data.DistributedSampler) and sharded.sampler.num_replicas == 1
    assert batches(sharded) == batches(plain)
    permuted = build_loader(dataset, 10, shuffle=True, shard=True, seed=3).sampler
    assert list(permuted) == torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    from_generator = build_loader(dataset, 10, shuffle=True, shard=True, generator=torch.Generator().manual_seed(3))
    assert from_generator.sampler.seed == 3
    assert build_loader(dataset, 10, shuffle=True, shard=True).sampler.seed == 0
    doubled = build_loader(dataset, 5, collate_fn=lambda items: torch.stack([i[0] for i in items]) * 2)
    assert [b.tolist() for b in doubled] == [[0, 2, 4, 6, 8], [10, 12, 14, 16, 18]]
    assert build_loader(dataset, 2, num_workers=0).num_workers == 0
    with pytest.raises(ValueError, match="not both"):
        build_loader(dataset, 2, shuffle=True, seed=1, generator=torch.Generator())
    for bad in (0, -1, 2.5, None, True):
        with pytest.raises(ValueError, match="batch_size"):
            build_loader(dataset, bad)


def test_sliding_window_edges():
    tok = gpt2_tokenizer()
    text = datasets.load_the_verdict()
    ids = tok.encode(text)
    ds = SlidingWindowDataset(text, tok, max_length=8, stride=1)
    x, y = ds[len(ds) - 1]
    assert y[-1].item() == ids[-1], "the last window's target ends at the text's last token"
    exact = tok.decode(ids[:9])  # 9 tokens: exactly one window of 8 plus its target
    assert len(SlidingWindowDataset(exact, tok, max_length=8, stride=1)) == 1
    with pytest.raises(ValueError, match="too few"):
        SlidingWindowDataset(tok.decode(ids[:8]), tok, max_length=8, stride=1)
    for max_length, stride in ((0, 1), (4, 0)):
        with pytest.raises(ValueError, match="positive"):
            SlidingWindowDataset(text, tok, max_length=max_length, stride=stride)
    marked = SlidingWindowDataset("a b c d e f <|endoftext|> g h", tok, max_length=4, stride=4)
    assert GPT2_EOT_ID in marked.token_ids.tolist(), "the end-of-text marker is allowed in the text"
    assert ds.token_ids.dtype == torch.long and x.dtype == torch.long


def test_train_val_split_text_default_is_90_percent():
    assert train_val_split_text("abcdefghij") == ("abcdefghi", "j")
    assert train_val_split_text("abcdefghij", 0.5) == ("abcde", "fghij")


# --- shipped files: errors -----------------------------------------------------------


def test_asset_path_errors(tmp_path, monkeypatch):
    with pytest.raises(KeyError, match="Unknown dataset file"):
        datasets.asset_path("no-such-file.txt")
    monkeypatch.setattr(datasets, "ASSETS_DIR", tmp_path)  # an empty folder: the file is missing
    datasets.asset_path.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="the-verdict.txt is missing. Reinstall"):
            datasets.asset_path("the-verdict.txt")
    finally:
        datasets.asset_path.cache_clear()


def test_sms_spam_rows_keep_unbalanced_quotes_in_one_message():
    rows = datasets.load_sms_spam()
    assert all(label in {"ham", "spam"} for label, _ in rows)
    quoted = [text for _, text in rows if text.count('"') % 2 == 1]
    assert quoted and all("\n" not in text and "\t" not in text for text in quoted)


# --- toy data ---------------------------------------------------------------------------


def test_make_moons_shapes_labels_and_geometry():
    points, labels = make_moons(101, noise=0.0, seed=0)
    assert points.shape == (101, 2) and points.dtype == torch.float32
    assert labels.dtype == torch.long and labels.tolist() == [0] * 50 + [1] * 51
    upper, lower = points[labels == 0], points[labels == 1]
    # without noise: the upper half of the unit circle, and the lower half of a unit circle around (1, 0.5)
    torch.testing.assert_close(upper.norm(dim=1), torch.ones(50))
    assert (upper[:, 1] >= 0).all()
    torch.testing.assert_close((lower - torch.tensor([1.0, 0.5])).norm(dim=1), torch.ones(51))
    assert (lower[:, 1] <= 0.5).all()
    noisy, _ = make_moons(101, seed=0)
    spread = (noisy - points).std().item()
    assert 0.1 < spread < 0.2, f"default noise 0.15 (got a spread of {spread:.3f})"


def test_make_moons_is_seeded_and_leaves_the_global_generator_alone():
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    a = make_moons(20, seed=4)
    assert torch.equal(torch.rand(1), expected_next), "the global random state must not move"
    b = make_moons(20, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(make_moons(20, seed=5)[0], a[0])
    assert torch.equal(make_moons(20)[0], make_moons(20, seed=0)[0]), "default seed is 0"
