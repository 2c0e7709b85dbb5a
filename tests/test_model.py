"""Attention classes, GPT building blocks, initialisation, the KV cache and generation.

References are written out in the tests (formulas, plain loops, float64 arithmetic,
transformers' own GELU), never the call the implementation makes. Tolerances: 1e-6
for single layers in float32, 1e-4 to 1e-5 for whole models.
"""
from __future__ import annotations

import math
import subprocess
import sys

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
from course_utils.generate import generate, next_token, text_to_token_ids, token_ids_to_text, window_start
from course_utils.gpt import (
    GELU,
    GPT2_SIZES,
    FeedForward,
    GPTConfig,
    GPTModel,
    LayerNorm,
    TransformerBlock,
    count_parameters,
    gelu_tanh,
    model_size_mb,
)
from course_utils.kv_cache import KVCache, LayerKVCache
from course_utils.tokenizers import gpt2_tokenizer

SENTENCE = "A lighthouse keeper counts the waves"  # 6 GPT-2 tokens

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


def test_seeded_construction_draws_query_key_value_in_order():
    """Chapter 3's printed numbers depend on it: one seed, then W_query, W_key, W_value."""
    torch.manual_seed(123)
    drawn = [torch.rand(3, 2) for _ in range(3)]
    torch.manual_seed(123)
    v1 = SelfAttentionV1(3, 2)
    for name, expected in zip(("W_query", "W_key", "W_value"), drawn):
        assert torch.equal(getattr(v1, name), expected), name

    torch.manual_seed(5)
    layers = [torch.nn.Linear(3, 2, bias=True) for _ in range(3)]
    for build in (lambda: SelfAttentionV2(3, 2, qkv_bias=True), lambda: CausalAttention(3, 2, 6, 0.0, qkv_bias=True)):
        torch.manual_seed(5)
        att = build()
        for name, layer in zip(("W_query", "W_key", "W_value"), layers):
            assert torch.equal(getattr(att, name).weight, layer.weight), name
            assert torch.equal(getattr(att, name).bias, layer.bias), name


def test_qkv_bias_switches_the_projection_biases():
    classes = {
        "SelfAttentionV2": lambda bias: SelfAttentionV2(4, 6, qkv_bias=bias),
        "CausalAttention": lambda bias: CausalAttention(4, 6, 8, 0.0, qkv_bias=bias),
        "MultiHeadAttention": lambda bias: MultiHeadAttention(4, 6, 8, 0.0, num_heads=2, qkv_bias=bias),
        "wrapper head": lambda bias: MultiHeadAttentionWrapper(4, 3, 8, 0.0, num_heads=2, qkv_bias=bias).heads[1],
    }
    for label, build in classes.items():
        for bias in (False, True):
            att = build(bias)
            for name in ("W_query", "W_key", "W_value"):
                assert (getattr(att, name).bias is not None) == bias, (label, name, bias)
    assert MultiHeadAttention(4, 6, 8, 0.0, num_heads=2).out_proj.bias is not None  # always, as in GPT-2


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
    assert not hasattr(att, "mask") and len(list(att.buffers())) == 0  # the mask is built per call


