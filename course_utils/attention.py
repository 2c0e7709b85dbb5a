"""Attention, from the simplest form to the one the GPT model uses.

The chapter-3 progression, each step a small change to the one before:

1. :func:`simple_self_attention` - no weights: scores are dot products of the inputs.
2. :class:`SelfAttentionV1` / :class:`SelfAttentionV2` - trainable query, key and
   value projections and scaling by sqrt(d_k) (raw parameters, then ``nn.Linear``).
3. :class:`CausalAttention` - a mask hides future tokens; dropout on the weights.
4. :class:`MultiHeadAttentionWrapper` - several causal heads side by side.
5. :class:`MultiHeadAttention` - the same with one set of projections split into
   heads, an output projection, and two paths: the explicit
   softmax(QK^T / sqrt(d)) V that the chapter teaches, and PyTorch's fused
   ``scaled_dot_product_attention`` (the default), which does not store the (T x T)
   weight matrix. It also reads and writes a KV cache (:mod:`course_utils.kv_cache`).

Steps 2-4 share two small helpers, :func:`qkv_layers` (the three projections) and
:func:`scaled_attention` (scores, scaling, optional mask and dropout, weighted sum);
chapter 3 defines the same helpers and classes cell by cell.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import LayerKVCache


def simple_self_attention(inputs: torch.Tensor) -> torch.Tensor:
    """Context vectors with no trainable weights: softmax(X X^T) X.

    inputs: (T, d) or (B, T, d). Each output row is a weighted average of all inputs,
    weighted by how similar (dot product) they are to that row's input.
    """
    scores = inputs @ inputs.transpose(-2, -1)  # (..., T, T)
    weights = torch.softmax(scores, dim=-1)  # each row sums to 1
    return weights @ inputs  # (..., T, d)


def causal_mask(num_queries: int, num_keys: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (num_queries, num_keys) mask, True where a query may NOT look.

    Queries are the last ``num_queries`` positions of the ``num_keys`` keys, so with a
    KV cache (more keys than queries) the diagonal shifts to the right: query i may
    see keys 0 .. i + (num_keys - num_queries).
    """
    if not 0 <= num_queries <= num_keys:
        raise ValueError(
            f"causal_mask needs 0 <= num_queries <= num_keys (the queries are the last keys' "
            f"positions); got num_queries={num_queries}, num_keys={num_keys}."
        )
    first_hidden = 1 + num_keys - num_queries  # the diagonal, shifted by the cached keys
    return torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).triu(diagonal=first_hidden)


def qkv_layers(d_in: int, d_out: int, bias: bool) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """Query, key and value projections ``nn.Linear(d_in, d_out)``, made in that order."""
    query, key, value = (nn.Linear(d_in, d_out, bias=bias) for _ in range(3))
    return query, key, value


def scaled_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    hidden: torch.Tensor | None = None,
    dropout: nn.Module | None = None,
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_k)) V over the last two dimensions.

    ``hidden`` (True where a query may not look) sets those scores to -inf before
    the softmax; ``dropout`` is applied to the weights. (..., T_q, d_k) queries and
    (..., T_k, d_k) keys with (..., T_k, d_v) values give (..., T_q, d_v).
    """
    scores = queries @ keys.transpose(-2, -1) / math.sqrt(keys.shape[-1])  # (..., T_q, T_k)
    if hidden is not None:
        scores = scores.masked_fill(hidden, float("-inf"))
    weights = torch.softmax(scores, dim=-1)  # each row sums to 1
    if dropout is not None:
        weights = dropout(weights)
    return weights @ values


class SelfAttentionV1(nn.Module):
    """Scaled dot-product self-attention with raw (d_in, d_out) weight matrices."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        # uniform in [0, 1), drawn for the query, key and value in that order
        self.W_query, self.W_key, self.W_value = (nn.Parameter(torch.rand(d_in, d_out)) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (T, d_in) -> (T, d_out)
        return scaled_attention(x @ self.W_query, x @ self.W_key, x @ self.W_value)


class SelfAttentionV2(nn.Module):
    """The same computation with ``nn.Linear`` projections (better initialisation)."""

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False):
        super().__init__()
        self.W_query, self.W_key, self.W_value = qkv_layers(d_in, d_out, qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., T, d_in) -> (..., T, d_out)
        return scaled_attention(self.W_query(x), self.W_key(x), self.W_value(x))


