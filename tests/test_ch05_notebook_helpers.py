"""Chapter 5's notebook writes a few helpers from scratch; they must agree with the package.

The notebook (book/ch05_pretraining.ipynb) teaches the loss of a loader, the bare
training loop, the temperature/top-k sampler and the sampling loop, and checks each
against ``course_utils`` once, on the inputs it happens to use. These tests take the
function definitions out of the notebook's code cells (without running the notebook)
and compare them with the package on other inputs: a short last batch, several
temperatures and cut-offs, another seed. An edit of the notebook that changes what a
helper computes fails here.
"""
from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
from IPython.core.inputtransformer2 import TransformerManager
import torch
import torch.nn.functional as F

from course_utils.data import create_dataloader
from course_utils.datasets import load_the_verdict
from course_utils.generate import generate, next_token, text_to_token_ids
from course_utils.gpt import GPTConfig, GPTModel
from course_utils.tokenizers import gpt2_tokenizer
from course_utils.train import calc_loss_batch, calc_loss_loader, make_optimizer, train_language_model

NOTEBOOK = Path(__file__).resolve().parent.parent / "book" / "ch05_pretraining.ipynb"
HELPERS = ["loader_loss", "train_plain", "sample_next", "generate_sampled", "longest_copied"]


@pytest.fixture(scope="module")
def nb() -> dict:
    """The notebook's helper functions, defined in a namespace with what they use."""
    if not NOTEBOOK.exists():
        pytest.skip("book/ch05_pretraining.ipynb is not there")
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    namespace = {"torch": torch, "F": F, "math": math, "calc_loss_batch": calc_loss_batch}
    found = set()
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        source = TransformerManager().transform_cell("".join(cell["source"]))  # magics as IPython runs them
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef) and node.name in HELPERS:
                exec(compile(ast.Module(body=[node], type_ignores=[]), str(NOTEBOOK), "exec"), namespace)
                found.add(node.name)
    missing = sorted(set(HELPERS) - found)
    assert not missing, f"the notebook no longer defines {missing}"
    return namespace


def tiny(seed: int, **overrides) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(GPTConfig.tiny(**overrides))


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (0.0, 3), (1.0, None), (0.6, 20), (2.5, 1), (1.3, 7)])
def test_sample_next_draws_what_next_token_draws(nb, temperature, top_k):
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(11)) * 2
    ours = nb["sample_next"](logits, temperature, top_k, generator=torch.Generator().manual_seed(4))
    package = next_token(logits, temperature, top_k, generator=torch.Generator().manual_seed(4))
    assert ours.shape == (64, 1)
    assert torch.equal(ours, package)


def test_sample_next_top_k_never_leaves_the_top_k(nb):
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(2))
    allowed = set(torch.topk(logits, 4).indices.flatten().tolist())
    drawn = nb["sample_next"](logits.repeat(500, 1), 3.0, 4, generator=torch.Generator().manual_seed(0))
    assert set(drawn.flatten().tolist()) == allowed  # 500 draws at a high temperature reach all four


def test_generate_sampled_matches_uncached_generate(nb):
    model = tiny(3, context_length=16).eval()
    idx = text_to_token_ids("The portrait hung in the", gpt2_tokenizer())
    ours = nb["generate_sampled"](model, idx, 20, 16, temperature=0.9, top_k=15, generator=torch.Generator().manual_seed(8))
    package = generate(model, idx, 20, 16, temperature=0.9, top_k=15, use_cache=False, generator=torch.Generator().manual_seed(8))
    assert ours.shape == (1, idx.shape[1] + 20)  # also past the 16-token context
    assert torch.equal(ours, package)


def test_loader_loss_weights_a_short_last_batch_like_calc_loss_loader(nb):
    model = tiny(5).eval()
    loader = create_dataloader(load_the_verdict()[:1500], batch_size=4, max_length=12, stride=12,
                               shuffle=False, drop_last=False, tokenizer=gpt2_tokenizer())
    sizes = [x.shape[0] for x, _ in loader]
    assert sizes[-1] < 4  # the case where a plain mean of batch means would be wrong
    for n in (None, 2, 100):
        assert nb["loader_loss"](loader, model, "cpu", num_batches=n) == pytest.approx(
            calc_loss_loader(loader, model, "cpu", num_batches=n), rel=1e-6)
    batch_means = [calc_loss_batch(x, y, model, "cpu").item() for x, y in loader]
    assert nb["loader_loss"](loader, model, "cpu") != pytest.approx(sum(batch_means) / len(batch_means), rel=1e-9)


def test_train_plain_ends_with_the_weights_of_train_language_model(nb):
    text = load_the_verdict()[:3000]

    def run(train):
        model = tiny(21, context_length=16)
        loader = create_dataloader(text, batch_size=3, max_length=16, stride=16, shuffle=True, drop_last=True,
                                   tokenizer=gpt2_tokenizer(), generator=torch.Generator().manual_seed(2))
        result = train(model, loader, make_optimizer(model, lr=2e-3))
        return model, result

    plain, losses = run(lambda m, loader, opt: nb["train_plain"](m, loader, opt, "cpu", num_epochs=2))
    package, history = run(lambda m, loader, opt: train_language_model(
        m, loader, loader, opt, "cpu", num_epochs=2, eval_every=2, show_progress=False, log=False))
    assert len(losses) == history.steps_done
    assert losses[-1] < losses[0]  # it trained
    for (name, a), (_, b) in zip(plain.named_parameters(), package.named_parameters()):
        assert torch.equal(a, b), f"{name} differs"


def test_longest_copied_finds_the_longest_common_stretch(nb):
    source = "I had always thought Jack Gisburn rather a cheap genius"
    assert nb["longest_copied"]("so Jack Gisburn was", source) == " Jack Gisburn "
    assert nb["longest_copied"]("xyz", source) == "y"
    assert nb["longest_copied"]("", source) == ""
    text = "the cat sat on the mat"
    brute = max((text[i:j] for i in range(len(text)) for j in range(i, len(text) + 1) if text[i:j] in "a cat on a mat"),
                key=len)
    assert len(nb["longest_copied"](text, "a cat on a mat")) == len(brute)
