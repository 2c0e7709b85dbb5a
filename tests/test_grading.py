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
from course_utils.tokenizers import UNK, SimpleTokenizer
from grading_asserts import fails


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


@pytest.mark.filterwarnings("ignore:The use of `x.T`")
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


# --- chapter 2 ------------------------------------------------------------------------------


class RegexTokenizer:
    """Correct: a different split (findall) and decode written as a loop."""

    def __init__(self, vocab):
        self.vocab, self.inverse = vocab, {i: s for s, i in vocab.items()}

    def encode(self, text):
        pieces = [p for p in (q.strip() for q in re.split(r'([,.:;?_!"()\']|--|\s)', text)) if p]
        return [self.vocab.get(p, self.vocab[UNK]) for p in pieces]

    def decode(self, ids):
        out = ""
        for token in (self.inverse[i] for i in ids):
            out += token if (out == "" or re.fullmatch(r'[,.:;?_!"()\']', token)) else " " + token
        return out


class NoUnkTokenizer(RegexTokenizer):
    def encode(self, text):
        return [self.vocab[p] for p in (q.strip() for q in re.split(r'([,.:;?_!"()\']|--|\s)', text)) if p]


class NoStripTokenizer(RegexTokenizer):
    def encode(self, text):
        return [self.vocab.get(p, self.vocab[UNK]) for p in re.split(r'([,.:;?_!"()\']|--|\s)', text) if p]


class PlainJoinTokenizer(RegexTokenizer):
    def decode(self, ids):
        return " ".join(self.inverse[i] for i in ids)


def test_ch02_tokenizer():
    G.check_tokenizer(SimpleTokenizer)
    G.check_tokenizer(RegexTokenizer)
    G.check_tokenizer(RegexTokenizer, vocab_text="The cat sat. The dog ran!", texts=["the cat sat", "A bird? Yes."])
    fails(G.check_tokenizer, NoUnkTokenizer, words=["encode raised KeyError", UNK])
    fails(G.check_tokenizer, NoStripTokenizer, words=["wrong token ids", "whitespace"])
    fails(G.check_tokenizer, PlainJoinTokenizer, words=["decode", "spacing differs"])


def make_dataset(mistake=None):
    class Windows(torch.utils.data.Dataset):
        def __init__(self, text, tokenizer, max_length, stride):
            ids = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
            step = 1 if mistake == "stride" else stride
            stop = len(ids) - max_length + (1 if mistake == "count" else 0)
            self.pairs = []
            for s in range(0, stop, step):
                shift = 0 if mistake == "shift" else 1
                self.pairs.append((ids[s:s + max_length], ids[s + shift:s + shift + max_length]))

        def __len__(self):
            return len(self.pairs)

        def __getitem__(self, i):
            return tuple(torch.tensor(p) for p in self.pairs[i])

    return Windows


def test_ch02_sliding_window_dataset():
    for kw in ({}, {"max_length": 6, "stride": 2}, {"max_length": 3, "stride": 5}):
        G.check_sliding_window_dataset(SlidingWindowDataset, **kw)
        G.check_sliding_window_dataset(make_dataset(), **kw)
    fails(G.check_sliding_window_dataset, make_dataset("shift"), words=["target_ids", "not shifted", "equal the inputs"])
    fails(G.check_sliding_window_dataset, make_dataset("stride"), words=["wrong number of windows", "stride"])
    fails(G.check_sliding_window_dataset, make_dataset("count"), max_length=4, stride=1,
          words=["wrong number of windows", "no target"])


def test_ch02_embeddings():
    G.check_embeddings(lambda ids, tok, pos: tok(ids) + pos(torch.arange(ids.shape[1])))
    G.check_embeddings(lambda ids, tok, pos: tok.weight[ids] + pos.weight[: ids.shape[-1]], batch_size=3, num_tokens=8)
    fails(G.check_embeddings, lambda ids, tok, pos: tok(ids), words=["position embeddings were not added"])
    fails(G.check_embeddings, lambda ids, tok, pos: tok(ids) + pos(ids.clamp(max=7)), words=["by token id"])
    fails(G.check_embeddings, lambda ids, tok, pos: tok(ids) + pos(torch.arange(8)), words=["raised"])


# --- chapter 4 ------------------------------------------------------------------------------