class CausalAttention(nn.Module):
    """Single-head attention where each token sees only itself and earlier tokens."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, qkv_bias: bool = False):
        super().__init__()
        self.W_query, self.W_key, self.W_value = qkv_layers(d_in, d_out, qkv_bias)
        self.dropout = nn.Dropout(dropout)
        self.context_length = context_length  # the longest input accepted

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, d_in) -> (B, T, d_out)
        num_tokens = x.shape[-2]
        if num_tokens > self.context_length:
            raise ValueError(
                f"CausalAttention got {num_tokens} tokens but was built for "
                f"context_length={self.context_length}; feed at most that many."
            )
        future = causal_mask(num_tokens, num_tokens, x.device)  # (T, T), True above the diagonal
        return scaled_attention(self.W_query(x), self.W_key(x), self.W_value(x), future, self.dropout)


class MultiHeadAttentionWrapper(nn.Module):
    """``num_heads`` independent causal heads whose outputs are concatenated."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be at least 1, got {num_heads}.")
        make_head = partial(CausalAttention, d_in, d_out, context_length, dropout, qkv_bias=qkv_bias)
        self.heads = nn.ModuleList(make_head() for _ in range(num_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d_in) -> (B, T, num_heads * d_out)
        return torch.cat([head(x) for head in self.heads], dim=-1)


class MultiHeadAttention(nn.Module):
    """Causal multi-head attention with split weights, as used in the GPT model.

    One (d_in, d_out) projection each for queries, keys and values, viewed as
    ``num_heads`` heads of size ``d_out // num_heads``; the heads' outputs are
    concatenated and mixed by ``out_proj``.

    ``use_sdpa=True`` (default) uses ``F.scaled_dot_product_attention``; ``False`` runs
    the explicit masked softmax the chapter derives. In eval mode, or with dropout 0,
    the two give the same numbers (to float rounding). In training with dropout they
    drop attention weights at the same rate but draw different random masks, so only
    their distributions agree. ``self.dropout`` is the one dropout setting for both
    paths: changing ``self.dropout.p`` changes both.

    Inputs (plus any cached tokens) may be at most ``context_length`` tokens long.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
        use_sdpa: bool = True,
    ):
        super().__init__()
        if num_heads < 1 or d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads}).")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.context_length = context_length  # the longest sequence (cache included) accepted
        self.use_sdpa = use_sdpa
        self.W_query, self.W_key, self.W_value = qkv_layers(d_in, d_out, qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)  # mixes the heads' outputs
        self.dropout = nn.Dropout(dropout)  # on the attention weights, in both paths

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        """x: (B, T, d_in) -> (B, T, d_out). With ``cache``, attend to cached keys too."""
        b, num_tokens, _ = x.shape
        total = num_tokens + (cache.length if cache is not None else 0)
        if total > self.context_length:
            raise ValueError(
                f"MultiHeadAttention got {total} tokens (cached ones included) but was built for "
                f"context_length={self.context_length}; feed at most that many."
            )
        queries = self._split_heads(self.W_query(x))  # (B, H, T, hd)
        keys = self._split_heads(self.W_key(x))
        values = self._split_heads(self.W_value(x))
        if cache is not None:
            keys, values = cache.append(keys, values)  # (B, H, past + T, hd)

        if self.use_sdpa:
            context = self._sdpa(queries, keys, values)
        else:
            hidden = causal_mask(num_tokens, keys.shape[2], x.device)
            context = scaled_attention(queries, keys, values, hidden, self.dropout)  # (B, H, T, hd)
        context = context.transpose(1, 2).reshape(b, num_tokens, self.d_out)  # heads side by side
        return self.out_proj(context)  # (B, T, d_out)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        num_queries, num_keys = q.shape[2], k.shape[2]
        dropout_p = self.dropout.p if self.training else 0.0
        if num_queries == 1:
            # One new token may see every cached key: no mask at all. (is_causal=True
            # would align the mask top-left and hide all keys but the first.)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        if num_queries == num_keys:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        allowed = ~causal_mask(num_queries, num_keys, q.device)  # SDPA wants True = may attend
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