def test_causal_mask_with_offset():
    assert causal_mask(3, 3).tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    # two cached keys: the 3 queries are positions 2, 3, 4
    assert causal_mask(3, 5).tolist() == [
        [False, False, False, True, True],
        [False, False, False, False, True],
        [False, False, False, False, False],
    ]
    assert causal_mask(1, 4).tolist() == [[False] * 4]  # one new token sees every key
    assert causal_mask(2, 2).dtype == torch.bool
    assert causal_mask(0, 3).shape == (0, 3)
    with pytest.raises(ValueError, match="num_queries <= num_keys"):
        causal_mask(4, 3)


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


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_dropout_only_in_training(use_sdpa):
    att = MultiHeadAttention(16, 16, 8, dropout=0.5, num_heads=2, use_sdpa=use_sdpa)
    x = torch.randn(1, 8, 16)
    att.eval()
    assert torch.equal(att(x), att(x))
    att.train()
    assert not torch.allclose(att(x), att(x))


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_dropout_rate_has_one_source(use_sdpa):
    """``att.dropout.p`` is the rate of both paths: changing it takes effect on each."""
    att = MultiHeadAttention(16, 16, 8, dropout=0.5, num_heads=2, use_sdpa=use_sdpa)
    x = torch.randn(2, 8, 16)
    expected = att.eval()(x)
    att.train()
    att.dropout.p = 0.0
    assert torch.allclose(att(x), expected, atol=1e-6)  # no dropout left, though built with 0.5
    att.dropout.p = 0.9
    assert not torch.allclose(att(x), expected, atol=1e-3)
    assert not hasattr(att, "dropout_p")


def test_head_dim_must_divide():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(8, 10, 4, 0.0, num_heads=3)
    with pytest.raises(ValueError, match="num_heads"):
        MultiHeadAttentionWrapper(8, 4, 4, 0.0, num_heads=0)


@pytest.mark.parametrize(
    "build",
    [
        lambda: CausalAttention(4, 4, context_length=5, dropout=0.0),
        lambda: MultiHeadAttentionWrapper(4, 2, context_length=5, dropout=0.0, num_heads=2),
        lambda: MultiHeadAttention(4, 4, context_length=5, dropout=0.0, num_heads=2, use_sdpa=True),
        lambda: MultiHeadAttention(4, 4, context_length=5, dropout=0.0, num_heads=2, use_sdpa=False),
    ],
    ids=["causal", "wrapper", "mha-sdpa", "mha-explicit"],
)
def test_inputs_longer_than_context_length_are_refused(build):
    att = build()
    assert att(torch.randn(2, 5, 4)).shape[:2] == (2, 5)  # exactly context_length is fine
    with pytest.raises(ValueError, match="context_length=5"):
        att(torch.randn(2, 6, 4))


def test_multi_head_attention_counts_cached_tokens_against_context_length():
    att = MultiHeadAttention(4, 4, context_length=5, dropout=0.0, num_heads=2)
    cache = LayerKVCache(capacity=16)  # the cache has room; the module's context does not
    with torch.no_grad():
        att(torch.randn(1, 4, 4), cache=cache)
        with pytest.raises(ValueError, match="got 6 tokens"):
            att(torch.randn(1, 2, 4), cache=cache)


def test_attention_does_not_import_the_gpt_model():
    """Layering: attention (with its KV cache) sits below gpt; no import cycle."""
    code = "import sys, course_utils.attention, course_utils.kv_cache; print('course_utils.gpt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- KV cache --------------------------------------------------------------------


def test_cache_refuses_to_be_trained_through():
    model = GPTModel(GPTConfig.tiny())
    idx = torch.randint(0, 50257, (1, 5))
    with pytest.raises(RuntimeError, match="inference only"):
        model(idx, cache=model.new_cache())
    with torch.no_grad():
        assert model(idx, cache=model.new_cache()).shape == (1, 5, 50257)
    for p in model.parameters():
        p.requires_grad_(False)
    model(idx, cache=model.new_cache())  # nothing needs a gradient: allowed


def _kv(b=2, h=4, t=3, hd=8, dtype=torch.float32, device="cpu"):
    return torch.randn(b, h, t, hd, dtype=dtype, device=device), torch.randn(b, h, t, hd, dtype=dtype, device=device)


def test_cache_stores_appends_and_reuses_its_buffers():
    cache = LayerKVCache(capacity=8)
    k1, v1 = _kv(t=3)
    k2, v2 = _kv(t=2)
    cache.append(k1, v1)
    keys, values = cache.append(k2, v2)
    assert cache.length == 5 and keys.shape == (2, 4, 5, 8)
    assert torch.equal(keys, torch.cat([k1, k2], dim=2)) and torch.equal(values, torch.cat([v1, v2], dim=2))
    buffer = cache.keys.data_ptr()
    cache.reset()
    cache.append(*_kv(t=1))
    assert cache.keys.data_ptr() == buffer and cache.length == 1  # same shapes: no new allocation
    with pytest.raises(ValueError, match="capacity 8"):
        cache.append(*_kv(t=8))


