"""The GPT model: configuration, building blocks, and the model itself.

The pieces follow chapter 4: :class:`LayerNorm`, :class:`GELU`, :class:`FeedForward`,
a pre-LayerNorm :class:`TransformerBlock` with shortcut connections, and
:class:`GPTModel` (token + position embeddings, a stack of blocks, a final norm and a
linear head onto the vocabulary). A fresh model is initialised as GPT-2 was
(:meth:`GPTModel.reset_parameters`). The KV cache that lets generation compute each
token once lives in :mod:`course_utils.kv_cache`; ``GPTModel.new_cache()`` makes one.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiHeadAttention
from .kv_cache import KVCache, LayerKVCache

INIT_STD = 0.02  # GPT-2's standard deviation for every weight matrix and embedding

# emb_dim, n_layers, n_heads of OpenAI's four GPT-2 sizes
GPT2_SIZES: dict[str, dict[str, int]] = {
    "124M": {"emb_dim": 768, "n_layers": 12, "n_heads": 12},  # "gpt2"
    "355M": {"emb_dim": 1024, "n_layers": 24, "n_heads": 16},  # "gpt2-medium"
    "774M": {"emb_dim": 1280, "n_layers": 36, "n_heads": 20},  # "gpt2-large"
    "1558M": {"emb_dim": 1600, "n_layers": 48, "n_heads": 25},  # "gpt2-xl"
}


@dataclass
class GPTConfig:
    """Hyperparameters of a GPT model. The defaults are GPT-2 small (124M)."""

    vocab_size: int = 50257  # GPT-2's BPE vocabulary
    context_length: int = 1024  # longest sequence the position embedding covers
    emb_dim: int = 768  # width of every token's vector
    n_heads: int = 12  # attention heads per block (emb_dim must divide evenly)
    n_layers: int = 12  # transformer blocks
    drop_rate: float = 0.1  # dropout on embeddings, attention weights and shortcuts
    qkv_bias: bool = False  # bias in the query/key/value projections (OpenAI's weights have one)
    tie_weights: bool = False  # share the token embedding with the output head (as GPT-2 does)
    use_sdpa: bool = True  # fused attention kernel; False runs the explicit teaching path

    @classmethod
    def gpt2(cls, size: str = "124M", **overrides) -> "GPTConfig":
        """Preset for one of GPT-2's sizes: "124M", "355M", "774M" or "1558M"."""
        if size not in GPT2_SIZES:
            raise ValueError(f"Unknown GPT-2 size {size!r}; choose one of {list(GPT2_SIZES)}.")
        return cls(**{**GPT2_SIZES[size], **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "GPTConfig":
        """A few-hundred-thousand-parameter model (plus embeddings) for tests and quick mode."""
        fields = dict(context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0)
        return cls(**{**fields, **overrides})

    def replace(self, **changes) -> "GPTConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


class LayerNorm(nn.Module):
    """Normalise each token's vector to mean 0, variance 1, then scale and shift.

    Uses the biased variance (divide by n), as GPT-2 does. The explicit formula is
    ``(x - mean) / sqrt(var + eps) * scale + shift``; ``F.layer_norm`` computes the same
    in one fused kernel.
    """

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation written out, as in the chapter (GPT-2 uses it)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class GELU(nn.Module):
    """GELU activation (tanh approximation), computed by PyTorch's fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    """Position-wise MLP: widen to 4 x emb_dim, GELU, project back."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            GELU(),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, emb) -> (B, T, emb)
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attention(norm(x)), then x + feed_forward(norm(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg.emb_dim,
            d_out=cfg.emb_dim,
            context_length=cfg.context_length,
            dropout=cfg.drop_rate,
            num_heads=cfg.n_heads,
            qkv_bias=cfg.qkv_bias,
            use_sdpa=cfg.use_sdpa,
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache=cache))  # add the input back
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x  # (B, T, emb)


class GPTModel(nn.Module):
    """A GPT-2-style decoder-only language model.

    ``forward(idx)`` maps token ids (B, T) to next-token logits (B, T, vocab_size).
    A new model is initialised as GPT-2 was (see :meth:`reset_parameters`), so before
    any training its loss on random tokens is close to ln(vocab_size).
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight  # one (vocab, emb) matrix, used twice
        self.reset_parameters()

    def residual_projections(self) -> list[nn.Linear]:
        """The layers whose outputs are added to the residual stream: in every block,
        attention's ``out_proj`` and the feed-forward network's last Linear."""
        return [layer for block in self.trf_blocks for layer in (block.att.out_proj, block.ff.layers[-1])]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the weights as GPT-2 does.

        Every Linear weight and both embeddings are drawn from a normal distribution with
        mean 0 and standard deviation 0.02, biases are 0, LayerNorm scales 1 and shifts 0. The residual projections
        (:meth:`residual_projections`) get std 0.02 / sqrt(2 * n_layers): the residual
        stream is a sum of 2 * n_layers of their outputs, and the smaller std keeps its
        size at the start independent of the depth.

        PyTorch's defaults would be far off for a language model: ``nn.Embedding``
        draws from N(0, 1), and with a tied head each token's own logit then comes out
        hundreds of units above the rest (an initial loss of about 470 for GPT-2 small
        instead of about 11).
        """
        done: set[int] = set()  # a tied matrix is drawn once
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) not in done:
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
                done.add(id(module.weight))
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, LayerNorm):
                nn.init.ones_(module.scale)
                nn.init.zeros_(module.shift)
        residual_std = INIT_STD / math.sqrt(2 * self.cfg.n_layers)
        for layer in self.residual_projections():
            nn.init.normal_(layer.weight, mean=0.0, std=residual_std)

    def new_cache(self) -> KVCache:
        """An empty KV cache sized for this model's context length."""
        return KVCache(self.cfg.n_layers, self.cfg.context_length)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids ``idx`` (B, T).

        With ``cache``, ``idx`` continues the cached sequence (positions start after it),
        and the call must not need gradients (the cache is for inference; see
        :mod:`course_utils.kv_cache`). With ``last_only``, only the last position's
        logits are computed: (B, 1, vocab).
        """
        if idx.dim() != 2:
            raise ValueError(
                f"idx must be a (batch, tokens) tensor of token ids, got shape {tuple(idx.shape)}; "
                f"for a single sequence add the batch dimension with idx.unsqueeze(0)."
            )
        if cache is not None and len(cache.layers) != len(self.trf_blocks):
            raise ValueError(
                f"The cache has {len(cache.layers)} layers but the model {len(self.trf_blocks)} blocks; "
                f"make it with model.new_cache()."
            )
        num_tokens = idx.shape[1]
        start = cache.length if cache is not None else 0
        if start + num_tokens > self.cfg.context_length:
            raise ValueError(
                f"Sequence of {start + num_tokens} tokens is longer than the context length "
                f"{self.cfg.context_length}; feed at most the last {self.cfg.context_length} tokens."
            )
        positions = torch.arange(start, start + num_tokens, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(positions)  # (B, T, emb)
        x = self.drop_emb(x)
        layer_caches = cache.layers if cache is not None else [None] * len(self.trf_blocks)
        for block, layer_cache in zip(self.trf_blocks, layer_caches):
            x = block(x, cache=layer_cache)
        if last_only:
            x = x[:, -1:, :]
        x = self.final_norm(x)
        return self.out_head(x)  # (B, T, vocab)


def context_length_of(model: nn.Module) -> int | None:
    """The longest input ``model`` accepts: its config's ``context_length``, else the
    rows of its position embedding; None for a model that says neither."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "context_length", None) is not None:
        return int(cfg.context_length)
    pos_emb = getattr(model, "pos_emb", None)
    weight = getattr(pos_emb, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (a tied matrix counts once).

    ``trainable_only`` counts only those with ``requires_grad`` (e.g. after freezing).
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_size_mb(model: nn.Module, dtype: torch.dtype | None = None) -> float:
    """Memory for the parameters and buffers, in megabytes (1 MB = 1024**2 bytes).

    ``dtype`` asks "how big in this precision?" (e.g. ``torch.bfloat16``); by default
    each tensor's own dtype is used.
    """
    tensors = list(model.parameters()) + list(model.buffers())
    total = 0
    for t in tensors:
        itemsize = torch.empty((), dtype=dtype).element_size() if dtype else t.element_size()
        total += t.numel() * itemsize
    return total / 1024**2