def make_layer_norm(mistake=None):
    class LN(nn.Module):
        def __init__(self, emb_dim):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(emb_dim) if mistake == "init" else torch.ones(emb_dim))
            self.bias = nn.Parameter(torch.zeros(emb_dim))

        def forward(self, x):
            if mistake is None:
                return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, 1e-5)
            var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=1 if mistake == "unbiased" else 0)
            eps = 1e-6 if mistake == "eps" else 1e-5
            if mistake == "eps_outside":
                normed = (x - mean) / (var.sqrt() + eps)
            else:
                normed = (x - mean) / torch.sqrt(var + eps)
            return normed if mistake == "no_affine" else normed * self.weight + self.bias

    return LN


@pytest.mark.parametrize("mistake, words", [
    ("unbiased", ["unbiased"]),
    ("eps", ["eps is 1e-6"]),
    ("eps_outside", ["inside the square root"]),
    ("no_affine", ["scale and shift are not applied"]),
    ("init", ["freshly created", "mean 0 and variance 1"]),
])
def test_ch04_layer_norm_mistakes(mistake, words):
    fails(G.check_layer_norm, make_layer_norm(mistake), words=["LayerNorm", *words])


def test_ch04_layer_norm_reference_and_variants():
    for cls in (LayerNorm, make_layer_norm()):
        G.check_layer_norm(cls)
        G.check_layer_norm(cls, emb_dim=5, batch_size=3, seed=4, dtype=torch.float64)


def test_ch04_gelu():
    for impl in (GELU, gelu_tanh, lambda x: F.gelu(x, approximate="tanh")):
        G.check_gelu(impl)
        G.check_gelu(impl, batch_shape=(2, 3), dtype=torch.float64)
    fails(G.check_gelu, lambda x: F.gelu(x), words=["exact GELU", "tanh approximation"])
    fails(G.check_gelu, torch.relu, words=["ReLU"])
    fails(G.check_gelu, lambda x: x * torch.sigmoid(1.702 * x), words=["sigmoid approximation"])


