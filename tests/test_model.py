"""Attention classes, GPT building blocks, the KV cache and generation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from course_utils.attention import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttentionV1,
    SelfAttentionV2,
    causal_mask,
    simple_self_attention,
)
from course_utils.generate import generate, next_token, text_to_token_ids, token_ids_to_text
from course_utils.gpt import (
    GELU,
    GPTConfig,
    GPTModel,
    LayerNorm,
    count_parameters,
    gelu_tanh,
    model_size_mb,
)
from course_utils.tokenizers import gpt2_tokenizer

# --- attention -------------------------------------------------------------------


def _reference_attention(x, wq, wk, wv, causal=True):
    """softmax(Q K^T / sqrt(d)) V written independently of the package."""
    q, k, v = x @ wq, x @ wk, x @ wv
    scores = q @ k.transpose(-2, -1) / math.sqrt(k.shape[-1])
    if causal:
        t = x.shape[-2]
        scores = scores + torch.full((t, t), float("-inf")).triu(1)
    return scores.softmax(-1) @ v


def test_simple_self_attention_rows_are_convex_combinations():
    x = torch.randn(6, 3)
    out = simple_self_attention(x)
    weights = (x @ x.T).softmax(-1)
    assert torch.allclose(out, weights @ x)
    assert torch.allclose(weights.sum(-1), torch.ones(6))


def test_self_attention_v1_and_v2_agree():
    x = torch.randn(6, 3)
    v2 = SelfAttentionV2(3, 2)
    v1 = SelfAttentionV1(3, 2)
    with torch.no_grad():
        v1.W_query.copy_(v2.W_query.weight.T)
        v1.W_key.copy_(v2.W_key.weight.T)
        v1.W_value.copy_(v2.W_value.weight.T)
    expected = _reference_attention(x, v1.W_query, v1.W_key, v1.W_value, causal=False)
    assert torch.allclose(v1(x), expected, atol=1e-6)
    assert torch.allclose(v2(x), expected, atol=1e-6)


def test_causal_attention_ignores_the_future():
    torch.manual_seed(1)
    att = CausalAttention(4, 3, context_length=8, dropout=0.0)
    x = torch.randn(2, 6, 4)
    out = att(x)
    expected = _reference_attention(x, att.W_query.weight.T, att.W_key.weight.T, att.W_value.weight.T)
    assert torch.allclose(out, expected, atol=1e-6)
    changed = x.clone()
    changed[:, 4:] += 10.0  # change only the last two tokens
    assert torch.allclose(att(changed)[:, :4], out[:, :4], atol=1e-6)


def test_causal_mask_with_offset():
    assert causal_mask(3, 3).tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    # two cached keys: the 3 queries are positions 2, 3, 4
    assert causal_mask(3, 5)[0].tolist() == [False, False, False, True, True]


def _copy_wrapper_into_mha(wrapper, mha):
    with torch.no_grad():
        for name in ("W_query", "W_key", "W_value"):
            getattr(mha, name).weight.copy_(torch.cat([getattr(h, name).weight for h in wrapper.heads], dim=0))
        mha.out_proj.weight.copy_(torch.eye(mha.d_out))
        mha.out_proj.bias.zero_()


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_multi_head_equals_wrapper_of_heads(use_sdpa):
    wrapper = MultiHeadAttentionWrapper(8, 4, context_length=10, dropout=0.0, num_heads=3)
    mha = MultiHeadAttention(8, 12, context_length=10, dropout=0.0, num_heads=3, use_sdpa=use_sdpa)
    _copy_wrapper_into_mha(wrapper, mha)
    x = torch.randn(2, 7, 8)
    assert torch.allclose(mha(x), wrapper(x), atol=1e-5)


def test_sdpa_path_equals_explicit_path():
    explicit = MultiHeadAttention(32, 32, 16, dropout=0.1, num_heads=4, qkv_bias=True, use_sdpa=False).eval()
    fast = MultiHeadAttention(32, 32, 16, dropout=0.1, num_heads=4, qkv_bias=True, use_sdpa=True).eval()
    fast.load_state_dict(explicit.state_dict())
    x = torch.randn(3, 16, 32)
    assert torch.allclose(fast(x), explicit(x), atol=1e-5)


def test_dropout_only_in_training():
    att = MultiHeadAttention(16, 16, 8, dropout=0.5, num_heads=2, use_sdpa=False)
    x = torch.randn(1, 8, 16)
    att.eval()
    assert torch.equal(att(x), att(x))
    att.train()
    assert not torch.allclose(att(x), att(x))


def test_head_dim_must_divide():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(8, 10, 4, 0.0, num_heads=3)


# --- building blocks -------------------------------------------------------------


def test_layer_norm_matches_formula_and_torch():
    ln = LayerNorm(5)
    with torch.no_grad():
        ln.scale.uniform_()
        ln.shift.uniform_()
    x = torch.randn(2, 3, 5) * 4 + 2
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * ln.scale + ln.shift
    assert torch.allclose(ln(x), expected, atol=1e-5)
    assert torch.allclose(ln(x), torch.nn.LayerNorm(5)(x) * ln.scale + ln.shift, atol=1e-5)


def test_gelu_tanh_formula_equals_fused():
    x = torch.linspace(-6, 6, 1001)
    assert torch.allclose(gelu_tanh(x), GELU()(x), atol=1e-6)
    assert torch.allclose(GELU()(x), F.gelu(x, approximate="tanh"))
    assert not torch.allclose(GELU()(x), F.relu(x), atol=1e-2)


@pytest.mark.parametrize(
    "size,expected",
    [("124M", 163_009_536), ("355M", 406_212_608)],
)
def test_parameter_counts_untied(size, expected):
    with torch.device("meta"):  # shapes only: no memory, no time
        model = GPTModel(GPTConfig.gpt2(size))
    assert count_parameters(model) == expected


def test_parameter_counts_tied_and_memory():
    with torch.device("meta"):
        tied = GPTModel(GPTConfig.gpt2("124M", qkv_bias=True, tie_weights=True))
    assert tied.out_head.weight is tied.tok_emb.weight
    assert count_parameters(tied) == 124_439_808  # GPT-2 small as published
    assert model_size_mb(tied, torch.float32) == pytest.approx(124_439_808 * 4 / 1024**2)
    assert model_size_mb(tied, torch.bfloat16) == pytest.approx(124_439_808 * 2 / 1024**2)


def test_unknown_preset():
    with pytest.raises(ValueError, match="124M"):
        GPTConfig.gpt2("7B")


def test_forward_shapes_and_context_check():
    cfg = GPTConfig.tiny()
    model = GPTModel(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 10))
    assert model(idx).shape == (3, 10, cfg.vocab_size)
    assert torch.allclose(model.eval()(idx, last_only=True), model(idx)[:, -1:], atol=1e-5)
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, cfg.context_length + 1, dtype=torch.long))


def test_explicit_and_sdpa_models_agree():
    cfg = GPTConfig.tiny(drop_rate=0.1)
    fast = GPTModel(cfg).eval()
    slow = GPTModel(cfg.replace(use_sdpa=False)).eval()
    slow.load_state_dict(fast.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    assert torch.allclose(fast(idx), slow(idx), atol=1e-4)


# --- KV cache and generation -----------------------------------------------------


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_cached_forward_equals_full_forward(use_sdpa):
    cfg = GPTConfig.tiny(use_sdpa=use_sdpa)
    model = GPTModel(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    full = model(idx)
    cache = model.new_cache()
    pieces = [model(idx[:, :5], cache=cache), model(idx[:, 5:9], cache=cache)]  # prompt, then a chunk
    pieces += [model(idx[:, t : t + 1], cache=cache) for t in range(9, 12)]  # then one at a time
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-4)
    assert cache.length == 12


@pytest.mark.parametrize("context_size", [64, 16, 7])
def test_generation_with_and_without_cache_identical(context_size):
    cfg = GPTConfig.tiny(context_length=64)
    model = GPTModel(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 6))
    cached = generate(model, idx, 40, context_size, use_cache=True)
    plain = generate(model, idx, 40, context_size, use_cache=False)
    assert cached.shape == (2, 46)
    assert torch.equal(cached, plain)
    assert torch.equal(cached[:, :6], idx)


def test_greedy_generation_is_argmax_of_uncached_model():
    cfg = GPTConfig.tiny()
    model = GPTModel(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 4))
    out = generate(model, idx, 5, cfg.context_length)
    seq = idx
    for _ in range(5):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_sampled_generation_cache_matches_with_same_seed():
    cfg = GPTConfig.tiny()
    model = GPTModel(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 3))
    a = generate(model, idx, 20, 64, temperature=1.3, top_k=50, generator=torch.Generator().manual_seed(5))
    b = generate(model, idx, 20, 64, temperature=1.3, top_k=50, use_cache=False, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_generate_restores_training_mode_and_stops_at_eos():
    cfg = GPTConfig.tiny()
    model = GPTModel(cfg).train()
    idx = torch.randint(0, cfg.vocab_size, (1, 3))
    first = generate(model, idx, 1, 64)[0, -1].item()
    assert model.training
    out = generate(model, idx, 10, 64, eos_id=first)
    assert torch.equal(out, idx)  # the eos itself is not appended


def test_top_k_and_temperature():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert next_token(logits).item() == 1
    draws = torch.cat([next_token(logits, temperature=1.0, top_k=2) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {1, 2}  # only the two largest survive top-k
    cold = torch.cat([next_token(logits, temperature=0.01) for _ in range(100)])
    assert set(cold.flatten().tolist()) == {1}  # near-zero temperature is almost greedy
    hot = torch.cat([next_token(logits, temperature=100.0) for _ in range(400)])
    assert set(hot.flatten().tolist()) == {0, 1, 2, 3}  # high temperature flattens


def test_top_p_keeps_the_smallest_sufficient_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = torch.cat([next_token(logits, temperature=1.0, top_p=0.7) for _ in range(400)])
    assert set(draws.flatten().tolist()) == {0, 1}


def test_text_id_helpers_round_trip():
    tok = gpt2_tokenizer()
    ids = text_to_token_ids("Every effort moves you", tok)
    assert ids.shape == (1, 4)
    assert token_ids_to_text(ids, tok) == "Every effort moves you"


def test_generate_runs_models_without_a_cache_uncached():
    class Plain(torch.nn.Module):  # e.g. a student's model: forward(idx) only
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, idx):
            return self.inner(idx)

    model = GPTModel(GPTConfig.tiny())
    idx = torch.randint(0, 50257, (1, 3))
    assert torch.equal(generate(Plain(model), idx, 6, 64), generate(model, idx, 6, 64))
