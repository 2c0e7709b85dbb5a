"""Checks of assignment ch03 (coding attention mechanisms).

The functions :func:`check_attention_scores`, :func:`check_attention_weights` and
:func:`check_context_vectors`; the modules :func:`check_self_attention`,
:func:`check_causal_attention` and :func:`check_multihead_attention`, compared with
:mod:`course_utils.attention` after weight transfer, then checked for causality and
dropout. ``_attention_variant`` computes the reference attention with one deliberate
mistake, so that a failure can name it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..attention import CausalAttention as _RefCausalAttention
from ..attention import MultiHeadAttention as _RefMultiHeadAttention
from ..attention import SelfAttentionV2 as _RefSelfAttention
from .core import _fmt_shape, _grades_on, check_function, seeded_randn
from .modules import _build, check_causal, check_dropout_behaviour, check_module_against_reference

__all__ = [
    "check_attention_scores",
    "check_attention_weights",
    "check_context_vectors",
    "check_self_attention",
    "check_causal_attention",
    "check_multihead_attention",
]


# --- scores, weights, context vectors -------------------------------------------------


def _batch_label(shape: Sequence[int]) -> str:
    return f"shape {_fmt_shape(shape)}"


def check_attention_scores(
    fn: Callable,
    *,
    batch_shape: Sequence[int] = (),
    num_queries: int = 4,
    num_keys: int = 4,
    dim: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Grade ``fn(queries, keys)``: the dot product of every query with every key.

    queries (..., T_q, d), keys (..., T_k, d) -> scores (..., T_q, T_k).
    """
    q = seeded_randn(*batch_shape, num_queries, dim, seed=seed, dtype=dtype)
    k = seeded_randn(*batch_shape, num_keys, dim, seed=seed + 1, dtype=dtype)
    case = f"queries {_batch_label(q.shape)}, keys {_batch_label(k.shape)}, {dtype}"
    check_function(
        fn, lambda a, b: a @ b.transpose(-2, -1), [(case, (q, k))], name="attention_scores",
        diagnoses=lambda a, b: [((b @ a.transpose(-2, -1)), "keys and queries swapped: scores[i, j] must be query i . key j."),
                                (a @ b.transpose(-2, -1) / math.sqrt(dim), "the scores were already scaled; scaling belongs in attention_weights.")],
        hint="entry [i, j] is the dot product of query i with key j; work on the last two dimensions (a matrix "
             "product with the keys' last two dimensions swapped) so that batch dimensions come along.",
    )


def _ref_attention_weights(scores: torch.Tensor, d_k: int) -> torch.Tensor:
    return torch.softmax(scores / d_k**0.5, dim=-1)