@pytest.mark.parametrize(
    "other,named",
    [
        (dict(b=3), "batch 3"),
        (dict(h=2), "2 heads"),
        (dict(hd=16), "size 16"),
        (dict(dtype=torch.float64), "float64"),
        (dict(device="meta"), "meta"),
    ],
)
def test_cache_checks_every_dimension_on_reuse(other, named):
    cache = LayerKVCache(capacity=8)
    cache.append(*_kv())
    with pytest.raises(ValueError, match=named):
        cache.append(*_kv(**other))
    cache.reset()  # a new sequence may have other shapes: the buffers are replaced
    keys, _ = cache.append(*_kv(**other))
    assert keys.shape[2] == 3 and keys.dtype == other.get("dtype", torch.float32)


def test_cache_must_match_the_model():
    model = GPTModel(GPTConfig.tiny())
    with torch.no_grad(), pytest.raises(ValueError, match="new_cache"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=KVCache(n_layers=1, capacity=64))


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


def test_gelu_is_gpt2s_tanh_approximation():
    """Against the formula in float64 and against transformers' NewGELU (GPT-2's gelu_new)."""
    from transformers.activations import NewGELUActivation

    x64 = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    formula = 0.5 * x64 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64**3)))
    x = x64.float()
    for name, fn in [("GELU", GELU()), ("gelu_tanh", gelu_tanh)]:
        got = fn(x).double()
        assert torch.allclose(got, formula, rtol=1e-6, atol=1e-6), name
        assert torch.allclose(fn(x), NewGELUActivation()(x), rtol=1e-6, atol=1e-6), name
    exact = 0.5 * x64 * (1.0 + torch.erf(x64 / math.sqrt(2.0)))  # the erf GELU is NOT what GPT-2 uses
    assert (GELU()(x).double() - exact).abs().max() > 1e-4


def test_feed_forward_is_widen_gelu_project():
    cfg = GPTConfig.tiny(emb_dim=8)
    ff = FeedForward(cfg)
    first, last = ff.layers[0], ff.layers[-1]
    assert (first.in_features, first.out_features, last.in_features, last.out_features) == (8, 32, 32, 8)
    x = torch.randn(2, 3, 8)
    h = x @ first.weight.T + first.bias
    h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    assert torch.allclose(ff(x), h @ last.weight.T + last.bias, atol=1e-5)


def test_transformer_block_is_pre_layer_norm_with_shortcuts():
    block = TransformerBlock(GPTConfig.tiny(emb_dim=16, n_heads=2)).eval()
    with torch.no_grad():
        for ln in (block.norm1, block.norm2):
            ln.scale.uniform_(0.5, 1.5)
            ln.shift.normal_()
        x = torch.randn(2, 5, 16)
        h = x + block.att(block.norm1(x))
        expected = h + block.ff(block.norm2(h))
        assert torch.allclose(block(x), expected, atol=1e-6)


def _expected_parameters(vocab, ctx, d, layers, qkv_bias, tied):
    """Parameter count of GPT-2's layout, from its shapes."""
    attention = 3 * d * d + (3 * d if qkv_bias else 0) + d * d + d  # Q, K, V (+ biases), out_proj
    feed_forward = d * 4 * d + 4 * d + 4 * d * d + d
    block = attention + feed_forward + 2 * 2 * d  # two LayerNorms
    return vocab * d + ctx * d + layers * block + 2 * d + (0 if tied else vocab * d)


