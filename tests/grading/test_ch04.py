"""Assignment ch04's checks against the reference, correct variants, and deliberate mistakes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from course_utils.generate import generate
from course_utils.gpt import GELU, FeedForward, GPTModel, LayerNorm, TransformerBlock, gelu_tanh
from course_utils.grading import ch04
from course_utils.grading.factories import grading_config

from .helpers import Cases, registry_tests, right, wrong
from .test_ch03 import make_mha


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


def make_block(mistake=None, names=("att", "ff", "norm1", "norm2")):
    class Block(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            p = 0.0 if mistake == "no_dropout" else cfg.drop_rate  # no_dropout: the rate is never used
            mha = make_mha(fused=True)(cfg.emb_dim, cfg.emb_dim, cfg.context_length, p, cfg.n_heads, cfg.qkv_bias)
            parts = (mha, make_ff()(cfg), nn.LayerNorm(cfg.emb_dim, eps=1e-5), nn.LayerNorm(cfg.emb_dim, eps=1e-5))
            for name, part in zip(names, parts):
                setattr(self, name, part)
            self.names, self.p = names, p

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


def make_gpt(mistake=None):
    class GPT(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
            self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
            self.drop_emb = nn.Dropout(0.0 if mistake == "no_dropout" else cfg.drop_rate)
            block = make_block("no_dropout" if mistake == "no_dropout" else None)
            self.trf_blocks = nn.ModuleList(block(cfg) for _ in range(cfg.n_layers))
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


class Tied(GPTModel):
    """Correct: a tied head has the same shape; its weight is copied to both."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.out_head.weight = self.tok_emb.weight


def greedy(mistake=None):
    @torch.no_grad()
    def fn(model, idx, max_new_tokens, context_size):
        for _ in range(max_new_tokens):
            window = {"no_crop": idx, "first_tokens": idx[:, :context_size]}.get(mistake, idx[:, -context_size:])
            logits = model(window)[:, 0 if mistake == "first_position" else -1, :]
            if mistake == "sample":
                nxt = torch.multinomial(torch.softmax(logits, -1), 1)
            else:
                nxt = torch.topk(logits, 1, dim=-1).indices
            idx = torch.cat([idx, nxt], dim=1)
        if mistake == "new_tokens_only":
            return idx[:, -max_new_tokens:]
        return idx

    return fn if mistake != "grad_on" else fn.__wrapped__


GREEDY_SETTINGS = {"default": {}, "cropped": dict(batch_size=3, prompt_length=2, max_new_tokens=9, context_size=5, seed=3),
                   "no_new_tokens": dict(max_new_tokens=0)}

CASES = {
    "check_layer_norm": Cases(
        right=[right(f"{name}-{label}", cls, **kw) for name, cls in (("reference", LayerNorm), ("F_layer_norm", make_layer_norm()))
               for label, kw in (("default", {}), ("float64", dict(emb_dim=5, batch_size=3, seed=4, dtype=torch.float64)))],
        wrong=[wrong(mistake, make_layer_norm(mistake), "LayerNorm", *words) for mistake, words in (
            ("unbiased", ["unbiased"]),
            ("eps", ["eps is 1e-6"]),
            ("eps_outside", ["inside the square root"]),
            ("no_affine", ["scale and shift are not applied"]),
            ("init", ["freshly created", "mean 0 and variance 1"]),
        )],
    ),
    "check_gelu": Cases(
        right=[right(f"{name}-{label}", impl, **kw)
               for name, impl in (("module", GELU), ("function", gelu_tanh), ("F_gelu_tanh", lambda x: F.gelu(x, approximate="tanh")))
               for label, kw in (("default", {}), ("batched_float64", dict(batch_shape=(2, 3), dtype=torch.float64)))],
        wrong=[wrong("erf", lambda x: F.gelu(x), "exact GELU", "tanh approximation"),
               wrong("relu", torch.relu, "ReLU"),
               wrong("sigmoid", lambda x: x * torch.sigmoid(1.702 * x), "sigmoid approximation")],
    ),
    "check_feed_forward": Cases(
        right=[right(f"{name}-{label}", cls, **kw) for name, cls in (("reference", FeedForward), ("by_hand", make_ff()))
               for label, kw in (("default", {}), ("float64", dict(cfg=grading_config(emb_dim=12), dtype=torch.float64)))],
        wrong=[wrong("relu", make_ff("relu"), "ReLU"),
               wrong("erf", make_ff("erf"), "exact GELU"),
               wrong("narrow", make_ff("narrow"), "cannot match", "4 * cfg.emb_dim")],
    ),
    "check_transformer_block": Cases(
        right=[right("reference", TransformerBlock), right("by_hand", make_block()),
               right("other_names", make_block(names=("attn", "mlp", "ln_1", "ln_2"))),
               right("float64", make_block(), cfg=grading_config(emb_dim=24, n_heads=3, qkv_bias=True), batch_size=1, dtype=torch.float64)],
        wrong=[wrong("no_shortcut", make_block("no_shortcut"), "TransformerBlock", "no shortcut"),
               wrong("post_norm", make_block("post_norm"), "post-norm"),
               wrong("dropout_in_eval", make_block("dropout_in_eval"), "eval mode", "different outputs"),
               wrong("no_dropout", make_block("no_dropout"), "train mode", "not random")],
    ),
    "check_gpt_forward": Cases(
        right=[right("reference", GPTModel), right("by_hand", make_gpt()), right("tied_head", Tied),
               right("float64", make_gpt(), cfg=grading_config(n_layers=1, qkv_bias=True), batch_size=1, dtype=torch.float64)],
        wrong=[wrong("no_pos", make_gpt("no_pos"), "GPTModel", "position embeddings"),
               wrong("no_final_norm", make_gpt("no_final_norm"), "final LayerNorm"),
               wrong("no_dropout", make_gpt("no_dropout"), "GPTModel", "train mode", "not random")],
    ),
    "check_greedy_generate": Cases(
        right=[right(f"{name}-{label}", fn, **kw)
               for name, fn in (("by_hand", greedy()), ("package_cached", lambda m, i, n, c: generate(m, i, n, c, use_cache=True, window_stride=1)),
                                ("package_uncached", lambda m, i, n, c: generate(m, i, n, c, use_cache=False)))
               for label, kw in GREEDY_SETTINGS.items()],
        wrong=[wrong("first_position", greedy("first_position"), "FIRST position"),
               wrong("first_tokens", greedy("first_tokens"), "idx[:, -context_size:]"),
               wrong("no_crop", greedy("no_crop"), "raised", "context_size", prompt_length=10, max_new_tokens=6, context_size=12),
               wrong("sample", greedy("sample"), "differ from greedy decoding"),
               wrong("new_tokens_only", greedy("new_tokens_only"), "wrong shape", "prompt followed by the new tokens"),
               wrong("grad_on", greedy("grad_on"), "gradients switched on", "torch.no_grad()")],
    ),
}

test_correct_passes, test_mistake_fails, test_early_return_is_caught = registry_tests(ch04, CASES)
