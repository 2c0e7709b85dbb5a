"""Attention, from the simplest form to the one the GPT model uses.

The chapter-3 progression, each step a small change to the one before:

1. :func:`simple_self_attention` - no weights: scores are dot products of the inputs.
2. :class:`SelfAttentionV1` / :class:`SelfAttentionV2` - trainable query, key and
   value projections and scaling by sqrt(d_k) (raw parameters, then ``nn.Linear``).
3. :class:`CausalAttention` - a mask hides future tokens; dropout on the weights.
4. :class:`MultiHeadAttentionWrapper` - several causal heads side by side.
5. :class:`MultiHeadAttention` - the same with one set of projections split into
   heads, an output projection, and two interchangeable paths: the explicit
   softmax(QK^T / sqrt(d)) V that the chapter teaches, and PyTorch's fused
   ``scaled_dot_product_attention`` (the default), which gives the same result
   without storing the (T x T) weight matrix. It also reads and writes a KV cache.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # only for type hints; gpt.py owns the cache
    from .gpt import LayerKVCache


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
    KV cache (more keys than queries) the diagonal shifts to the right.
    """
    offset = num_keys - num_queries
    return torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).triu(diagonal=1 + offset)


class SelfAttentionV1(nn.Module):
    """Scaled dot-product self-attention with raw weight matrices."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (T, d_in)
        queries, keys, values = x @ self.W_query, x @ self.W_key, x @ self.W_value  # (T, d_out)
        scores = queries @ keys.T  # (T, T)
        weights = torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1)
        return weights @ values  # (T, d_out)


class SelfAttentionV2(nn.Module):
    """The same computation with ``nn.Linear`` projections (better initialisation)."""

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., T, d_in)
        queries, keys, values = self.W_query(x), self.W_key(x), self.W_value(x)
        scores = queries @ keys.transpose(-2, -1)  # (..., T, T)
        weights = torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1)
        return weights @ values  # (..., T, d_out)


class CausalAttention(nn.Module):
    """Single-head attention where each token sees only itself and earlier tokens."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, qkv_bias: bool = False):
        super().__init__()
        self.d_out = d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        # A buffer moves with the module (.to(device)) but is not trained.
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1).bool(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, d_in)
        num_tokens = x.shape[1]
        queries, keys, values = self.W_query(x), self.W_key(x), self.W_value(x)  # (B, T, d_out)
        scores = queries @ keys.transpose(1, 2)  # (B, T, T)
        scores = scores.masked_fill(self.mask[:num_tokens, :num_tokens], float("-inf"))
        weights = torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1)
        weights = self.dropout(weights)
        return weights @ values  # (B, T, d_out)


class MultiHeadAttentionWrapper(nn.Module):
    """``num_heads`` independent causal heads whose outputs are concatenated."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.heads = nn.ModuleList(
            CausalAttention(d_in, d_out, context_length, dropout, qkv_bias) for _ in range(num_heads)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d_in) -> (B, T, num_heads * d_out)
        return torch.cat([head(x) for head in self.heads], dim=-1)


class MultiHeadAttention(nn.Module):
    """Causal multi-head attention with split weights, as used in the GPT model.

    One (d_in, d_out) projection each for queries, keys and values, viewed as
    ``num_heads`` heads of size ``d_out // num_heads``; the heads' outputs are
    concatenated and mixed by ``out_proj``.

    ``use_sdpa=True`` (default) uses ``F.scaled_dot_product_attention``; ``False`` runs
    the explicit masked softmax the chapter derives. Both give the same numbers.
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
        if d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads}).")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.context_length = context_length
        self.dropout_p = dropout
        self.use_sdpa = use_sdpa
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        """x: (B, T, d_in) -> (B, T, d_out). With ``cache``, attend to cached keys too."""
        b, num_tokens, _ = x.shape
        queries = self._split_heads(self.W_query(x))  # (B, H, T, hd)
        keys = self._split_heads(self.W_key(x))
        values = self._split_heads(self.W_value(x))
        if cache is not None:
            keys, values = cache.append(keys, values)  # (B, H, T_past + T, hd)
        num_keys = keys.shape[2]

        if self.use_sdpa:
            context = self._sdpa(queries, keys, values)
        else:
            context = self._explicit(queries, keys, values)
        context = context.transpose(1, 2).reshape(b, num_tokens, self.d_out)  # (B, T, d_out)
        return self.out_proj(context)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        num_queries, num_keys = q.shape[2], k.shape[2]
        dropout_p = self.dropout_p if self.training else 0.0
        if num_queries == 1:
            # One new token may see every cached key: no mask at all. (is_causal=True
            # would align the mask top-left and hide all keys but the first.)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        if num_queries == num_keys:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        allowed = ~causal_mask(num_queries, num_keys, q.device)  # SDPA wants True = may attend
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = q @ k.transpose(2, 3)  # (B, H, T_q, T_k)
        mask = causal_mask(q.shape[2], k.shape[2], q.device)
        scores = scores.masked_fill(mask, float("-inf"))
        weights = torch.softmax(scores / math.sqrt(self.head_dim), dim=-1)
        weights = self.dropout(weights)
        return weights @ v  # (B, H, T_q, hd)
