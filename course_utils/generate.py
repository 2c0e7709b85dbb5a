"""Turning a trained model into text: encoding helpers and the sampling loop.

:func:`generate` feeds the model a *window* of the sequence and reads the next token
off the window's last position. Which window, step by step, is decided in one place,
:func:`window_start`, for the cached and the uncached loop alike:

- while the sequence has at most ``context_size`` tokens, the window is all of it;
- past that, the window moves forward ``window_stride`` tokens at a time. With
  stride 1 it is the plain sliding window of the chapter (always the last
  ``context_size`` tokens), which costs a forward pass over the whole window per
  token even with a KV cache, because moving the window shifts every position and
  GPT-2's absolute position embeddings then change every cached key. With a larger
  stride the cache is rebuilt only once every ``window_stride`` steps (from the last
  ``context_size - window_stride + 1`` tokens), and the steps in between feed one
  token each.
"""
from __future__ import annotations

import math

import tiktoken
import torch
from torch import nn

from .device import eval_mode
from .gpt import context_length_of
from .kv_cache import KVCache


def text_to_token_ids(text: str, tokenizer: tiktoken.Encoding) -> torch.Tensor:
    """Encode ``text`` as a (1, T) batch of ids (``<|endoftext|>`` allowed)."""
    ids = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    return torch.tensor(ids, dtype=torch.long).unsqueeze(0)  # add the batch dimension


def token_ids_to_text(ids: torch.Tensor, tokenizer: tiktoken.Encoding) -> str:
    """Decode a (1, T) or (T,) tensor of ids back to text."""
    flat = ids.squeeze(0) if ids.dim() == 2 else ids
    return tokenizer.decode(flat.tolist())


def next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose the next token from (B, vocab) logits; returns (B, 1) ids.

    ``temperature`` 0 (or below) picks the most likely token (greedy). Otherwise the
    logits are divided by the temperature (below 1 sharpens, above 1 flattens), then
    optionally cut to the ``top_k`` largest (tokens tied with the k-th largest are
    kept too) and/or to the smallest set of most likely tokens whose probability,
    after the temperature, reaches ``top_p``; a token is drawn from the softmax of
    what is left, with ``generator`` if given.
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if temperature <= 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # of the more likely tokens
        drop_sorted = mass_before >= top_p  # keeps the token that crosses top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def window_start(length: int, start: int, context_size: int, stride: int) -> int:
    """Start of the window the model reads to predict token number ``length + 1``.

    ``length`` tokens exist and the previous window began at ``start``. The window
    ``[start, length)`` stays put while it holds at most ``context_size`` tokens; when
    it would hold more, it moves forward by whole multiples of ``stride``, just far
    enough to fit. ``stride=1`` gives the plain sliding window (the last
    ``context_size`` tokens).
    """
    overflow = length - start - context_size
    if overflow <= 0:
        return start
    return start + stride * math.ceil(overflow / stride)


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    window_stride: int | None = None,
) -> torch.Tensor:
    """Extend ``idx`` (B, T) by up to ``max_new_tokens`` tokens; returns (B, T + new).

    Each step feeds the model a window of at most ``context_size`` tokens (capped at
    the model's own context length when it has one) and picks the next token with
    :func:`next_token`. Which window is the module's one policy (see the module
    docstring and :func:`window_start`): the whole sequence while it fits, then a
    window that moves ``window_stride`` tokens at a time.

    ``window_stride`` defaults to 1 without a cache: every prediction sees exactly the
    last ``context_size`` tokens, the loop of the chapter. With the cache it defaults
    to ``max(1, context_size // 4)``: the cache is rebuilt once every
    ``window_stride`` steps and the steps in between feed one token, so a prediction
    past the window sees between ``context_size - window_stride + 1`` and
    ``context_size`` tokens instead of exactly ``context_size``. Consequently:

    - while prompt plus new tokens fit in ``context_size``, cached and uncached
      generation give the same tokens, whatever the stride;
    - past that, they give the same tokens when given the same ``window_stride``
      (``window_stride=1`` with the cache reproduces the plain loop, at the plain
      loop's cost; a stride with ``use_cache=False`` reproduces the cached loop).

    ``use_cache`` needs a model with ``new_cache()``, like ``GPTModel``; any other
    model runs uncached. Generation stops early once every sequence has produced
    ``eos_id``; the token of the step on which the last of them does so is not
    appended (so a single sequence never ends with ``eos_id``), and sequences that
    finished earlier carry ``eos_id`` from their end-of-text token on. Runs without
    gradients and with the model in eval mode (no dropout); every module's mode is
    restored afterwards. The result is an ordinary tensor, usable as training input.
    """
    if idx.dim() != 2:
        raise ValueError(f"idx must be (batch, tokens), got shape {tuple(idx.shape)}; try idx.unsqueeze(0).")
    if max_new_tokens < 0 or context_size < 1:
        raise ValueError(f"Need max_new_tokens >= 0 and context_size >= 1, got {max_new_tokens} and {context_size}.")
    limit = context_length_of(model)
    if limit is not None:
        context_size = min(context_size, limit)
    cache = model.new_cache() if use_cache and hasattr(model, "new_cache") else None
    if cache is not None:
        context_size = min(context_size, cache.capacity)
    if window_stride is None:
        window_stride = max(1, context_size // 4) if cache is not None else 1
    if not 1 <= window_stride <= context_size:
        raise ValueError(f"window_stride must be between 1 and context_size ({context_size}), got {window_stride}.")

    start = max(0, idx.shape[1] - context_size)  # a long prompt: its last context_size tokens
    finished = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    with eval_mode(model):
        for _ in range(max_new_tokens):
            new_start = window_start(idx.shape[1], start, context_size, window_stride)
            logits = _next_logits(model, idx, new_start, moved=new_start != start, cache=cache)  # (B, vocab)
            start = new_start
            idx_next = next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if eos_id is not None:
                finished |= idx_next == eos_id
                if bool(finished.all()):
                    break
                idx_next = idx_next.masked_fill(finished, eos_id)
            idx = torch.cat((idx, idx_next), dim=1)
    return idx


def _next_logits(model: nn.Module, idx: torch.Tensor, start: int, moved: bool, cache: KVCache | None) -> torch.Tensor:
    """Logits for the token after ``idx`` given the window ``idx[:, start:]``.

    With a cache that holds the window but its newest token, only that token is fed;
    an empty cache, or a window that has moved, is (re)built from the whole window.
    """
    if cache is None:
        return model(idx[:, start:])[:, -1, :]
    if cache.length == 0 or moved:
        cache.reset()
        window = idx[:, start:]
    else:
        window = idx[:, -1:]  # only the newest token is new to the cache
    return model(window, cache=cache, last_only=True)[:, -1, :]
