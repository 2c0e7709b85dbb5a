"""Turning a trained model into text: encoding helpers and the sampling loop."""
from __future__ import annotations

import tiktoken
import torch
from torch import nn

from .gpt import KVCache


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

    temperature 0 picks the most likely token (greedy). Otherwise logits are divided
    by the temperature (below 1 sharpens, above 1 flattens), optionally cut to the
    ``top_k`` largest and/or the smallest set whose probability reaches ``top_p``, and
    a token is drawn from the softmax.
    """
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}.")
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if temperature <= 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the token that crosses top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.inference_mode()
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
) -> torch.Tensor:
    """Extend ``idx`` (B, T) by up to ``max_new_tokens`` tokens; returns (B, T + new).

    The model sees at most the last ``context_size`` tokens. With ``use_cache`` (and a
    model that has ``new_cache()``, like ``GPTModel``; any other model runs uncached)
    the keys and values of earlier tokens are kept, so each step runs the model on one
    token; when the window is full the cache is rebuilt from the last
    ``context_size`` tokens, giving exactly the tokens the uncached loop gives.

    Generation stops early once every sequence has produced ``eos_id``; the
    end-of-text token itself is not appended, and sequences that finished earlier
    than others are padded with ``eos_id``. The model runs in eval mode (no dropout)
    and is put back in its previous mode afterwards.
    """
    was_training = model.training
    model.eval()
    cache = None
    if use_cache and hasattr(model, "new_cache"):  # other models (e.g. your own) run uncached
        cache = model.new_cache()
        context_size = min(context_size, cache.capacity)
    finished = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    try:
        for _ in range(max_new_tokens):
            logits = _last_logits(model, idx, context_size, cache)  # (B, vocab)
            idx_next = next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if eos_id is not None:
                finished |= idx_next == eos_id
                if bool(finished.all()):
                    break
                idx_next = idx_next.masked_fill(finished, eos_id)
            idx = torch.cat((idx, idx_next), dim=1)
    finally:
        model.train(was_training)
    return idx


def _last_logits(model: nn.Module, idx: torch.Tensor, context_size: int, cache: KVCache | None) -> torch.Tensor:
    """Logits for the token after ``idx``, reusing the cache when it is still valid."""
    if cache is None:
        return model(idx[:, -context_size:])[:, -1, :]
    if cache.length == 0 or cache.length + 1 > context_size:
        cache.reset()  # (re)fill with the last context_size tokens
        window = idx[:, -context_size:]
    else:
        window = idx[:, -1:]  # only the newest token is new to the cache
    return model(window, cache=cache, last_only=True)[:, -1, :]
