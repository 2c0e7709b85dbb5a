"""Checks of assignment ch04 (implementing a GPT model).

:func:`check_layer_norm`, :func:`check_gelu`, :func:`check_feed_forward`,
:func:`check_transformer_block`, :func:`check_gpt_forward` (compared with
:mod:`course_utils.gpt` after weight transfer, plus causality and dropout) and
:func:`check_greedy_generate`. The model checks build :func:`grading_config` (from
:mod:`course_utils.grading.factories`, importable from here too), which test cells
pass with other sizes in their hidden tests.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..generate import generate as _ref_generate
from ..gpt import FeedForward as _RefFeedForward
from ..gpt import GPTConfig
from ..gpt import GPTModel as _RefGPTModel
from ..gpt import LayerNorm as _RefLayerNorm
from ..gpt import TransformerBlock as _RefTransformerBlock
from ..gpt import GELU as _RefGELU
from ..gpt import gelu_tanh
from ..attention import MultiHeadAttention as _RefMultiHeadAttention
from .core import CheckFailed, Tolerance, _call, _swapped_names, _fmt_shape, _message, _seeded_ints, check_function, check_shape, check_tensor_close, seeded_randn
from .factories import grading_config
from .modules import _build, _check_left_alone, _inner_dropout_off, _use_reference_parts, _watching, check_causal, check_dropout_behaviour, check_module_against_reference
from .weights import perturb_parameters

__all__ = [
    "grading_config",
    "check_layer_norm",
    "check_gelu",
    "check_feed_forward",
    "check_transformer_block",
    "check_gpt_forward",
    "check_greedy_generate",
]


# --- LayerNorm, GELU, feed-forward ----------------------------------------------------


def _layer_norm_variants(ref: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, str]]:
    scale, shift = ref.scale, ref.shift
    mean = x.mean(dim=-1, keepdim=True)
    var_b = x.var(dim=-1, keepdim=True, unbiased=False)
    var_u = x.var(dim=-1, keepdim=True, unbiased=True)
    centred = x - mean
    return [
        (centred / torch.sqrt(var_u + 1e-5) * scale + shift, "the variance is the unbiased one (divides by n - 1); use var(..., unbiased=False) (divide by n)."),
        (centred / torch.sqrt(var_b) * scale + shift, "eps is missing: divide by sqrt(var + eps) with eps = 1e-5."),
        (centred / torch.sqrt(var_b + 1e-6) * scale + shift, "eps is 1e-6; the course (and GPT-2) use 1e-5."),
        (centred / torch.sqrt(var_b + 1e-12) * scale + shift, "eps is 1e-12; the course (and GPT-2) use 1e-5."),
        (centred / (torch.sqrt(var_b) + 1e-5) * scale + shift, "eps was added to the standard deviation; it belongs inside the square root: sqrt(var + eps)."),
        (centred / torch.sqrt(var_b + 1e-5), "scale and shift are not applied."),
        ((x - x.mean(dim=0, keepdim=True)) / torch.sqrt(x.var(dim=0, keepdim=True, unbiased=False) + 1e-5) * scale + shift,
         "the statistics were taken over dim=0; normalise over the last dimension (dim=-1, keepdim=True)."),
    ]


def check_layer_norm(
    cls: Callable,
    *,
    emb_dim: int = 8,
    batch_size: int = 2,
    num_tokens: int = 5,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Grade ``cls(emb_dim)``: LayerNorm over the last dimension, biased variance, eps=1e-5.

    A fresh module must normalise each row to mean 0 and variance 1 (scale starts at
    ones, shift at zeros); after noise is added to its parameters it must equal the
    reference, also on rows with a tiny variance, where eps matters.
    """
    case = f"x of shape ({batch_size}, {num_tokens}, {emb_dim}), {dtype}"
    student = _build(cls, (emb_dim,), {}, "LayerNorm", case).to(dtype)
    x = seeded_randn(batch_size, num_tokens, emb_dim, seed=seed, dtype=dtype) * 2.0 + 0.5
    tiny = x * 1e-3  # variance ~4e-6: eps = 1e-5 changes the result a lot here
    student.eval()
    fresh_ref = _RefLayerNorm(emb_dim).to(dtype)  # scale ones, shift zeros
    with torch.no_grad():
        fresh = _call(student, x.clone(), what="LayerNorm.forward", case=case)
        check_tensor_close(
            fresh, fresh_ref(x), name="LayerNorm, freshly created", case=case,
            diagnoses=lambda: _layer_norm_variants(fresh_ref, x) + [
                (torch.zeros_like(x), "scale starts at zeros; it must start at ones (and shift at zeros).")],
            hint="a fresh LayerNorm gives each row mean 0 and variance 1: scale starts at ones and shift at zeros, "
                 "and the statistics are taken over the last dimension.",
        )
    reference = _RefLayerNorm(emb_dim).to(dtype)
    check_module_against_reference(
        student, reference, [(case, (x,)), (f"{case}, values scaled by 1e-3 (eps matters)", (tiny,))],
        name="LayerNorm", perturb_seed=seed, diagnoses=_layer_norm_variants,
        transfer_hint="create exactly two parameters: scale (emb_dim,) and shift (emb_dim,).",
        hint="mean and biased variance over the last dimension (keep it for broadcasting); subtract the mean, divide "
             "by the square root of variance plus eps (1e-5), then multiply by scale and add shift.",
    )