def check_attention_weights(
    fn: Callable,
    *,
    batch_shape: Sequence[int] = (),
    num_tokens: int = 5,
    d_k: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Grade ``fn(scores, d_k)``: softmax over the keys of ``scores / sqrt(d_k)``.

    scores (..., T_q, T_k) -> weights of the same shape, each row summing to 1. Also
    checks a row of large scores (softmax must not overflow) and rows holding -inf
    (masked keys get weight 0).
    """
    scores = seeded_randn(*batch_shape, num_tokens, num_tokens, seed=seed, dtype=dtype) * 3.0
    big = scores + 1000.0  # softmax is shift-invariant; exp() by hand overflows to inf (inf / inf = NaN)
    masked = scores.masked_fill(torch.ones(num_tokens, num_tokens, dtype=torch.bool).triu(1), float("-inf"))
    label = f"scores {_batch_label(scores.shape)}, d_k={d_k}, {dtype}"
    cases = [(label, (scores, d_k)), (f"{label}, every score + 1000", (big, d_k)),
             (f"{label}, -inf above the diagonal (masked)", (masked, d_k))]

    def diagnoses(s, d):
        return [
            (torch.softmax(s, dim=-1), "the scores were not divided by sqrt(d_k) before the softmax."),
            (torch.softmax(s / d, dim=-1), "the scores were divided by d_k instead of sqrt(d_k)."),
            (torch.softmax(s * d**0.5, dim=-1), "the scores were multiplied by sqrt(d_k) instead of divided."),
            (torch.softmax(s / d**0.5, dim=-2), "the softmax ran over the queries (dim=-2): it must run over the keys (dim=-1), so each ROW sums to 1."),
            (torch.softmax(s / d**0.5, dim=0) if s.dim() > 0 else s, "the softmax ran over dim=0: use dim=-1 (the keys)."),
            (s / d**0.5 / (s / d**0.5).sum(dim=-1, keepdim=True), "the scores were normalised by their sum instead of a softmax."),
        ]

    check_function(fn, _ref_attention_weights, cases, name="attention_weights", diagnoses=diagnoses,
                   hint="divide the scores by the square root of d_k, then take torch.softmax over the last dimension (the keys).")


def check_context_vectors(
    fn: Callable,
    *,
    batch_shape: Sequence[int] = (),
    num_tokens: int = 5,
    dim: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Grade ``fn(weights, values)``: each context vector is the weight-averaged values.

    weights (..., T_q, T_k), values (..., T_k, d) -> (..., T_q, d).
    """
    weights = torch.softmax(seeded_randn(*batch_shape, num_tokens, num_tokens, seed=seed, dtype=dtype), dim=-1)
    values = seeded_randn(*batch_shape, num_tokens, dim, seed=seed + 1, dtype=dtype)
    case = f"weights {_batch_label(weights.shape)}, values {_batch_label(values.shape)}, {dtype}"
    check_function(fn, lambda w, v: w @ v, [(case, (weights, values))], name="context_vectors",
                   diagnoses=lambda w, v: [(w.transpose(-2, -1) @ v, "the weights were transposed: row i of the weights belongs to query i.")],
                   hint="row i of the result is the sum of the value vectors weighted by row i of the weights (one matrix product).")


# --- attention modules ----------------------------------------------------------------


def _attention_variant(ref: nn.Module, x: torch.Tensor, *, num_heads: int = 1, causal: bool = True,
                       wrong_side: bool = False, scale: str = "sqrt", softmax_dim: int = -1,
                       mask_after_softmax: bool = False, zero_fill: bool = False, wrong_split: bool = False,
                       out_proj: bool = True) -> torch.Tensor:
    """The reference attention computed with one deliberate mistake (for diagnoses)."""
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(0)
    b, t, _ = x.shape
    q, k, v = ref.W_query(x), ref.W_key(x), ref.W_value(x)  # (B, T, d_out)
    d_out = q.shape[-1]
    hd = d_out // num_heads

    def split(z):
        if wrong_split:
            return z.reshape(b, num_heads, t, hd)
        return z.view(b, t, num_heads, hd).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)  # (B, H, T, hd)
    scores = q @ k.transpose(-2, -1)
    if scale == "sqrt":
        scores = scores / hd**0.5
    elif scale == "d":
        scores = scores / hd
    elif scale == "d_out":
        scores = scores / d_out**0.5
    upper = torch.ones(t, t, dtype=torch.bool).triu(1)
    hidden = upper.T if wrong_side else upper
    if causal and not mask_after_softmax:
        scores = scores.masked_fill(hidden, 0.0 if zero_fill else float("-inf"))
    weights = torch.softmax(scores, dim=softmax_dim)
    if causal and mask_after_softmax:
        weights = weights.masked_fill(hidden, 0.0)
    context = weights @ v  # (B, H, T, hd)
    context = context.transpose(1, 2).reshape(b, t, d_out)
    if out_proj and hasattr(ref, "out_proj"):
        context = ref.out_proj(context)
    return context.squeeze(0) if squeeze else context


