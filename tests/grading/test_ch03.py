"""Assignment ch03's checks against the reference, correct variants, and deliberate mistakes.

The correct variants are written differently from the reference (einsum, another mask,
a fused qkv projection, raw parameters, other attribute names); the broken ones each
make one mistake, and the table says which words the failure message must contain.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_utils.attention import CausalAttention, MultiHeadAttention, SelfAttentionV2
from course_utils.grading import ch03

from .helpers import Cases, registry_tests, right, stub, wrong


class EinsumSelfAttention(nn.Module):
    """Correct: raw (d_in, d_out) parameters and einsum."""

    def __init__(self, d_in, d_out, qkv_bias=False):
        super().__init__()
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def forward(self, x):
        q = torch.einsum("...ti,io->...to", x, self.W_query)
        k = torch.einsum("...ti,io->...to", x, self.W_key)
        v = torch.einsum("...ti,io->...to", x, self.W_value)
        w = torch.softmax(torch.einsum("...qd,...kd->...qk", q, k) / math.sqrt(k.shape[-1]), dim=-1)
        return torch.einsum("...qk,...kd->...qd", w, v)


class NoScale(SelfAttentionV2):
    def forward(self, x):
        return torch.softmax(self.W_query(x) @ self.W_key(x).transpose(-2, -1), dim=-1) @ self.W_value(x)


class Unbatched(SelfAttentionV2):
    def forward(self, x):
        return torch.softmax(self.W_query(x) @ self.W_key(x).T / 2**0.5, dim=-1) @ self.W_value(x)


class NoParams(nn.Module):
    def __init__(self, d_in, d_out, qkv_bias=False):
        super().__init__()
        self.W_query = torch.rand(d_in, d_out)

    def forward(self, x):
        return x


def make_causal(mistake: str | None = None):
    class Causal(nn.Module):
        def __init__(self, d_in, d_out, context_length, dropout, qkv_bias=False):
            super().__init__()
            self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
            self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
            self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
            self.p = dropout
            self.register_buffer("allowed", torch.tril(torch.ones(context_length, context_length)))

        def forward(self, x):
            t = x.shape[1]
            q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)
            scores = q @ k.transpose(1, 2)
            allowed = self.allowed[:t, :t]
            if mistake == "wrong_side":
                allowed = allowed.T
            if mistake == "full_mask":
                allowed = self.allowed
            if mistake not in ("no_mask", "after_softmax"):
                fill = 0.0 if mistake == "zero_fill" else float("-inf")
                scores = torch.where(allowed == 0, torch.full_like(scores, fill), scores)
            scale = 1.0 if mistake == "no_scale" else math.sqrt(k.shape[-1])
            w = torch.softmax(scores / scale, dim=1 if mistake == "dim" else -1)
            if mistake == "after_softmax":
                w = w * allowed
            if mistake != "no_dropout":
                w = F.dropout(w, self.p, training=True if mistake == "dropout_in_eval" else self.training)
            return w @ v

    return Causal


def make_mha(mistake: str | None = None, fused: bool = False):
    class MHA(nn.Module):
        def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
            super().__init__()
            self.h, self.hd = num_heads, d_out // num_heads
            if fused:
                self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
            else:
                self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias or mistake == "bias")
                self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
                self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
            if mistake != "no_out_proj_param":
                self.out_proj = nn.Linear(d_out, d_out)
            self.dropout = nn.Dropout(0.0 if mistake == "no_dropout" else dropout)
            self.register_buffer("mask", torch.ones(context_length, context_length, dtype=torch.bool).triu(1))

        def forward(self, x):
            b, t, _ = x.shape
            if fused == "per_head":  # each head's q, k and v side by side
                q, k, v = self.qkv(x).unflatten(-1, (self.h, 3, self.hd)).unbind(-2)
                q, k, v = (z.flatten(-2) for z in (q, k, v))
            elif fused == "interleaved":  # q, k, v of each element side by side
                q, k, v = self.qkv(x).unflatten(-1, (self.h * self.hd, 3)).unbind(-1)
            elif fused:
                q, k, v = self.qkv(x).chunk(3, dim=-1)
            else:
                q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)
            if mistake == "split":
                q, k, v = (z.reshape(b, self.h, t, self.hd) for z in (q, k, v))
            else:
                q, k, v = (z.unflatten(-1, (self.h, self.hd)).permute(0, 2, 1, 3) for z in (q, k, v))
            scale = math.sqrt(self.h * self.hd) if mistake == "scale_d_out" else math.sqrt(self.hd)
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k).masked_fill(self.mask[:t, :t], float("-inf"))
            w = self.dropout(torch.softmax(scores / scale, dim=-1))
            ctx = (w @ v).permute(0, 2, 1, 3).flatten(2)
            if mistake in ("no_out_proj", "no_out_proj_param"):
                return ctx
            return self.out_proj(ctx)

    return MHA


def softmax_by_hand(s, d):
    """Correct: a softmax written out, stabilised by the row maximum."""
    z = torch.exp(s / d**0.5 - (s / d**0.5).amax(-1, keepdim=True))
    return z / z.sum(-1, keepdim=True)


SCORE_SIZES = {"default": {}, "batched_float64": {"batch_shape": (2, 3), "num_queries": 3, "num_keys": 5, "dim": 4, "dtype": torch.float64}}
WEIGHT_SIZES = {"default": {}, "batched_float64": {"batch_shape": (2,), "num_tokens": 3, "d_k": 7, "dtype": torch.float64}}
X_T = (pytest.mark.filterwarnings("ignore:The use of `x.T`"),)

CASES = {
    "check_attention_scores": Cases(
        right=[right(f"{name}-{label}", fn, **kw)
               for name, fn in (("matmul", lambda q, k: q @ k.transpose(-2, -1)), ("einsum", lambda q, k: torch.einsum("...qd,...kd->...qk", q, k)))
               for label, kw in SCORE_SIZES.items()],
        wrong=[wrong("swapped_shape", lambda q, k: k @ q.transpose(-2, -1), "wrong shape", "(3, 5)", num_queries=3, num_keys=5),
               wrong("swapped", lambda q, k: k @ q.transpose(-2, -1), "keys and queries swapped"),
               wrong("unbatched_T", lambda q, k: q @ k.T, "attention_scores", batch_shape=(2,), marks=X_T),
               wrong("stub", stub, "not implemented yet")],
    ),
    "check_attention_weights": Cases(
        right=[right(f"{name}-{label}", fn, **kw)
               for name, fn in (("softmax", lambda s, d: torch.softmax(s / d**0.5, dim=-1)),
                                ("F_softmax", lambda s, d: F.softmax(s * (1 / math.sqrt(d)), -1)), ("by_hand", softmax_by_hand))
               for label, kw in WEIGHT_SIZES.items()],
        wrong=[wrong("no_scale", lambda s, d: torch.softmax(s, dim=-1), "not divided by sqrt(d_k)"),
               wrong("divide_by_d", lambda s, d: torch.softmax(s / d, dim=-1), "instead of sqrt(d_k)"),
               wrong("dim0", lambda s, d: torch.softmax(s / d**0.5, dim=0), "dim=-2", "each ROW sums to 1"),
               wrong("overflow", lambda s, d: torch.exp(s / d**0.5) / torch.exp(s / d**0.5).sum(-1, keepdim=True), "every score + 1000", "NaN")],
    ),
    "check_context_vectors": Cases(
        right=[right("matmul", lambda w, v: w @ v),
               right("einsum_float64", lambda w, v: torch.einsum("...qk,...kd->...qd", w, v), batch_shape=(3,), dtype=torch.float64)],
        wrong=[wrong("transposed", lambda w, v: w.T @ v, "transposed", marks=X_T)],
    ),
    "check_self_attention": Cases(
        right=[right("reference", SelfAttentionV2),
               right("reference_batched", SelfAttentionV2, batch_size=3, d_in=5, d_out=4, seed=3),
               right("reference_float64_bias", SelfAttentionV2, dtype=torch.float64, qkv_bias=True),
               right("einsum_batched", EinsumSelfAttention, batch_size=2, d_in=4, d_out=3),
               right("einsum_square", EinsumSelfAttention, d_in=3, d_out=3)],  # square: bare matrices are used as x @ W
        wrong=[wrong("no_scale", NoScale, "not divided by sqrt(d_k)", "SelfAttention"),
               wrong("unbatched", Unbatched, "raised", "(2, 6, 3)", batch_size=2, marks=X_T),
               wrong("no_params", NoParams, "cannot match", "nn.Parameter")],
    ),
    "check_causal_attention": Cases(
        right=[right(f"{name}-{label}", cls, **kw) for name, cls in (("reference", CausalAttention), ("by_hand", make_causal()))
               for label, kw in (("default", {}), ("float64_bias", dict(d_in=5, d_out=4, batch_size=3, num_tokens=4, context_length=7,
                                                                        seed=11, qkv_bias=True, dtype=torch.float64)))],
        wrong=[wrong(mistake, make_causal(mistake), "CausalAttention", *words) for mistake, words in (
            ("no_mask", ["no causal mask"]),
            ("wrong_side", ["wrong side"]),
            ("zero_fill", ["instead of -inf"]),
            ("after_softmax", ["after the softmax"]),
            ("no_scale", ["sqrt(d_k)"]),
            ("dim", ["dim=-2"]),
            ("dropout_in_eval", ["eval mode", "different outputs", "training=self.training"]),
            ("no_dropout", ["train mode", "not random"]),
            ("full_mask", ["raised", "first T rows"]),
        )],
    ),
    "check_multihead_attention": Cases(
        right=[right("reference", MultiHeadAttention),
               right("reference_explicit", lambda *a, **k: MultiHeadAttention(*a, use_sdpa=False, **k)),
               right("by_hand", make_mha()), right("fused", make_mha(fused=True))]
        + [right(f"{name}-3_heads_float64", cls, d_in=4, d_out=12, num_heads=3, batch_size=1, num_tokens=5, context_length=9,
                 qkv_bias=True, seed=5, dtype=torch.float64)
           for name, cls in (("reference", MultiHeadAttention), ("fused", make_mha(fused=True)),
                             ("fused_per_head", make_mha(fused="per_head")), ("fused_interleaved", make_mha(fused="interleaved")))],
        wrong=[wrong(mistake, make_mha(mistake), "MultiHeadAttention", *words) for mistake, words in (
            ("split", ["view as (b, T, num_heads, head_dim)"]),
            ("scale_d_out", ["sqrt(head_dim)"]),
            ("no_out_proj", ["out_proj was not applied"]),
            ("no_out_proj_param", ["cannot match", "out_proj.weight (8, 8)"]),
            ("bias", ["cannot match", "W_query.bias (8,)"]),
            ("no_dropout", ["train mode", "not random"]),
        )],
    ),
}

test_correct_passes, test_mistake_fails, test_early_return_is_caught = registry_tests(ch03, CASES)