def check_gelu(
    cls_or_fn: Callable,
    *,
    low: float = -6.0,
    high: float = 6.0,
    steps: int = 241,
    batch_shape: Sequence[int] = (),
    dtype: torch.dtype = torch.float32,
) -> None:
    """Grade GELU's tanh approximation, given as a module class ``cls()`` or a function.

    Compared on ``steps`` points from ``low`` to ``high`` with a tolerance
    (1e-5 + 1e-5 * |y| in float32) that the exact erf GELU (up to 4.7e-4 away, near
    |x| = 2.7) and ReLU fail.
    """
    x = torch.linspace(low, high, steps, dtype=torch.float64).to(dtype)
    if batch_shape:
        x = x.expand(*batch_shape, steps).clone()
    case = f"{steps} points from {low} to {high}, shape {_fmt_shape(x.shape)}, {dtype}"
    fn = cls_or_fn
    if isinstance(cls_or_fn, type):
        fn = _build(cls_or_fn, (), {}, "GELU", case)
    tol = Tolerance(1e-5, 1e-5) if dtype != torch.float64 else Tolerance(1e-10, 1e-10)

    def diagnoses(z):
        return [
            (F.gelu(z), "this is the exact GELU, x * Phi(x) with erf; the course uses the tanh approximation."),
            (torch.relu(z), "this is ReLU; GELU is smooth and slightly negative for negative x."),
            (z * torch.sigmoid(1.702 * z), "this is the sigmoid approximation x * sigmoid(1.702 x); use the tanh one."),
            (0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**2))), "the cubic term is squared: use x**3 (0.044715 * x**3)."),
            (0.5 * z * (1 + torch.tanh(math.sqrt(2 * math.pi) * (z + 0.044715 * z**3))), "sqrt(2 * pi) where it should be sqrt(2 / pi)."),
        ]

    with torch.no_grad():
        check_function(fn, gelu_tanh, [(case, (x,))], name="GELU", tol=tol, diagnoses=diagnoses,
                       hint="use the tanh formula of the exercise text, term by term (the constant inside is the square root of 2 / pi).")


def _ff_variants(ref: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, str]]:
    first, last = ref.layers[0], ref.layers[2]
    return [
        (last(torch.relu(first(x))), "the activation is ReLU; use GELU (tanh approximation)."),
        (last(F.gelu(first(x))), "the activation is the exact GELU; use the tanh approximation."),
        (last(first(x)), "there is no activation between the two Linear layers."),
    ]