def _attention_diagnoses(num_heads: int, causal: bool) -> Callable:
    def diagnoses(ref: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, str]]:
        out = []
        if causal:
            out += [
                (_attention_variant(ref, x, num_heads=num_heads, causal=False), "there is no causal mask: every token sees the tokens after it."),
                (_attention_variant(ref, x, num_heads=num_heads, wrong_side=True), "the mask is on the wrong side: mask ABOVE the diagonal (torch.triu(..., diagonal=1)), which hides later tokens."),
                (_attention_variant(ref, x, num_heads=num_heads, mask_after_softmax=True), "the mask was applied after the softmax, so the rows no longer sum to 1: fill with -inf before the softmax."),
                (_attention_variant(ref, x, num_heads=num_heads, zero_fill=True), "masked scores were set to 0 instead of -inf: exp(0) = 1 still gives them weight."),
            ]
        out += [
            (_attention_variant(ref, x, num_heads=num_heads, causal=causal, scale="none"), "the scores were not divided by sqrt(d_k) before the softmax."),
            (_attention_variant(ref, x, num_heads=num_heads, causal=causal, scale="d"), "the scores were divided by d_k instead of sqrt(d_k)."),
            (_attention_variant(ref, x, num_heads=num_heads, causal=causal, softmax_dim=-2), "the softmax ran over dim=-2 (the queries); it must run over the keys, dim=-1."),
        ]
        if num_heads > 1:
            out += [
                (_attention_variant(ref, x, num_heads=num_heads, causal=causal, scale="d_out"), "the scores were divided by sqrt(d_out); with heads, divide by sqrt(head_dim)."),
                (_attention_variant(ref, x, num_heads=num_heads, causal=causal, wrong_split=True), "the heads were split with view(b, num_heads, T, head_dim); view as (b, T, num_heads, head_dim), then transpose(1, 2)."),
                (_attention_variant(ref, x, num_heads=num_heads, causal=causal, out_proj=False), "out_proj was not applied to the concatenated heads."),
            ]
        return out
    return diagnoses


# the three steps of exercises 1-3, graded once there: the modules run on the reference steps
_ATTENTION_STEPS = {
    "attention_scores": lambda queries, keys: queries @ keys.transpose(-2, -1),
    "attention_weights": lambda scores, d_k: _ref_attention_weights(scores, d_k),
    "context_vectors": lambda weights, values: weights @ values,
}

_MASK_SLICE_HINT = ("if the error is about sizes: the input may be shorter than context_length, so use only the "
                    "first T rows and columns of the mask, T being the number of tokens of the input.")