@pytest.mark.parametrize("size", list(GPT2_SIZES))
def test_presets_have_openais_shapes(size):
    cfg = GPTConfig.gpt2(size)
    expected = {"124M": (768, 12, 12), "355M": (1024, 24, 16), "774M": (1280, 36, 20), "1558M": (1600, 48, 25)}[size]
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads) == expected
    assert cfg.emb_dim // cfg.n_heads == 64
    assert (cfg.vocab_size, cfg.context_length, cfg.drop_rate, cfg.qkv_bias, cfg.tie_weights, cfg.use_sdpa) == (
        50257, 1024, 0.1, False, False, True)
    for tied in (False, True):
        with torch.device("meta"):  # shapes only: no memory, no time
            model = GPTModel(cfg.replace(tie_weights=tied))
        assert count_parameters(model) == _expected_parameters(50257, 1024, *expected[:2], False, tied)


def test_parameter_counts_of_published_sizes():
    with torch.device("meta"):
        untied = GPTModel(GPTConfig.gpt2("124M"))
        tied = GPTModel(GPTConfig.gpt2("124M", qkv_bias=True, tie_weights=True))
    assert count_parameters(untied) == 163_009_536
    assert tied.out_head.weight is tied.tok_emb.weight
    assert count_parameters(tied) == 124_439_808  # GPT-2 small as published
    assert model_size_mb(tied, torch.float32) == pytest.approx(124_439_808 * 4 / 1024**2)
    assert model_size_mb(tied, torch.bfloat16) == pytest.approx(124_439_808 * 2 / 1024**2)


def test_count_parameters_trainable_only():
    model = GPTModel(GPTConfig.tiny(tie_weights=True))
    total = count_parameters(model)
    assert count_parameters(model, trainable_only=True) == total
    model.tok_emb.weight.requires_grad_(False)  # also the tied head
    assert count_parameters(model, trainable_only=True) == total - 50257 * 64
    assert count_parameters(model) == total


def test_model_size_mb_counts_buffers_and_each_tensors_dtype():
    net = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.BatchNorm1d(10))  # 130 parameters, 21 buffer elements
    floats = 110 + 20 + 20  # Linear, BatchNorm's scale/shift, its running stats; its step counter is an int64
    assert model_size_mb(net) == pytest.approx((floats * 4 + 8) / 1024**2)
    assert model_size_mb(net, torch.float16) == pytest.approx((floats + 1) * 2 / 1024**2)
    assert model_size_mb(net.to(torch.bfloat16)) == pytest.approx((floats * 2 + 8) / 1024**2)


def test_config_presets_and_replace():
    with pytest.raises(ValueError, match="124M"):
        GPTConfig.gpt2("7B")
    cfg = GPTConfig.gpt2("355M", context_length=256, qkv_bias=True)
    assert (cfg.emb_dim, cfg.context_length, cfg.qkv_bias) == (1024, 256, True)
    tiny = GPTConfig.tiny()
    assert (tiny.context_length, tiny.emb_dim, tiny.n_heads, tiny.n_layers, tiny.drop_rate) == (64, 64, 4, 2, 0.0)
    assert GPTConfig.tiny(n_layers=3).n_layers == 3
    assert tiny.replace(emb_dim=32).emb_dim == 32 and tiny.emb_dim == 64  # a copy


def test_forward_shapes_and_context_check():
    cfg = GPTConfig.tiny()
    model = GPTModel(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 10))
    assert model(idx).shape == (3, 10, cfg.vocab_size)
    last = model.eval()(idx, last_only=True)
    assert last.shape == (3, 1, cfg.vocab_size)
    assert torch.allclose(last, model(idx)[:, -1:], atol=1e-5)
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, cfg.context_length + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="unsqueeze"):
        model(torch.zeros(5, dtype=torch.long))