def make_ff(mistake=None):
    class FF(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            width = cfg.emb_dim if mistake == "narrow" else 4 * cfg.emb_dim
            self.fc1, self.fc2 = nn.Linear(cfg.emb_dim, width), nn.Linear(width, cfg.emb_dim)

        def forward(self, x):
            h = self.fc1(x)
            h = {"relu": torch.relu, "erf": F.gelu}.get(mistake, lambda z: F.gelu(z, approximate="tanh"))(h)
            return self.fc2(h)

    return FF


def test_ch04_feed_forward():
    for cls in (FeedForward, make_ff()):
        G.check_feed_forward(cls)
        G.check_feed_forward(cls, cfg=G.grading_config(emb_dim=12), dtype=torch.float64)
    fails(G.check_feed_forward, make_ff("relu"), words=["ReLU"])
    fails(G.check_feed_forward, make_ff("erf"), words=["exact GELU"])
    fails(G.check_feed_forward, make_ff("narrow"), words=["cannot match", "4 * cfg.emb_dim"])


def make_block(mistake=None, names=("att", "ff", "norm1", "norm2")):
    class Block(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            mha = make_mha(fused=True)(cfg.emb_dim, cfg.emb_dim, cfg.context_length, cfg.drop_rate, cfg.n_heads, cfg.qkv_bias)
            parts = (mha, make_ff()(cfg), nn.LayerNorm(cfg.emb_dim, eps=1e-5), nn.LayerNorm(cfg.emb_dim, eps=1e-5))
            for name, part in zip(names, parts):
                setattr(self, name, part)
            self.names, self.p = names, cfg.drop_rate

        def forward(self, x):
            att, ff, n1, n2 = (getattr(self, n) for n in self.names)
            drop = lambda z: F.dropout(z, self.p, training=True if mistake == "dropout_in_eval" else self.training)  # noqa: E731
            if mistake == "no_shortcut":
                return ff(n2(att(n1(x))))
            if mistake == "post_norm":
                x = n1(x + att(x))
                return n2(x + ff(x))
            x = x + drop(att(n1(x)))
            return x + drop(ff(n2(x)))

    return Block


def test_ch04_transformer_block():
    for cls in (TransformerBlock, make_block(), make_block(names=("attn", "mlp", "ln_1", "ln_2"))):
        G.check_transformer_block(cls)
    G.check_transformer_block(make_block(), cfg=G.grading_config(emb_dim=24, n_heads=3, qkv_bias=True), batch_size=1,
                              dtype=torch.float64)
    fails(G.check_transformer_block, make_block("no_shortcut"), words=["TransformerBlock", "no shortcut"])
    fails(G.check_transformer_block, make_block("post_norm"), words=["post-norm"])
    fails(G.check_transformer_block, make_block("dropout_in_eval"), words=["eval mode", "different outputs"])


def make_gpt(mistake=None):
    class GPT(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
            self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
            self.drop_emb = nn.Dropout(cfg.drop_rate)
            self.trf_blocks = nn.ModuleList(make_block()(cfg) for _ in range(cfg.n_layers))
            self.final_norm = nn.LayerNorm(cfg.emb_dim)
            self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)

        def forward(self, idx):
            x = self.tok_emb(idx)
            if mistake != "no_pos":
                x = x + self.pos_emb.weight[: idx.shape[1]]
            x = self.drop_emb(x)
            for block in self.trf_blocks:
                x = block(x)
            return self.out_head(x if mistake == "no_final_norm" else self.final_norm(x))

    return GPT


def test_ch04_gpt_forward():
    for cls in (GPTModel, make_gpt()):
        G.check_gpt_forward(cls)
    G.check_gpt_forward(make_gpt(), cfg=G.grading_config(n_layers=1, qkv_bias=True), batch_size=1, dtype=torch.float64)
    fails(G.check_gpt_forward, make_gpt("no_pos"), words=["GPTModel", "position embeddings"])
    fails(G.check_gpt_forward, make_gpt("no_final_norm"), words=["final LayerNorm"])

    class Tied(GPTModel):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.out_head.weight = self.tok_emb.weight

    G.check_gpt_forward(Tied)  # a tied head has the same shape: its weight is copied to both


def greedy(mistake=None):
    def fn(model, idx, max_new_tokens, context_size):
        for _ in range(max_new_tokens):
            window = {"no_crop": idx, "first_tokens": idx[:, :context_size]}.get(mistake, idx[:, -context_size:])
            logits = model(window)[:, 0 if mistake == "first_position" else -1, :]
            if mistake == "sample":
                nxt = torch.multinomial(torch.softmax(logits, -1), 1)
            else:
                nxt = torch.topk(logits, 1, dim=-1).indices
            idx = torch.cat([idx, nxt], dim=1)
        return idx

    return fn


def test_ch04_greedy_generate():
    for fn in (greedy(), lambda m, i, n, c: generate(m, i, n, c, use_cache=True),
               lambda m, i, n, c: generate(m, i, n, c, use_cache=False)):
        G.check_greedy_generate(fn)
        G.check_greedy_generate(fn, batch_size=3, prompt_length=2, max_new_tokens=9, context_size=5, seed=3)
        G.check_greedy_generate(fn, max_new_tokens=0)
    fails(G.check_greedy_generate, greedy("first_position"), words=["FIRST position"])
    fails(G.check_greedy_generate, greedy("first_tokens"), words=["idx[:, -context_size:]"])
    fails(G.check_greedy_generate, greedy("no_crop"), prompt_length=10, max_new_tokens=6,
          context_size=12, words=["raised", "context_size"])
    fails(G.check_greedy_generate, greedy("sample"), words=["differ from greedy decoding"])


# --- chapter 7 ------------------------------------------------------------------------------


def collate(mistake=None):
    def fn(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None):
        width = max(len(b) for b in batch) + 1
        inputs, targets = [], []
        for ids in batch:
            padded = list(ids) + [pad_token_id] * (width - len(ids))
            x, y = padded[:-1], padded[1:]
            if mistake == "no_shift":
                y = padded[:-1]
            if mistake != "no_mask":
                first_pad = len(ids) - 1 + (1 if mistake == "no_shift" else 0)
                keep = first_pad + (0 if mistake == "mask_all" else 1)
                y = y[:keep] + [ignore_index] * (len(y) - keep)
            inputs.append(x[:allowed_max_length])
            targets.append(y[:allowed_max_length])
        return torch.tensor(inputs), torch.tensor(targets)

    return fn


def test_ch07_instruction_collate():
    for fn in (instruction_collate, collate()):
        G.check_instruction_collate(fn)
        G.check_instruction_collate(fn, lengths=(3, 7, 1, 7), allowed_max_length=5, seed=2)
    fails(G.check_instruction_collate, collate("no_mask"), words=["targets", "-100"])
    fails(G.check_instruction_collate, collate("no_shift"), words=["not shifted"])
    fails(G.check_instruction_collate, collate("mask_all"), words=["first padding token"])