def check_feed_forward(cls: Callable, *, cfg: GPTConfig | None = None, batch_size: int = 2, num_tokens: int = 5,
                       seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
    """Grade ``cls(cfg)``: Linear(emb, 4 emb) -> GELU (tanh) -> Linear(4 emb, emb)."""
    cfg = cfg or grading_config()
    case = f"x of shape ({batch_size}, {num_tokens}, {cfg.emb_dim}), emb_dim={cfg.emb_dim}, {dtype}"
    with _swapped_names(cls, _REFERENCE_PARTS), torch.random.fork_rng():
        torch.manual_seed(seed)
        student = _build(cls, (cfg,), {}, "FeedForward", case)
        # graded on the reference GELU: a GELU mistake costs the GELU exercise only
        _use_reference_parts(student, {"gelu": _RefGELU}, match=_gelu_like)
        student = student.to(dtype)
        reference = _RefFeedForward(cfg).to(dtype)
        x = seeded_randn(batch_size, num_tokens, cfg.emb_dim, seed=seed + 1, dtype=dtype)
        check_module_against_reference(
            student, reference, [(case, (x,))], name="FeedForward", perturb_seed=seed, diagnoses=_ff_variants,
            transfer_hint="create nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim) and nn.Linear(4 * cfg.emb_dim, cfg.emb_dim), in that order.",
            hint="widen each vector to four times emb_dim, apply the GELU (tanh approximation), project back to "
                 "emb_dim; the layers in one nn.Sequential named `layers`.",
        )


def _gelu_like(path: str, module: nn.Module) -> str | None:
    """A parameter-free module of the student's named like a GELU stands for the GELU exercise."""
    return "gelu" if "gelu" in type(module).__name__.lower() and not any(True for _ in module.parameters()) else None


# The reference parts a composite check grades on, by the names the notebook gives them.
_REFERENCE_PARTS = {"GELU": _RefGELU, "LayerNorm": _RefLayerNorm, "FeedForward": _RefFeedForward,
                    "MultiHeadAttention": _RefMultiHeadAttention, "TransformerBlock": _RefTransformerBlock}


# --- the transformer block and the model ----------------------------------------------


def _block_variants(ref: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, str]]:
    att, ff, n1, n2 = ref.att, ref.ff, ref.norm1, ref.norm2
    no_short = ff(n2(att(n1(x))))
    h = x + att(n1(x))
    post = n1(x + att(x))
    return [
        (no_short, "there are no shortcut connections: add the input back after attention and after the feed-forward (x = x + ...)."),
        (h + ff(n2(att(n1(x)))), "the second shortcut adds the wrong tensor: x = x + ff(norm2(x)) with x the output of the first step."),
        (h + ff(n2(h)) - x, "the first shortcut is missing."),
        (h + ff(n1(h)), "norm1 was used twice: the feed-forward step uses norm2."),
        (n2(post + ff(post)), "the LayerNorms come after the shortcuts (post-norm); GPT-2 normalises first: x + att(norm1(x))."),
        (h + ff(h), "the feed-forward input is not normalised: x + ff(norm2(x))."),
    ]