def test_explicit_and_sdpa_models_agree():
    cfg = GPTConfig.tiny(drop_rate=0.1)
    fast = GPTModel(cfg).eval()
    slow = GPTModel(cfg.replace(use_sdpa=False)).eval()
    slow.load_state_dict(fast.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    assert torch.allclose(fast(idx), slow(idx), atol=1e-4)


def test_embedding_dropout_is_applied():
    """With only drop_emb on, at p=1, the blocks see zeros: the logits cannot depend on the tokens."""
    model = GPTModel(GPTConfig.tiny(drop_rate=0.5)).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.drop_emb.p = 1.0
    a, b = torch.randint(0, 50257, (2, 1, 6))
    assert torch.allclose(model(a), model(b))
    model.eval()  # dropout off: the tokens matter again
    assert not torch.allclose(model(a), model(b))


def test_shortcut_dropout_is_applied_to_both_branches():
    """With only drop_shortcut on, at p=1, every block passes its input through unchanged."""
    model = GPTModel(GPTConfig.tiny(drop_rate=0.5)).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 1.0 if module in [b.drop_shortcut for b in model.trf_blocks] else 0.0
    idx = torch.randint(0, 50257, (2, 7))
    embedded = model.tok_emb(idx) + model.pos_emb(torch.arange(7))
    assert torch.allclose(model(idx), model.out_head(model.final_norm(embedded)), atol=1e-5)


# --- initialisation --------------------------------------------------------------

INIT_CFG = GPTConfig(context_length=32, emb_dim=256, n_heads=4, n_layers=4, drop_rate=0.0)


@pytest.mark.parametrize("tied", [False, True])
def test_fresh_model_loss_is_close_to_ln_vocab(tied):
    """An untrained model should be unsure: about uniform over the vocabulary."""
    torch.manual_seed(3)
    model = GPTModel(INIT_CFG.replace(tie_weights=tied)).eval()
    tokens = torch.randint(0, INIT_CFG.vocab_size, (4, 33), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()
    assert abs(loss - math.log(INIT_CFG.vocab_size)) < 0.1, f"initial loss {loss:.2f}"


def test_weights_are_initialised_as_gpt2():
    torch.manual_seed(3)
    model = GPTModel(INIT_CFG.replace(qkv_bias=True))
    residual = {id(layer.weight) for layer in model.residual_projections()}
    assert len(residual) == 2 * INIT_CFG.n_layers
    resid_std = 0.02 / math.sqrt(2 * INIT_CFG.n_layers)
    for block in model.trf_blocks:
        assert block.att.out_proj.weight.std().item() == pytest.approx(resid_std, rel=0.03)
        assert block.ff.layers[2].weight.std().item() == pytest.approx(resid_std, rel=0.03)
    for name, param in model.named_parameters():
        if name.endswith("bias") or name.endswith("shift"):
            assert torch.count_nonzero(param) == 0, name
        elif name.endswith("scale"):
            assert torch.equal(param, torch.ones_like(param)), name
        elif id(param) not in residual:  # every other matrix, both embeddings included
            assert param.mean().abs().item() < 2e-3, name
            assert param.std().item() == pytest.approx(0.02, rel=0.03), name
    torch.manual_seed(3)
    again = GPTModel(INIT_CFG.replace(qkv_bias=True))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))  # seeded


# --- KV cache and generation -----------------------------------------------------


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_cached_forward_equals_full_forward(use_sdpa):
    cfg = GPTConfig.tiny(use_sdpa=use_sdpa)
    model = GPTModel(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache()
        pieces = [model(idx[:, :5], cache=cache), model(idx[:, 5:9], cache=cache)]  # prompt, then a chunk
        pieces += [model(idx[:, t : t + 1], cache=cache) for t in range(9, 12)]  # then one at a time
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-4)
    assert cache.length == 12


