"""The grading helpers against the reference, correct variants, and deliberate mistakes.

Every check must (1) pass the course_utils reference, (2) pass implementations that
are correct but written differently (einsum, another mask, a fused qkv projection,
raw parameters, other attribute names), and (3) fail each deliberately broken
implementation with a message that names the problem: the tests assert on its key
words.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_utils import grading as G
from course_utils.attention import CausalAttention, MultiHeadAttention, SelfAttentionV2
from course_utils.data import SlidingWindowDataset
from course_utils.generate import generate
from course_utils.gpt import GELU, FeedForward, GPTModel, LayerNorm, TransformerBlock, gelu_tanh
from course_utils.instruct import instruction_collate
from course_utils.tokenizers import SPLIT_PATTERN, UNK, SimpleTokenizer


def fails(check, *args, words=(), **kwargs) -> str:
    """Run a check that must fail; assert its message contains every word (case-insensitive)."""
    with pytest.raises(AssertionError) as info:
        check(*args, **kwargs)
    message = str(info.value)
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in message:\n{message}"
    return message


# --- general helpers -----------------------------------------------------------------------


def test_check_tensor_close_reports_index_values_and_tolerance():
    expected = torch.zeros(2, 3)
    got = expected.clone()
    got[1, 2] = 0.5
    msg = fails(G.check_tensor_close, got, expected, name="thing", case="my input", words=["thing", "my input", "(1, 2)", "0.5", "atol="])
    assert "1 of 6 values differ" in msg
    G.check_tensor_close(expected + 1e-7, expected)


def test_check_tensor_close_shape_dtype_type_and_nan():
    fails(G.check_tensor_close, torch.zeros(3, 2), torch.zeros(2, 3), words=["shape", "(2, 3)", "(3, 2)", "another order"])
    fails(G.check_tensor_close, torch.zeros(2, dtype=torch.float64), torch.zeros(2), words=["dtype", "float64"])
    fails(G.check_tensor_close, [0.0, 0.0], torch.zeros(2), words=["torch.Tensor", "list"])
    fails(G.check_tensor_close, torch.tensor([float("nan"), 0.0]), torch.zeros(2), words=["NaN"])


def test_check_tensor_close_names_a_matching_diagnosis():
    expected = torch.ones(3)
    fails(G.check_tensor_close, torch.full((3,), 2.0), expected,
          diagnoses=[(torch.full((3,), 3.0), "wrong one"), (torch.full((3,), 2.0), "doubled it")], words=["doubled it"])


def test_check_function_wraps_student_exceptions():
    def broken(x):
        raise ValueError("boom")

    def stub(x):
        raise NotImplementedError()

    cases = [("a vector", (torch.ones(3),))]
    fails(G.check_function, broken, torch.neg, cases, words=["ValueError", "boom", "a vector"])
    fails(G.check_function, stub, torch.neg, cases, words=["not implemented yet"])


def test_check_function_does_not_let_in_place_changes_leak():
    def in_place(x):
        return x.mul_(2)

    G.check_function(in_place, lambda x: x * 2, [("x", (torch.ones(3),))])


def test_transfer_weights_rules():
    class Raw(nn.Module):  # bare (d_in, d_out) parameters used as x @ W
        def __init__(self):
            super().__init__()
            self.W_query = nn.Parameter(torch.randn(3, 2))
            self.W_key = nn.Parameter(torch.randn(3, 2))
            self.W_value = nn.Parameter(torch.randn(3, 2))

    ref = SelfAttentionV2(3, 2)
    pairs = G.transfer_weights(Raw(), ref)
    assert [r for _, r in pairs] == ["W_query.weight", "W_key.weight", "W_value.weight"]

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(3, 6, bias=True)

    ref = SelfAttentionV2(3, 2, qkv_bias=True)
    student = Fused()
    G.transfer_weights(student, ref)
    assert torch.equal(ref.W_key.weight, student.qkv.weight[2:4])
    assert torch.equal(ref.W_value.bias, student.qkv.bias[4:6])

    class Extra(nn.Module):
        def __init__(self):
            super().__init__()
            self.W_query = nn.Linear(3, 2, bias=True)
            self.W_key = nn.Linear(3, 2)
            self.W_value = nn.Linear(3, 2)

    fails(G.transfer_weights, Extra(), SelfAttentionV2(3, 2), words=["cannot match", "W_query.bias (2,)", "reference"])


# --- chapter 3 implementations -------------------------------------------------------------


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
            self.dropout = nn.Dropout(dropout)
            self.register_buffer("mask", torch.ones(context_length, context_length, dtype=torch.bool).triu(1))

        def forward(self, x):
            b, t, _ = x.shape
            if fused:
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


def test_ch03_functions_reference_and_variants():
    for kw in ({}, {"batch_shape": (2, 3), "num_queries": 3, "num_keys": 5, "dim": 4, "dtype": torch.float64}):
        G.check_attention_scores(lambda q, k: q @ k.transpose(-2, -1), **kw)
        G.check_attention_scores(lambda q, k: torch.einsum("...qd,...kd->...qk", q, k), **kw)
    for kw in ({}, {"batch_shape": (2,), "num_tokens": 3, "d_k": 7, "dtype": torch.float64}):
        G.check_attention_weights(lambda s, d: torch.softmax(s / d**0.5, dim=-1), **kw)
        G.check_attention_weights(lambda s, d: F.softmax(s * (1 / math.sqrt(d)), -1), **kw)
        G.check_attention_weights(  # softmax by hand, stabilised
            lambda s, d: (lambda z: z / z.sum(-1, keepdim=True))(torch.exp(s / d**0.5 - (s / d**0.5).amax(-1, keepdim=True))), **kw)
        G.check_context_vectors(lambda w, v: w @ v)
        G.check_context_vectors(lambda w, v: torch.einsum("...qk,...kd->...qd", w, v), batch_shape=(3,), dtype=torch.float64)


def test_ch03_functions_mistakes():
    fails(G.check_attention_scores, lambda q, k: k @ q.transpose(-2, -1), num_queries=3, num_keys=5,
          words=["wrong shape", "(3, 5)"])
    fails(G.check_attention_scores, lambda q, k: k @ q.transpose(-2, -1), words=["keys and queries swapped"])
    fails(G.check_attention_scores, lambda q, k: q @ k.T, batch_shape=(2,), words=["attention_scores"])
    fails(G.check_attention_weights, lambda s, d: torch.softmax(s, dim=-1), words=["not divided by sqrt(d_k)"])
    fails(G.check_attention_weights, lambda s, d: torch.softmax(s / d, dim=-1), words=["instead of sqrt(d_k)"])
    fails(G.check_attention_weights, lambda s, d: torch.softmax(s / d**0.5, dim=0), words=["dim=-2", "each ROW sums to 1"])
    fails(G.check_attention_weights, lambda s, d: torch.exp(s / d**0.5) / torch.exp(s / d**0.5).sum(-1, keepdim=True),
          words=["every score + 1000", "NaN"])
    fails(G.check_context_vectors, lambda w, v: w.T @ v, words=["transposed"])


def test_ch03_self_attention():
    for kw in ({}, {"batch_size": 3, "d_in": 5, "d_out": 4, "seed": 3}, {"dtype": torch.float64, "qkv_bias": True}):
        G.check_self_attention(SelfAttentionV2, **kw)
    G.check_self_attention(EinsumSelfAttention, batch_size=2, d_in=4, d_out=3)
    G.check_self_attention(EinsumSelfAttention, d_in=3, d_out=3)  # square: bare matrices are used as x @ W

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

    fails(G.check_self_attention, NoScale, words=["not divided by sqrt(d_k)", "SelfAttention"])
    fails(G.check_self_attention, Unbatched, batch_size=2, words=["raised", "(2, 6, 3)"])
    fails(G.check_self_attention, NoParams, words=["cannot match", "nn.Parameter"])


def test_ch03_causal_attention_reference_and_variants():
    for cls in (CausalAttention, make_causal()):
        G.check_causal_attention(cls)
        G.check_causal_attention(cls, d_in=5, d_out=4, batch_size=3, num_tokens=4, context_length=7, seed=11,
                                 qkv_bias=True, dtype=torch.float64)


@pytest.mark.parametrize("mistake, words", [
    ("no_mask", ["no causal mask"]),
    ("wrong_side", ["wrong side"]),
    ("zero_fill", ["instead of -inf"]),
    ("after_softmax", ["after the softmax"]),
    ("no_scale", ["sqrt(d_k)"]),
    ("dim", ["dim=-2"]),
    ("dropout_in_eval", ["eval mode", "different outputs", "training=self.training"]),
    ("no_dropout", ["train mode", "not random"]),
    ("full_mask", ["raised", "first T rows"]),
])
def test_ch03_causal_attention_mistakes(mistake, words):
    fails(G.check_causal_attention, make_causal(mistake), words=["CausalAttention", *words])


def test_ch03_multihead_attention_reference_and_variants():
    variants = [MultiHeadAttention, lambda *a, **k: MultiHeadAttention(*a, use_sdpa=False, **k), make_mha(), make_mha(fused=True)]
    for cls in variants:
        G.check_multihead_attention(cls)
    for cls in (MultiHeadAttention, make_mha(fused=True)):
        G.check_multihead_attention(cls, d_in=4, d_out=12, num_heads=3, batch_size=1, num_tokens=5, context_length=9,
                                    qkv_bias=True, seed=5, dtype=torch.float64)


@pytest.mark.parametrize("mistake, words", [
    ("split", ["view as (b, T, num_heads, head_dim)"]),
    ("scale_d_out", ["sqrt(head_dim)"]),
    ("no_out_proj", ["out_proj was not applied"]),
    ("no_out_proj_param", ["cannot match", "out_proj.weight (8, 8)"]),
    ("bias", ["cannot match", "W_query.bias (8,)"]),
])
def test_ch03_multihead_attention_mistakes(mistake, words):
    fails(G.check_multihead_attention, make_mha(mistake), words=["MultiHeadAttention", *words])