def check_transformer_block(cls: Callable, *, cfg: GPTConfig | None = None, batch_size: int = 2,
                            num_tokens: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
    """Grade ``cls(cfg)``: pre-LayerNorm block with two shortcut connections.

    The student's ``__init__`` creates ``att`` (multi-head attention), ``ff``
    (feed-forward), ``norm1``, ``norm2`` and ``drop_shortcut``. Checks: equal to the
    reference in eval mode, causal, dropout only in train mode.
    """
    cfg = cfg or grading_config()
    num_tokens = num_tokens or cfg.context_length - 2
    case = f"x of shape ({batch_size}, {num_tokens}, {cfg.emb_dim}), {cfg.n_heads} heads, drop_rate={cfg.drop_rate}, {dtype}"
    parts = {"att": lambda: _RefMultiHeadAttention(cfg.emb_dim, cfg.emb_dim, cfg.context_length, cfg.drop_rate, cfg.n_heads,
                                                   cfg.qkv_bias),
             "ff": lambda: _RefFeedForward(cfg), "norm1": lambda: _RefLayerNorm(cfg.emb_dim),
             "norm2": lambda: _RefLayerNorm(cfg.emb_dim)}
    with _swapped_names(cls, _REFERENCE_PARTS), torch.random.fork_rng():
        torch.manual_seed(seed)
        student = _build(cls, (cfg,), {}, "TransformerBlock", case)
        # graded on the reference attention, feed-forward and LayerNorms: only the wiring is this exercise's
        _use_reference_parts(student, parts)
        student = student.to(dtype)
        reference = _RefTransformerBlock(cfg).to(dtype)
        x = seeded_randn(batch_size, num_tokens, cfg.emb_dim, seed=seed + 1, dtype=dtype)
        check_module_against_reference(
            student, reference, [(case, (x,))], name="TransformerBlock", perturb_seed=seed, diagnoses=_block_variants,
            transfer_hint="create self.att (MultiHeadAttention), self.ff (FeedForward), self.norm1, self.norm2 "
                          "(LayerNorm) and self.drop_shortcut (nn.Dropout), with the names given.",
            hint="pre-norm: each of the two steps normalises its input first (norm1 before attention, norm2 before the "
                 "feed-forward), applies dropout to the step's output and adds the step's input back.",
        )
        student.eval()
        check_causal(student, x, name="TransformerBlock", case=case)
        with _inner_dropout_off(student):  # the block's own dropout: drop_shortcut
            check_dropout_behaviour(student, lambda: (x.clone(),), dropout=cfg.drop_rate, name="TransformerBlock",
                                    case=f"{case}; dropout inside att and ff switched off, to see drop_shortcut's")


def _gpt_variants(ref: nn.Module, idx: torch.Tensor) -> list[tuple[torch.Tensor, str]]:
    def run(pos: bool = True, final_norm: bool = True):
        h = ref.tok_emb(idx)
        if pos:
            h = h + ref.pos_emb(torch.arange(idx.shape[1]))
        for block in ref.trf_blocks:
            h = block(h)
        if final_norm:
            h = ref.final_norm(h)
        return ref.out_head(h)

    return [
        (run(pos=False), "the position embeddings are not added to the token embeddings."),
        (run(final_norm=False), "the final LayerNorm is not applied before out_head."),
    ]


def check_gpt_forward(cls: Callable, *, cfg: GPTConfig | None = None, batch_size: int = 2,
                      num_tokens: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
    """Grade ``cls(cfg)``: token ids (B, T) -> logits (B, T, vocab_size).

    The student's model creates ``tok_emb``, ``pos_emb``, ``drop_emb``, ``trf_blocks``
    (blocks in order), ``final_norm`` and ``out_head`` (no bias). Checks: equal
    logits to the reference in eval mode (for T < context_length and T =
    context_length), causality, dropout only in train mode.
    """
    cfg = cfg or grading_config()
    num_tokens = num_tokens or cfg.context_length // 2
    case = f"token ids of shape ({batch_size}, T), {cfg.n_layers} layers, emb_dim={cfg.emb_dim}, vocab_size={cfg.vocab_size}, {dtype}"
    parts = {"block": lambda: _RefTransformerBlock(cfg), "final_norm": lambda: _RefLayerNorm(cfg.emb_dim)}
    tol = Tolerance(1e-4, 1e-4) if dtype != torch.float64 else None
    with _swapped_names(cls, _REFERENCE_PARTS), torch.random.fork_rng():
        torch.manual_seed(seed)
        student = _build(cls, (cfg,), {}, "GPTModel", case)
        # graded on reference blocks and LayerNorm: embeddings, order, final norm and head are this exercise's
        _use_reference_parts(student, parts, match=lambda path, m: "block" if path.startswith("trf_blocks.")
                             and path.count(".") == 1 else None)
        student = student.to(dtype)
        reference = _RefGPTModel(cfg).to(dtype)
        ids = [_seeded_ints(cfg.vocab_size, batch_size, t, seed=seed + t) for t in sorted({num_tokens, cfg.context_length})]
        check_module_against_reference(
            student, reference, [(case.replace("T)", f"{i.shape[1]})", 1), (i,)) for i in ids], name="GPTModel",
            perturb_seed=seed, diagnoses=_gpt_variants, tol=tol,
            transfer_hint="create tok_emb, pos_emb (nn.Embedding), drop_emb, trf_blocks (n_layers blocks), final_norm "
                          "and out_head = nn.Linear(emb_dim, vocab_size, bias=False), with the names given.",
            hint="add the token embeddings and the embeddings of the positions 0..T-1, apply dropout, run the blocks in "
                 "order, then the final LayerNorm and the output head.",
        )
        student.eval()
        label = case.replace("T)", f"{num_tokens})", 1)
        check_causal(student, ids[0], name="GPTModel", case=label, vocab_size=cfg.vocab_size, tol=tol)
        with _inner_dropout_off(student):  # the model's own dropout: drop_emb
            check_dropout_behaviour(student, lambda: (ids[0].clone(),), dropout=cfg.drop_rate, name="GPTModel",
                                    case=f"{label}; dropout inside the blocks switched off, to see drop_emb's")


# --- greedy generation ----------------------------------------------------------------


def _greedy_first_position(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int) -> torch.Tensor:
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_size:])[:, 0, :]
        idx = torch.cat([idx, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return idx


def _greedy_uncropped_cut(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int) -> torch.Tensor:
    for _ in range(max_new_tokens):
        logits = model(idx[:, :context_size])[:, -1, :]  # the FIRST context_size tokens: a common slip
        idx = torch.cat([idx, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return idx


def check_greedy_generate(
    fn: Callable,
    *,
    cfg: GPTConfig | None = None,
    batch_size: int = 1,
    prompt_length: int = 4,
    max_new_tokens: int = 6,
    context_size: int | None = None,
    seed: int = 0,
) -> None:
    """Grade ``fn(model, idx, max_new_tokens, context_size)``: greedy decoding.

    Returns ``idx`` (B, T) extended by ``max_new_tokens`` tokens, each the argmax of
    the logits at the last position, with the model fed at most the last
    ``context_size`` tokens. Run on a reference GPT with seeded random weights; by
    default the prompt plus new tokens is longer than ``context_size``, so cropping
    is needed.
    """
    cfg = cfg or grading_config()
    context_size = context_size or min(cfg.context_length, prompt_length + max_new_tokens // 2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _RefGPTModel(cfg)
    perturb_parameters(model, seed, std=0.5)  # sharper logits: fewer near-ties between tokens
    model.eval()
    idx = _seeded_ints(cfg.vocab_size, batch_size, prompt_length, seed=seed + 1)
    case = (f"prompt of shape {_fmt_shape(idx.shape)}, max_new_tokens={max_new_tokens}, "
            f"context_size={context_size} (model context_length {cfg.context_length})")
    expected = _ref_generate(model, idx.clone(), max_new_tokens, context_size, temperature=0.0, use_cache=False)
    with _watching(model) as calls:
        got = _call(fn, model, idx.clone(), max_new_tokens, context_size, what="your generate function", case=case,
                    hint="feed the model at most the last context_size tokens.")
    check_shape(got, expected.shape, name="generated ids", case=case,
                hint="return the prompt followed by the new tokens (append each new id to idx along dim 1).")
    if not torch.equal(got.long(), expected):
        with torch.no_grad():
            candidates = [
                (_greedy_first_position(model, idx.clone(), max_new_tokens, context_size), "the next token was read from the FIRST position's logits; use the last: logits[:, -1, :]."),
                (_greedy_uncropped_cut(model, idx.clone(), max_new_tokens, context_size), "the model was fed the first context_size tokens (idx[:, :context_size]); feed the last: idx[:, -context_size:]."),
            ]
        cause = next((why for cand, why in candidates if torch.equal(got.long(), cand)), None)
        row = int((got.long() != expected).any(dim=1).nonzero()[0])
        col = int((got.long()[row] != expected[row]).nonzero()[0])
        raise CheckFailed(_message(
            "generated ids: differ from greedy decoding.", case=case,
            lines=[f"sequence {row}, first difference at position {col} (the prompt is {prompt_length} tokens)",
                   f"expected {expected[row].tolist()}", f"got      {got[row].tolist()}"],
            cause=cause,
            hint="each step: run the model on the last context_size tokens, take the largest logit at the LAST "
                 "position as the next id, and append it to the sequence.",
        ))
    _check_left_alone(model, calls, name="your generate function", case=f"{case}, a model in eval mode", training=False)
    if any(grad for _, grad in calls.modes):
        raise CheckFailed(_message("your generate function: the model ran with gradients switched on.", case=case,
                                   cause="generating trains nothing, so the graph of every step only costs memory.",
                                   hint="run the model under torch.no_grad(), as the exercise asks."))