def _sharp_model(cfg: GPTConfig, seed: int = 0) -> GPTModel:
    """A random model with large weights: its greedy continuations depend on the context
    (GPT-2's small init repeats one token), so a window or cache bug shows."""
    torch.manual_seed(seed)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _plain_greedy(model, idx, new, context_size):
    """The chapter's loop: every step reads the last context_size tokens."""
    with torch.no_grad():
        for _ in range(new):
            idx = torch.cat([idx, model(idx[:, -context_size:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def _record_fed(model):
    """Make ``model`` record how many tokens each forward call receives."""
    fed = []
    forward = model.forward

    def counting(idx, *args, **kwargs):
        fed.append(idx.shape[1])
        return forward(idx, *args, **kwargs)

    model.forward = counting
    return fed


def test_window_start_policy():
    assert [window_start(n, 0, 8, 2) for n in range(1, 9)] == [0] * 8  # fits: the whole sequence
    assert window_start(9, 0, 8, 2) == 2  # one token too many: move by a whole stride
    assert window_start(10, 2, 8, 2) == 2  # fits again
    assert window_start(12, 0, 8, 3) == 6  # four too many: two strides of 3
    assert [window_start(n, n - 9, 8, 1) for n in (9, 20, 100)] == [n - 8 for n in (9, 20, 100)]  # plain sliding


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        (dict(), [4, 1, 1, 1, 1] + [7, 1] * 6 + [7]),  # default stride 8 // 4 = 2
        (dict(window_stride=1), [4, 1, 1, 1, 1] + [8] * 13),  # the plain loop's cost, kept on request
        (dict(window_stride=4), [4, 1, 1, 1, 1] + [5, 1, 1, 1] * 3 + [5]),
        (dict(use_cache=False), [4, 5, 6, 7, 8] + [8] * 13),  # uncached default: the plain loop
        (dict(use_cache=False, window_stride=2), [4, 5, 6, 7, 8] + [7, 8] * 6 + [7]),
    ],
    ids=["cached-default", "cached-stride1", "cached-stride4", "uncached", "uncached-stride2"],
)
def test_tokens_fed_per_step(kwargs, expected):
    model = GPTModel(GPTConfig.tiny())
    fed = _record_fed(model)
    out = generate(model, torch.randint(0, 50257, (1, 4)), 18, context_size=8, **kwargs)
    assert out.shape == (1, 22)
    assert fed == expected


def test_a_long_prompt_starts_from_its_last_tokens():
    model = GPTModel(GPTConfig.tiny())
    fed = _record_fed(model)
    generate(model, torch.randint(0, 50257, (1, 11)), 4, context_size=8)
    assert fed == [8, 7, 1, 7]


SMALL_VOCAB = GPTConfig.tiny(vocab_size=512)  # for the generation loops: a small head keeps them fast


@pytest.mark.parametrize("context_size", [64, 16, 7])
def test_generation_identical_to_the_plain_loop_while_it_fits_and_with_stride_1(context_size):
    model = _sharp_model(SMALL_VOCAB)
    idx = torch.randint(0, 512, (2, 6))
    plain = _plain_greedy(model, idx, 40, context_size)
    assert torch.equal(generate(model, idx, 40, context_size, use_cache=False), plain)
    assert torch.equal(generate(model, idx, 40, context_size, window_stride=1), plain)
    fits = min(40, context_size - 6)  # new tokens that still fit in the window
    assert torch.equal(generate(model, idx, fits, context_size), plain[:, : 6 + fits])  # default stride
    assert len(set(plain[0, 6:].tolist())) > 5  # a varied continuation, not one token repeated


@pytest.mark.parametrize("stride", [2, 3, 5, 16])
def test_cached_and_uncached_agree_on_the_same_windows(stride):
    model = _sharp_model(SMALL_VOCAB, seed=1)
    idx = torch.randint(0, 512, (2, 5))
    cached = generate(model, idx, 45, 16, window_stride=stride)
    uncached = generate(model, idx, 45, 16, use_cache=False, window_stride=stride)
    assert torch.equal(cached, uncached)
    # the same windows by hand: [start, length) moves by whole strides once longer than 16
    seq, start = idx, 0
    with torch.no_grad():
        for _ in range(45):
            while seq.shape[1] - start > 16:
                start += stride
            seq = torch.cat([seq, model(seq[:, start:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq)


def test_greedy_generation_is_argmax_of_uncached_model():
    cfg = GPTConfig.tiny()
    model = GPTModel(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 4))
    assert torch.equal(generate(model, idx, 5, cfg.context_length), _plain_greedy(model, idx, 5, cfg.context_length))


def test_sampled_generation_cache_matches_with_same_seed():
    model = _sharp_model(SMALL_VOCAB)
    idx = torch.randint(0, 512, (2, 3))
    for new, stride in [(20, None), (90, 8)]:  # within the window, then past it with a shared stride
        kw = dict(temperature=1.3, top_k=50, window_stride=stride)
        a = generate(model, idx, new, 64, generator=torch.Generator().manual_seed(5), **kw)
        b = generate(model, idx, new, 64, use_cache=False, generator=torch.Generator().manual_seed(5), **kw)
        assert torch.equal(a, b)
    c = generate(model, idx, 20, 64, temperature=1.3, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(a[:, :23], c)  # another seed, other draws


def test_generated_ids_can_feed_a_training_step():
    model = GPTModel(GPTConfig.tiny())
    out = generate(model, torch.randint(0, 50257, (2, 3)), 5, 64)
    assert not out.is_inference() and not out.requires_grad
    loss = F.cross_entropy(model(out[:, :-1]).flatten(0, 1), out[:, 1:].flatten())
    loss.backward()  # would fail on inference tensors
    assert model.tok_emb.weight.grad is not None


def test_generate_runs_in_eval_mode_and_restores_every_module():
    model = GPTModel(GPTConfig.tiny(drop_rate=0.5)).train()
    model.trf_blocks[0].eval()  # e.g. a frozen part
    idx = torch.randint(0, 50257, (1, 3))
    first = generate(model, idx, 8, 64)
    assert torch.equal(first, generate(model, idx, 8, 64))  # no dropout while generating
    assert model.training and not model.trf_blocks[0].training and model.trf_blocks[1].training


class _Scripted(torch.nn.Module):
    """A stand-in model (no cache) that emits a fixed next token per row and step."""

    def __init__(self, script, prompt_length, vocab=10):
        super().__init__()
        self.script, self.prompt_length, self.vocab = script, prompt_length, vocab

    def forward(self, idx):
        step = idx.shape[1] - self.prompt_length
        logits = torch.zeros(idx.shape[0], idx.shape[1], self.vocab)
        for row, tokens in enumerate(self.script):
            logits[row, -1, tokens[step]] = 1.0
        return logits


def test_eos_stops_generation_and_pads_finished_rows():
    eos = 9
    prompt = torch.tensor([[1, 2], [3, 4]])
    model = _Scripted([[5, eos, 7, 8, 6], [5, 6, 7, eos, 6]], prompt_length=2)
    out = generate(model, prompt, 5, context_size=10, eos_id=eos)
    # row 0 ended at step 2 and is padded; row 1 ends at step 4, which is not appended
    assert out.tolist() == [[1, 2, 5, eos, eos], [3, 4, 5, 6, 7]]
    single = generate(_Scripted([[5, eos, 7]], prompt_length=2), prompt[:1], 3, 10, eos_id=eos)
    assert single.tolist() == [[1, 2, 5]]
    assert generate(model, prompt, 5, 10).shape == (2, 7)  # without eos_id: the full length


def test_generate_clamps_context_size_to_the_model():
    model = GPTModel(GPTConfig.tiny(context_length=16)).eval()
    idx = torch.randint(0, 50257, (1, 4))
    for use_cache in (False, True):
        kw = dict(use_cache=use_cache, window_stride=1)
        assert torch.equal(generate(model, idx, 20, 1000, **kw), generate(model, idx, 20, 16, **kw))


def test_generate_checks_its_arguments():
    model = GPTModel(GPTConfig.tiny())
    idx = torch.randint(0, 50257, (1, 3))
    with pytest.raises(ValueError, match="window_stride"):
        generate(model, idx, 2, 8, window_stride=9)
    with pytest.raises(ValueError, match="window_stride"):
        generate(model, idx, 2, 8, window_stride=0)
    with pytest.raises(ValueError, match="unsqueeze"):
        generate(model, idx[0], 2, 8)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, idx, -1, 8)
    assert torch.equal(generate(model, idx, 0, 8), idx)


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


# --- next_token ----------------------------------------------------------------


def _frequencies(logits, draws=4000, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    picks = next_token(logits.expand(draws, -1), generator=gen, **kwargs).flatten()
    return torch.bincount(picks, minlength=logits.shape[-1]).double() / draws


def test_greedy_and_top_k():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert next_token(logits).tolist() == [[1]]
    assert next_token(logits, temperature=-1.0).tolist() == [[1]]  # below 0 is greedy too
    assert next_token(torch.tensor([[1.0, 3.0], [4.0, 2.0]])).tolist() == [[1], [0]]  # per row
    freq = _frequencies(logits, temperature=1.0, top_k=2)
    assert set(freq.nonzero().flatten().tolist()) == {1, 2}  # only the two largest survive top-k
    assert freq[1].item() == pytest.approx(math.e / (math.e + 1), abs=0.03)  # renormalised over them
    assert torch.count_nonzero(_frequencies(logits, temperature=1.0, top_k=100)) == 4  # k above the vocab: all
    with pytest.raises(ValueError, match="top_k"):
        next_token(logits, top_k=0)


def test_top_k_keeps_ties_with_the_kth_largest():
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert set(_frequencies(logits, temperature=1.0, top_k=1).nonzero().flatten().tolist()) == {1, 2}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_logits(temperature):
    logits = torch.tensor([[0.0, math.log(3.0), math.log(6.0)]])
    expected = torch.tensor([1.0, 3.0, 6.0]) ** (1.0 / temperature)
    freq = _frequencies(logits, temperature=temperature)
    assert torch.allclose(freq, (expected / expected.sum()).double(), atol=0.03)


def test_top_p_keeps_the_smallest_sufficient_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert set(_frequencies(logits, temperature=1.0, top_p=0.7).nonzero().flatten().tolist()) == {0, 1}
    assert set(_frequencies(logits, temperature=1.0, top_p=0.4).nonzero().flatten().tolist()) == {0}
    # after the temperature: at 3 the probabilities flatten to about .34, .28, .22, .16
    assert set(_frequencies(logits, temperature=3.0, top_p=0.7).nonzero().flatten().tolist()) == {0, 1, 2}
    # with top_k as well, top_p works on what top_k left
    assert set(_frequencies(logits, temperature=1.0, top_k=2, top_p=0.99).nonzero().flatten().tolist()) == {0, 1}
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            next_token(logits, temperature=1.0, top_p=bad)
        with pytest.raises(ValueError, match="top_p"):
            next_token(logits, top_p=bad)


def test_seeded_generator_repeats_its_draws():
    logits = torch.zeros(1, 1000)
    a = [next_token(logits, 1.0, generator=g).item() for g in [torch.Generator().manual_seed(1)] * 20]
    b = [next_token(logits, 1.0, generator=g).item() for g in [torch.Generator().manual_seed(1)] * 20]
    assert a == b and len(set(a)) > 1


# --- text helpers ----------------------------------------------------------------


def test_text_id_helpers_round_trip():
    tok = gpt2_tokenizer()
    ids = text_to_token_ids(SENTENCE, tok)
    assert ids.shape == (1, 6) and ids.dtype == torch.long
    assert token_ids_to_text(ids, tok) == SENTENCE
    assert token_ids_to_text(ids[0], tok) == SENTENCE  # (T,) works too
    assert text_to_token_ids("end<|endoftext|>", tok)[0, -1].item() == 50256