@_grades_on(_ATTENTION_STEPS)
def check_self_attention(
    cls: Callable,
    *,
    d_in: int = 3,
    d_out: int = 2,
    num_tokens: int = 6,
    batch_size: int | None = None,
    qkv_bias: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Grade ``cls(d_in, d_out, qkv_bias=False)``: self-attention with trainable weights.

    Compared with the reference (``W_query``, ``W_key``, ``W_value`` as
    ``nn.Linear(d_in, d_out, bias=qkv_bias)``) on (T, d_in) inputs, or (B, T, d_in)
    with ``batch_size``. No mask, no dropout.
    """
    shape = (num_tokens, d_in) if batch_size is None else (batch_size, num_tokens, d_in)
    case = f"x of shape {_fmt_shape(shape)}, d_in={d_in}, d_out={d_out}, qkv_bias={qkv_bias}, {dtype}"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        student = _build(cls, (d_in, d_out), {"qkv_bias": qkv_bias}, "SelfAttention", case).to(dtype)
        reference = _RefSelfAttention(d_in, d_out, qkv_bias=qkv_bias).to(dtype)
    x = seeded_randn(*shape, seed=seed + 1, dtype=dtype)
    check_module_against_reference(
        student, reference, [(case, (x,))], name="SelfAttention", perturb_seed=seed,
        diagnoses=_attention_diagnoses(1, causal=False),
        hint="project x with W_query, W_key and W_value; scores of every query with every key, scaled by the "
             "square root of the key dimension, softmax over the keys; then the weighted sum of the values.",
    )


@_grades_on(_ATTENTION_STEPS)
def check_causal_attention(
    cls: Callable,
    *,
    d_in: int = 3,
    d_out: int = 2,
    context_length: int = 8,
    num_tokens: int = 6,
    batch_size: int = 2,
    dropout: float = 0.5,
    qkv_bias: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Grade ``cls(d_in, d_out, context_length, dropout, qkv_bias=False)`` on (B, T, d_in) inputs.

    Checks: eval mode deterministic; the same output as the reference in eval mode (T shorter than
    ``context_length``, and T equal to it); causality; eval mode deterministic and
    train mode random when ``dropout > 0``.
    """
    case = (f"x of shape ({batch_size}, T, {d_in}), d_out={d_out}, context_length={context_length}, "
            f"dropout={dropout}, qkv_bias={qkv_bias}, {dtype}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        args = (d_in, d_out, context_length, dropout)
        student = _build(cls, args, {"qkv_bias": qkv_bias}, "CausalAttention", case).to(dtype)
        reference = _RefCausalAttention(*args, qkv_bias=qkv_bias).to(dtype)
    xs = [seeded_randn(batch_size, t, d_in, seed=seed + 1 + t, dtype=dtype) for t in sorted({num_tokens, context_length})]
    check_module_against_reference(
        student, reference, [(case.replace("T,", f"{x.shape[1]},", 1), (x,)) for x in xs], name="CausalAttention",
        perturb_seed=seed, diagnoses=_attention_diagnoses(1, causal=True), call_hint=_MASK_SLICE_HINT,
        hint="set the scores above the diagonal to -inf before the softmax (a mask as large as the input, T by T), "
             "scale by the square root of the key dimension, apply dropout to the weights, then weight the values.",
    )
    student.eval()
    check_causal(student, xs[0], name="CausalAttention", case=case.replace("T,", f"{num_tokens},", 1))
    check_dropout_behaviour(student, lambda: (xs[0].clone(),), dropout=dropout, name="CausalAttention", case=case)


@_grades_on(_ATTENTION_STEPS)
def check_multihead_attention(
    cls: Callable,
    *,
    d_in: int = 6,
    d_out: int = 8,
    num_heads: int = 2,
    context_length: int = 8,
    num_tokens: int = 6,
    batch_size: int = 2,
    dropout: float = 0.5,
    qkv_bias: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Grade ``cls(d_in, d_out, context_length, dropout, num_heads, qkv_bias=False)``.

    The reference splits one (d_in, d_out) projection each for queries, keys and
    values into ``num_heads`` heads of ``d_out // num_heads`` and mixes the
    concatenated heads with ``out_proj = nn.Linear(d_out, d_out)``. A fused
    ``nn.Linear(d_in, 3 * d_out)`` for the three projections is accepted too.
    Checks as :func:`check_causal_attention`.
    """
    case = (f"x of shape ({batch_size}, T, {d_in}), d_out={d_out}, num_heads={num_heads}, "
            f"context_length={context_length}, dropout={dropout}, qkv_bias={qkv_bias}, {dtype}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        student = _build(cls, (d_in, d_out, context_length, dropout, num_heads), {"qkv_bias": qkv_bias},
                         "MultiHeadAttention", case).to(dtype)
        reference = _RefMultiHeadAttention(d_in, d_out, context_length, dropout, num_heads, qkv_bias=qkv_bias,
                                           use_sdpa=False).to(dtype)
    xs = [seeded_randn(batch_size, t, d_in, seed=seed + 1 + t, dtype=dtype) for t in sorted({num_tokens, context_length})]
    check_module_against_reference(
        student, reference, [(case.replace("T,", f"{x.shape[1]},", 1), (x,)) for x in xs], name="MultiHeadAttention",
        perturb_seed=seed, diagnoses=_attention_diagnoses(num_heads, causal=True), call_hint=_MASK_SLICE_HINT,
        transfer_hint="create W_query, W_key, W_value = nn.Linear(d_in, d_out, bias=qkv_bias) (or one "
                      "nn.Linear(d_in, 3 * d_out)) and out_proj = nn.Linear(d_out, d_out).",
        hint="split each projection into num_heads heads of head_dim (a view, then move the head dimension before "
             "the tokens); masked, scaled attention with dropout in every head at once; move the heads back, merge "
             "them into d_out, then out_proj.",
    )
    student.eval()
    check_causal(student, xs[0], name="MultiHeadAttention", case=case.replace("T,", f"{num_tokens},", 1))
    check_dropout_behaviour(student, lambda: (xs[0].clone(),), dropout=dropout, name="MultiHeadAttention", case=case)
