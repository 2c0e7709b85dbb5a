"""Autograding helpers: compare a student's code with the course's reference.

The locked test cells of the nbgrader assignments (``solutions/``, ``exercises/``) are
a line or two each; they call the ``check_*`` functions here, which

* build the student's component and the reference component from this package with
  the same arguments, on seeded inputs,
* compare what they compute, within a stated tolerance, and
* raise an ``AssertionError`` whose message a student can act on: which input, which
  shape or value, expected against got (a few numbers), the likely cause when the
  output matches a known mistake (no sqrt(d_k) scaling, a mask on the wrong side,
  unbiased variance, exact-erf GELU, no shortcut, ...) and a hint.

Two layers:

* General helpers: :func:`check_tensor_close`, :func:`check_shape`,
  :func:`check_function`, :func:`transfer_weights`,
  :func:`check_module_against_reference`, :func:`check_causal`,
  :func:`check_dropout_behaviour`.
* One check per exercise: chapter 2 :func:`check_tokenizer`,
  :func:`check_sliding_window_dataset`, :func:`check_embeddings`; chapter 3
  :func:`check_attention_scores`, :func:`check_attention_weights`,
  :func:`check_context_vectors`, :func:`check_self_attention`,
  :func:`check_causal_attention`, :func:`check_multihead_attention`; chapter 4
  :func:`check_layer_norm`, :func:`check_gelu`, :func:`check_feed_forward`,
  :func:`check_transformer_block`, :func:`check_gpt_forward`,
  :func:`check_greedy_generate`; chapter 7 :func:`check_instruction_collate`.

How a student's module is compared (:func:`transfer_weights`)
-----------------------------------------------------------------
The checks never assume how a module is structured inside. They nudge the student's
parameters to seeded random values (so that, e.g., a LayerNorm's scale is not all
ones), copy them into a fresh reference module, and compare the two modules'
outputs. Parameters are matched in this order:

1. **Child modules with the same attribute name** (``att``, ``ff``, ``norm1``,
   ``trf_blocks``, ...) are matched with each other, recursively. The exercises name
   the attributes their ``__init__`` must create.
2. **By name**, within what is left: the same dotted name and shape
   (``W_query.weight``); a LayerNorm's ``scale``/``shift`` also answer to
   ``weight``/``bias`` and ``gamma``/``beta``; a bare ``nn.Parameter`` named like the
   reference's ``nn.Linear`` (``W_query`` for ``W_query.weight``) is taken to be used
   as ``x @ W`` and is transposed.
3. **Fused projections**: one weight of shape (3 * d_out, d_in) (an
   ``nn.Linear(d_in, 3 * d_out)`` of any name) stands for the query, key and value
   projections, in that order; a fused bias likewise.
4. **By order**: the parameters still unmatched are paired in the order the
   modules create them (registration order) and must agree in shape (a bare
   parameter may be the transpose of an ``nn.Linear`` weight).

Parameters on either side that stay unmatched fail the check with both lists
printed, so a student sees, e.g., that their projections have a bias that the
reference has not.

Functional checks complement the comparison: causality (changing later tokens must
not change earlier outputs), determinism in eval mode, dropout active in train mode.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import CausalAttention as _RefCausalAttention
from .attention import MultiHeadAttention as _RefMultiHeadAttention
from .attention import SelfAttentionV2 as _RefSelfAttention
from .data import SlidingWindowDataset as _RefSlidingWindowDataset
from .generate import generate as _ref_generate
from .gpt import FeedForward as _RefFeedForward
from .gpt import GPTConfig
from .gpt import GPTModel as _RefGPTModel
from .gpt import LayerNorm as _RefLayerNorm
from .gpt import TransformerBlock as _RefTransformerBlock
from .gpt import gelu_tanh
from .instruct import instruction_collate as _ref_instruction_collate
from .tokenizers import UNK, SimpleTokenizer, build_vocab, gpt2_tokenizer, split_text

__all__ = [
    "Tolerance",
    "default_tolerance",
    "seeded_randn",
    "check_tensor_close",
    "check_shape",
    "check_function",
    "transfer_weights",
    "perturb_parameters",
    "check_module_against_reference",
    "check_causal",
    "check_dropout_behaviour",
    "check_tokenizer",
    "check_sliding_window_dataset",
    "check_embeddings",
    "check_attention_scores",
    "check_attention_weights",
    "check_context_vectors",
    "check_self_attention",
    "check_causal_attention",
    "check_multihead_attention",
    "check_layer_norm",
    "check_gelu",
    "check_feed_forward",
    "check_transformer_block",
    "check_gpt_forward",
    "check_greedy_generate",
    "check_instruction_collate",
    "grading_config",
]


# --- tolerances and inputs -----------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """Elements agree when ``|got - expected| <= atol + rtol * |expected|`` (as ``torch.isclose``)."""

    atol: float
    rtol: float

    def __str__(self) -> str:
        return f"atol={self.atol:g}, rtol={self.rtol:g}"


def default_tolerance(dtype: torch.dtype = torch.float32) -> Tolerance:
    """Tolerance for one layer's worth of arithmetic in ``dtype``.

    float32: 1e-5 absolute + 1e-4 relative. That absorbs a different summation order
    (einsum against matmul, fused kernels against explicit formulas, about 1e-7) and
    still catches every mistake the checks look for: the smallest, exact-erf GELU
    instead of the tanh approximation, differs by up to 4.7e-4. float64: 1e-10 + 1e-8.
    """
    if dtype == torch.float64:
        return Tolerance(1e-10, 1e-8)
    if dtype in (torch.float16, torch.bfloat16):
        return Tolerance(1e-2, 1e-2)
    return Tolerance(1e-5, 1e-4)


def seeded_randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    """Normal random numbers from a private generator (the global RNG is untouched)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _seeded_ints(high: int, *shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, shape, generator=g)


# --- message formatting ----------------------------------------------------------------


def _fmt_num(x: float) -> str:
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.6g}"


def _fmt_values(t: torch.Tensor, n: int = 6) -> str:
    flat = t.detach().reshape(-1)
    shown = ", ".join(_fmt_num(v) for v in flat[:n].tolist())
    return f"[{shown}{', ...' if flat.numel() > n else ''}]"


def _fmt_shape(shape: Iterable[int]) -> str:
    dims = tuple(int(d) for d in shape)
    return "(" + ", ".join(str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"


def _message(title: str, *, case: str | None = None, lines: Sequence[str] = (), cause: str | None = None,
             hint: str | None = None) -> str:
    parts = [title]
    if case:
        parts.append(f"  input: {case}")
    parts.extend(f"  {line}" for line in lines)
    if cause:
        parts.append(f"  Likely cause: {cause}")
    if hint:
        parts.append(f"  Hint: {hint}")
    return "\n".join(parts)


def _describe_exception(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _call(fn: Callable, *args: Any, what: str, case: str | None = None, hint: str | None = None, **kwargs: Any) -> Any:
    """Call student code; turn its exceptions into an AssertionError that says where."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as exc:
        raise AssertionError(_message(
            f"{what} is not implemented yet (it raised NotImplementedError).",
            case=case, hint="replace the `raise NotImplementedError()` line with your code.",
        )) from exc
    except AssertionError:
        raise
    except Exception as exc:  # the student's bug, reported with the input that triggered it
        raise AssertionError(_message(
            f"{what} raised {_describe_exception(exc)}",
            case=case, hint=hint or "read the traceback above this message to find the failing line.",
        )) from exc


# --- comparing tensors ----------------------------------------------------------------

Diagnoses = Sequence[tuple[Any, str]] | Callable[[], Sequence[tuple[Any, str]]]


def check_shape(got: Any, expected_shape: Sequence[int] | None, *, name: str = "output", case: str | None = None,
                hint: str | None = None) -> None:
    """Fail unless ``got`` is a tensor of exactly ``expected_shape`` (any shape when None)."""
    if not isinstance(got, torch.Tensor):
        shape = f" of shape {_fmt_shape(expected_shape)}" if expected_shape is not None else ""
        raise AssertionError(_message(
            f"{name}: expected a torch.Tensor{shape}, got {type(got).__name__}.",
            case=case, hint=hint or "return a tensor (did you forget a `return`?).",
        ))
    if expected_shape is not None and tuple(got.shape) != tuple(expected_shape):
        lines = [f"expected shape {_fmt_shape(expected_shape)}, got {_fmt_shape(got.shape)}"]
        if sorted(got.shape) == sorted(expected_shape):
            lines.append("the sizes are right but in another order: check your transpose/view/permute calls")
        raise AssertionError(_message(f"{name}: wrong shape.", case=case, lines=lines, hint=hint))


def _matches(got: torch.Tensor, candidate: Any, tol: Tolerance) -> bool:
    if not isinstance(candidate, torch.Tensor) or tuple(candidate.shape) != tuple(got.shape):
        return False
    return bool(torch.isclose(got.double(), candidate.detach().double(), atol=tol.atol, rtol=tol.rtol, equal_nan=True).all())


def _diagnose(got: torch.Tensor, diagnoses: Diagnoses, tol: Tolerance) -> str | None:
    """The explanation of the first known mistake whose output ``got`` matches."""
    try:
        candidates = diagnoses() if callable(diagnoses) else diagnoses
        for candidate, explanation in candidates:
            if _matches(got, candidate, tol):
                return explanation
    except Exception:  # a diagnosis is a bonus; never let it hide the real message
        return None
    return None


def check_tensor_close(
    got: Any,
    expected: torch.Tensor,
    *,
    name: str = "output",
    case: str | None = None,
    tol: Tolerance | None = None,
    hint: str | None = None,
    diagnoses: Diagnoses = (),
    check_dtype: bool = True,
) -> None:
    """Fail unless ``got`` has ``expected``'s shape (and dtype) and its values within ``tol``.

    ``diagnoses`` lists ``(tensor, explanation)`` pairs for known mistakes (or a
    function returning them, called only on failure): when ``got`` matches one, the
    message names that mistake.
    """
    expected = expected.detach()
    tol = tol or default_tolerance(expected.dtype)
    check_shape(got, expected.shape, name=name, case=case, hint=hint)
    got = got.detach()
    if check_dtype and got.dtype != expected.dtype:
        raise AssertionError(_message(
            f"{name}: expected dtype {expected.dtype}, got {got.dtype}.", case=case,
            hint="keep the input's dtype: build new tensors from the input (e.g. torch.ones_like, "
                 "x.new_zeros) or pass dtype=x.dtype, and do not call .float()/.long() on results.",
        ))
    got_c, exp_c = got.to(expected.device).double(), expected.double()
    close = torch.isclose(got_c, exp_c, atol=tol.atol, rtol=tol.rtol, equal_nan=True)
    if bool(close.all()):
        return
    excess = ((got_c - exp_c).abs() - tol.atol - tol.rtol * exp_c.abs()).nan_to_num(nan=float("inf"))
    excess = torch.where(close, torch.full_like(excess, -float("inf")), excess)
    flat_index = int(excess.reshape(-1).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), got.shape)) if got.dim() else ()
    e_val, g_val = float(exp_c[index]), float(got_c[index])
    n_bad = int((~close).sum())
    lines = [
        f"at index {index}: expected {_fmt_num(e_val)}, got {_fmt_num(g_val)} "
        f"(tolerance {tol}: |got - expected| <= atol + rtol * |expected|)",
        f"{n_bad} of {got.numel()} values differ; largest |difference| {_fmt_num(float((got_c - exp_c).abs().nan_to_num(nan=float('inf')).max()))}",
    ]
    if got.dim() >= 1:
        row = index[:-1]
        label = f"[{', '.join(str(i) for i in row)}{', ' if row else ''}:]"
        lines.append(f"expected{label}: {_fmt_values(exp_c[row])}")
        lines.append(f"got     {label}: {_fmt_values(got_c[row])}")
    if torch.isnan(got_c).any() and not torch.isnan(exp_c).any():
        lines.append("your output contains NaN (e.g. a softmax over a row that is all -inf, or 0/0)")
    cause = _diagnose(got, diagnoses, tol) if diagnoses else None
    raise AssertionError(_message(f"{name}: values differ from the reference.", case=case, lines=lines,
                                  cause=cause, hint=hint))


def _as_tuple(x: Any) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def check_function(
    student_fn: Callable,
    reference_fn: Callable,
    cases: Sequence[tuple[str, tuple]],
    *,
    name: str | None = None,
    tol: Tolerance | None = None,
    hint: str | None = None,
    diagnoses: Callable[..., Sequence[tuple[Any, str]]] | None = None,
    check_dtype: bool = True,
) -> None:
    """Compare ``student_fn(*args)`` with ``reference_fn(*args)`` for each ``(label, args)`` case.

    Outputs may be tensors or tuples of tensors. Arguments are cloned for each call,
    so in-place changes by the student's function cannot affect the reference.
    ``diagnoses(*args)`` returns ``(output, explanation)`` pairs of known mistakes.
    """
    name = name or getattr(student_fn, "__name__", "your function")
    for label, args in cases:
        expected = _as_tuple(reference_fn(*_clone_args(args)))
        got = _as_tuple(_call(student_fn, *_clone_args(args), what=name, case=label))
        if len(got) != len(expected):
            raise AssertionError(_message(
                f"{name}: expected {len(expected)} return value(s), got {len(got)}.", case=label, hint=hint))
        for i, (g, e) in enumerate(zip(got, expected)):
            part = name if len(expected) == 1 else f"{name} (return value {i})"
            check_tensor_close(
                g, e, name=part, case=label, tol=tol, hint=hint, check_dtype=check_dtype,
                diagnoses=(lambda a=args, i=i: [(_as_tuple(o)[i], why) for o, why in diagnoses(*_clone_args(a))])
                if diagnoses else (),
            )


def _clone_args(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


# --- weight transfer ----------------------------------------------------------------------

_ALIASES = {"scale": ("weight", "gamma", "g"), "shift": ("bias", "beta", "b")}
_QKV = ("W_query", "W_key", "W_value")


def _owners(module: nn.Module) -> dict[str, nn.Module]:
    """Parameter name -> the module that owns it directly."""
    owners = {}
    for mod_name, mod in module.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            owners[f"{mod_name}.{p_name}" if mod_name else p_name] = mod
    return owners


def _param_list(module: nn.Module, skip_children: set[str]) -> list[tuple[str, nn.Parameter, bool]]:
    """(name, parameter, is_linear_weight) for parameters outside ``skip_children``."""
    owners = _owners(module)
    items = []
    for name, p in module.named_parameters():
        if name.split(".")[0] in skip_children:
            continue
        items.append((name, p, isinstance(owners.get(name), nn.Linear)))
    return items


def _describe_params(items: Sequence[tuple[str, Any, bool]], prefix: str = "") -> str:
    return ", ".join(f"{prefix}{n} {_fmt_shape(p.shape)}" for n, p, _ in items) or "(none)"


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def transfer_weights(student: nn.Module, reference: nn.Module, *, name: str = "your module", hint: str | None = None) -> list[tuple[str, str]]:
    """Copy the student's parameters into ``reference`` (see the module docstring for the rules).

    Returns the pairs ``(student parameter, reference parameter)`` that were matched;
    raises AssertionError, listing both sides, when they cannot be matched.
    """
    pairs: list[tuple[str, str]] = []
    with torch.no_grad():
        _transfer_group(student, reference, "", pairs, name, hint)
    return pairs


def _transfer_group(student: nn.Module, reference: nn.Module, prefix: str, pairs: list, name: str, hint: str | None) -> None:
    s_children = dict(student.named_children())
    r_children = dict(reference.named_children())
    shared = {
        n for n, child in r_children.items()
        if n in s_children and isinstance(s_children[n], nn.Module) and (_has_params(child) or _has_params(s_children[n]))
    }
    for n in r_children:  # in the reference's order
        if n in shared:
            _transfer_group(s_children[n], r_children[n], f"{prefix}{n}.", pairs, name, hint)
    s_items = _param_list(student, shared)
    r_items = _param_list(reference, shared)
    _match_flat(s_items, r_items, prefix, pairs, name, hint)


def _match_flat(s_items: list, r_items: list, prefix: str, pairs: list, name: str, hint: str | None) -> None:
    s_left = list(s_items)
    r_left = list(r_items)
    s_by_name = {n: (n, p, lin) for n, p, lin in s_items}

    def assign(r_entry, value: torch.Tensor, s_label: str) -> None:
        r_name, r_p, _ = r_entry
        r_p.copy_(value.to(r_p.dtype))
        pairs.append((prefix + s_label, prefix + r_name))

    def take(s_name: str) -> None:
        for i, entry in enumerate(s_left):
            if entry[0] == s_name:
                del s_left[i]
                return

    # pass 1: by name (with LayerNorm aliases and bare-parameter transposition)
    for r_entry in list(r_left):
        r_name, r_p, r_lin = r_entry
        candidates = [r_name]
        stem, _, leaf = r_name.rpartition(".")
        for alias in _ALIASES.get(leaf, ()):
            candidates.append(f"{stem}.{alias}" if stem else alias)
        matched = False
        for cand in candidates:
            s_entry = s_by_name.get(cand)
            if s_entry is not None and any(e[0] == cand for e in s_left) and s_entry[1].shape == r_p.shape:
                assign(r_entry, s_entry[1], cand)
                take(cand)
                matched = True
                break
        if not matched and leaf == "weight" and r_lin and stem:
            s_entry = s_by_name.get(stem)  # a bare parameter named like the Linear: used as x @ W
            if (s_entry is not None and any(e[0] == stem for e in s_left) and s_entry[1].dim() == 2
                    and not s_entry[2] and tuple(s_entry[1].shape) == tuple(r_p.shape)[::-1]):
                assign(r_entry, s_entry[1].T, stem)
                take(stem)
                matched = True
        if matched:
            r_left.remove(r_entry)

    # pass 2: one fused (3 * d_out, d_in) projection for query, key and value
    for kind in ("weight", "bias"):
        for stem in {e[0].rpartition(".")[0].rpartition(".")[0] for e in r_left if e[0].endswith(f"W_query.{kind}")}:
            names = [f"{stem + '.' if stem else ''}{q}.{kind}" for q in _QKV]
            entries = [next((e for e in r_left if e[0] == n), None) for n in names]
            if any(e is None for e in entries):
                continue
            r_shape = tuple(entries[0][1].shape)
            for s_entry in list(s_left):
                s_name, s_p, s_lin = s_entry
                parts = None
                if kind == "weight" and s_p.dim() == 2:
                    if tuple(s_p.shape) == (3 * r_shape[0], r_shape[1]) and (s_lin or r_shape[0] * 3 != r_shape[1]):
                        parts = s_p.chunk(3, dim=0)
                    elif tuple(s_p.shape) == (r_shape[1], 3 * r_shape[0]) and not s_lin:
                        parts = [c.T for c in s_p.chunk(3, dim=1)]
                elif kind == "bias" and s_p.dim() == 1 and s_p.shape[0] == 3 * r_shape[0]:
                    parts = s_p.chunk(3, dim=0)
                if parts is not None:
                    for r_entry, part, q in zip(entries, parts, _QKV):
                        assign(r_entry, part, f"{s_name}[{q}]")
                        r_left.remove(r_entry)
                    s_left.remove(s_entry)
                    break

    # pass 3: what is left, in registration order
    if len(s_left) != len(r_left) or any(
        not (tuple(s_p.shape) == tuple(r_p.shape)
             or (s_p.dim() == 2 and tuple(s_p.shape) == tuple(r_p.shape)[::-1] and r_lin and not s_lin))
        for (_, s_p, s_lin), (_, r_p, r_lin) in zip(s_left, r_left)
    ):
        where = f" inside `{prefix[:-1]}`" if prefix else ""
        lines = [
            f"the reference has (in this order): {_describe_params(r_items, prefix)}",
            f"your module has:                   {_describe_params(s_items, prefix)}",
            f"left unmatched - reference: {_describe_params(r_left, prefix)}; yours: {_describe_params(s_left, prefix)}",
        ]
        default_hint = ("create the layers the exercise lists, with the attribute names and shapes it gives "
                        "(and bias=qkv_bias for the query/key/value projections); "
                        "parameters must be nn.Parameter or belong to nn.Linear/nn.Embedding layers.")
        raise AssertionError(_message(
            f"{name}: cannot match your module's parameters with the reference's{where}.",
            lines=lines, hint=hint or default_hint,
        ))
    for (s_name, s_p, s_lin), r_entry in zip(s_left, r_left):
        r_p = r_entry[1]
        if tuple(s_p.shape) == tuple(r_p.shape) and not (s_p.dim() == 2 and r_entry[2] and not s_lin
                                                         and s_p.shape[0] == s_p.shape[1]):
            assign(r_entry, s_p, s_name)
        else:  # a bare matrix used as x @ W stands for a Linear weight transposed
            assign(r_entry, s_p.T, s_name)


def perturb_parameters(module: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Add seeded noise to every parameter, so that ones/zeros initialisations mean nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64) * std
            p.add_(noise.to(device=p.device, dtype=p.dtype))
    return module


def _build(cls: Callable, args: tuple, kwargs: dict, what: str, case: str) -> nn.Module:
    module = _call(cls, *args, what=f"{what}(...) (your __init__)", case=case, **kwargs)
    if not isinstance(module, nn.Module):
        raise AssertionError(_message(
            f"{what}: expected an nn.Module, got {type(module).__name__}.", case=case,
            hint="subclass torch.nn.Module and call super().__init__() first in __init__."))
    return module


def check_module_against_reference(
    student: nn.Module,
    reference: nn.Module,
    cases: Sequence[tuple[str, tuple]],
    *,
    name: str = "your module",
    tol: Tolerance | None = None,
    hint: str | None = None,
    diagnoses: Callable[..., Sequence[tuple[Any, str]]] | None = None,
    perturb_seed: int | None = 0,
    transfer_hint: str | None = None,
    call_hint: str | None = None,
) -> None:
    """Copy the student's weights into ``reference`` and compare the two in eval mode.

    ``cases`` are ``(label, args)`` pairs fed to both modules. With ``perturb_seed``
    the student's parameters first get seeded noise (so, e.g., a LayerNorm whose
    scale and shift are never used cannot pass by their initial ones and zeros).
    ``diagnoses(reference, *args)`` returns ``(output, explanation)`` pairs of known
    mistakes computed with the reference's (transferred) weights. Before comparing,
    two eval-mode calls on the first case must agree (no dropout in eval mode).
    ``call_hint`` is added when the student's forward raises.
    """
    if perturb_seed is not None:
        perturb_parameters(student, perturb_seed)
    transfer_weights(student, reference, name=name, hint=transfer_hint)
    student.eval()
    reference.eval()
    if cases:
        label, args = cases[0]
        check_dropout_behaviour(student, lambda: _clone_args(args), dropout=0.0, name=name, case=label,
                                call_hint=call_hint)
    for label, args in cases:
        with torch.no_grad():
            expected = reference(*_clone_args(args))
            got = _call(student, *_clone_args(args), what=f"{name}.forward", case=label, hint=call_hint)
        check_tensor_close(
            got, expected, name=name, case=f"{label}, eval mode", tol=tol, hint=hint,
            diagnoses=(lambda a=args: diagnoses(reference, *_clone_args(a))) if diagnoses else (),
        )


def check_causal(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    position: int | None = None,
    name: str = "your module",
    case: str | None = None,
    tol: Tolerance | None = None,
    vocab_size: int | None = None,
) -> None:
    """Changing tokens at ``position`` and later must not change outputs before ``position``.

    ``x`` is (B, T, ...) embeddings, or (B, T) token ids when ``vocab_size`` is given
    (new ids are drawn from it). Outputs must be (B, T, ...).
    """
    num_tokens = x.shape[1]
    position = num_tokens // 2 if position is None else position
    changed = x.clone()
    if vocab_size is not None:
        changed[:, position:] = (changed[:, position:] + 1 + _seeded_ints(vocab_size - 1, *changed[:, position:].shape, seed=99)) % vocab_size
    else:
        changed[:, position:] = seeded_randn(*changed[:, position:].shape, seed=99, dtype=x.dtype) * 3.0
    with torch.no_grad():
        before = _call(fn, x.clone(), what=name, case=case)
        after = _call(fn, changed, what=name, case=case)
    check_shape(before, None, name=name, case=case)
    check_shape(after, before.shape, name=name, case=case)
    tol = tol or default_tolerance(before.dtype)
    early_same = torch.isclose(before[:, :position], after[:, :position], atol=tol.atol, rtol=tol.rtol)
    if not bool(early_same.all()):
        bad = early_same.logical_not().nonzero()[0].tolist()
        raise AssertionError(_message(
            f"{name}: not causal - changing tokens {position}..{num_tokens - 1} changed the output at "
            f"earlier position {bad[1]}.",
            case=case,
            lines=[f"at index {tuple(bad)}: before {_fmt_num(float(before[tuple(bad)]))}, "
                   f"after {_fmt_num(float(after[tuple(bad)]))}"],
            hint="a token may attend only to itself and earlier tokens: mask the scores above the diagonal "
                 "(torch.triu(..., diagonal=1)) with -inf BEFORE the softmax.",
        ))
    late_changed = ~torch.isclose(before[:, position:], after[:, position:], atol=tol.atol, rtol=tol.rtol)
    if not bool(late_changed.any()):
        raise AssertionError(_message(
            f"{name}: the outputs at positions {position}.. did not change when their own input tokens did.",
            case=case, hint="each position's output must depend on its own input; is the mask hiding the diagonal?"))


def check_dropout_behaviour(
    module: nn.Module,
    make_input: Callable[[], tuple],
    *,
    dropout: float,
    name: str = "your module",
    case: str | None = None,
    call_hint: str | None = None,
) -> None:
    """Eval mode must be deterministic; with ``dropout > 0`` train mode must be random.

    Catches dropout applied in eval mode (``F.dropout(..., training=True)``, or a
    dropout done by hand) and dropout that is never applied. The module's mode is
    restored afterwards.
    """
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(1)
            first = _call(module, *make_input(), what=f"{name}.forward", case=case, hint=call_hint)
            second = _call(module, *make_input(), what=f"{name}.forward", case=case, hint=call_hint)
        check_shape(first, None, name=f"{name} output", case=case)
        if not torch.equal(first, second):
            raise AssertionError(_message(
                f"{name}: two calls in eval mode gave different outputs.",
                case=case,
                hint="dropout must be off after model.eval(): use an nn.Dropout layer (module.eval() switches it "
                     "off) or F.dropout(..., training=self.training), never training=True.",
            ))
        if dropout <= 0:
            return
        module.train()
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(2)
            train_a = _call(module, *make_input(), what=f"{name}.forward", case=case, hint=call_hint)
            train_b = _call(module, *make_input(), what=f"{name}.forward", case=case, hint=call_hint)
        if torch.equal(train_a, train_b) or torch.equal(train_a, first):
            raise AssertionError(_message(
                f"{name}: in train mode with dropout={dropout} the output is not random.",
                case=case,
                hint="apply the nn.Dropout layer you created (in attention: to the attention weights, after the "
                     "softmax); in train mode it zeroes a random fraction of them.",
            ))
    finally:
        module.train(was_training)


# --- chapter 2: tokenizer, sliding windows, embeddings -------------------------------------

_DEFAULT_TOKENIZER_TEXTS = (
    "I HAD always thought Jack Gisburn rather a cheap genius--though a good fellow enough.",
    '"Oh, I never said that!" she laughed; (and then: silence.)',
    "Good morning, robots! Are the spreadsheets ready? <|endoftext|> The villa was quiet.",
)


def check_tokenizer(
    cls: Callable,
    *,
    vocab_text: str | None = None,
    texts: Sequence[str] | None = None,
) -> None:
    """Grade a chapter-2 regex tokenizer ``cls(vocab)`` with ``encode(text)`` and ``decode(ids)``.

    The vocabulary is built as in the chapter: the sorted distinct tokens of
    ``vocab_text`` (default: "The Verdict") followed by ``<|endoftext|>`` and ``<|unk|>``.
    Each text's ids must equal the reference's (unknown words become ``<|unk|>``), and
    decoding the reference ids must give the reference's text.
    """
    if vocab_text is None:
        from .datasets import load_the_verdict
        vocab_text = load_the_verdict()
    vocab = build_vocab(split_text(vocab_text))
    reference = SimpleTokenizer(vocab)
    student = _call(cls, dict(vocab), what="your tokenizer's __init__", case="the chapter's vocabulary")
    texts = list(texts) if texts is not None else list(_DEFAULT_TOKENIZER_TEXTS)
    for text in texts:
        expected = reference.encode(text)
        got = _call(student.encode, text, what="encode", case=repr(text),
                    hint=f"words missing from the vocabulary must become the {UNK} token's id.")
        got_list = [int(i) for i in (got.tolist() if isinstance(got, torch.Tensor) else got)]
        if got_list != expected:
            pieces = split_text(text)
            at = next((i for i, (a, b) in enumerate(zip(got_list, expected)) if a != b), min(len(got_list), len(expected)))
            lines = [f"expected {len(expected)} ids: {expected[:12]}{' ...' if len(expected) > 12 else ''}",
                     f"got      {len(got_list)} ids: {got_list[:12]}{' ...' if len(got_list) > 12 else ''}"]
            if at < len(expected):
                lines.append(f"first difference at position {at}: expected {expected[at]} "
                             f"({reference.int_to_str[expected[at]]!r}), got "
                             f"{got_list[at] if at < len(got_list) else 'nothing'}")
            cause = None
            unk_id = vocab[UNK]
            if len(got_list) > len(expected) and any(not p.strip() for p in _raw_split(text)):
                cause = "whitespace or empty strings were kept as tokens: strip the pieces and drop empty ones."
            elif any(p not in vocab for p in pieces) and unk_id not in got_list:
                cause = f"unknown words were not replaced by {UNK} (id {unk_id})."
            raise AssertionError(_message("encode: wrong token ids.", case=repr(text), lines=lines, cause=cause,
                                          hint="split with the chapter's regular expression, strip each piece, "
                                               "drop empty pieces, then look each one up in the vocabulary."))
        decoded = _call(student.decode, list(expected), what="decode", case=f"the ids of {text!r}")
        want = reference.decode(expected)
        if decoded != want:
            cause = None
            if decoded.replace(" ", "") == want.replace(" ", ""):
                cause = "the spacing differs: remove the space that joining with ' ' puts before punctuation."
            raise AssertionError(_message(
                "decode: wrong text.", case=f"the ids of {text!r}",
                lines=[f"expected {want!r}", f"got      {decoded!r}"], cause=cause,
                hint="join the tokens with spaces, then remove the spaces before punctuation marks "
                     "(re.sub(r'\\s+([,.?!\"()\\'])', r'\\1', text)).",
            ))


def _raw_split(text: str) -> list[str]:
    from .tokenizers import SPLIT_PATTERN
    return SPLIT_PATTERN.split(text)


def check_sliding_window_dataset(
    cls: Callable,
    *,
    text: str | None = None,
    max_length: int = 4,
    stride: int = 4,
) -> None:
    """Grade a dataset ``cls(text, tokenizer, max_length, stride)`` of (input, target) windows.

    Uses GPT-2's tokenizer and the first 2,000 characters of "The Verdict" by default.
    Length and every item must equal the reference's; targets are the inputs shifted
    by one token.
    """
    if text is None:
        from .datasets import load_the_verdict
        text = load_the_verdict()[:2000]
    tokenizer = gpt2_tokenizer()
    case = f"max_length={max_length}, stride={stride}, {len(text)} characters of text"
    reference = _RefSlidingWindowDataset(text, tokenizer, max_length, stride)
    student = _call(cls, text, tokenizer, max_length, stride, what="your dataset's __init__", case=case)
    n = _call(len, student, what="len(dataset)", case=case)
    ids = reference.token_ids
    if n != len(reference):
        cause = None
        if n == len(range(0, len(ids) - max_length + 1, stride)):
            cause = "the last window has no target for its last token: stop while start + max_length < number of tokens."
        elif n == len(range(0, len(ids) - max_length, 1)):
            cause = "windows start every token: step the start by `stride`."
        raise AssertionError(_message(
            "len(dataset): wrong number of windows.", case=case,
            lines=[f"the text has {len(ids)} tokens; expected {len(reference)} windows, got {n}"], cause=cause,
            hint="windows start at 0, stride, 2*stride, ... as long as max_length inputs plus one more token "
                 "(the last target) fit.",
        ))
    for i in sorted({0, 1, len(reference) // 2, len(reference) - 1}):
        exp_in, exp_tg = reference[i]
        item = _call(student.__getitem__, i, what=f"dataset[{i}]", case=case)
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise AssertionError(_message(f"dataset[{i}]: expected an (input_ids, target_ids) pair, got {type(item).__name__}.",
                                          case=case))
        got_in, got_tg = (torch.as_tensor(t) for t in item)
        for what, got, exp in (("input_ids", got_in, exp_in), ("target_ids", got_tg, exp_tg)):
            if got.dtype != torch.long:
                raise AssertionError(_message(f"dataset[{i}] {what}: expected a tensor of dtype torch.long, got {got.dtype}.",
                                              case=case, hint="build it with torch.tensor(ids) (integer ids give torch.long)."))
            if tuple(got.shape) != tuple(exp.shape) or not torch.equal(got, exp):
                cause = None
                if what == "target_ids" and torch.equal(got, exp_in):
                    cause = "the targets are not shifted: they equal the inputs, but target j must be the token after input j (ids[start+1 : start+max_length+1])."
                elif what == "input_ids" and i > 0 and torch.equal(got, ids[i: i + max_length]):
                    cause = "window i starts at token i: it must start at i * stride."
                raise AssertionError(_message(
                    f"dataset[{i}] {what}: wrong token ids.", case=case,
                    lines=[f"expected {exp.tolist()}", f"got      {got.tolist()}"], cause=cause,
                    hint="item i is ids[s : s+max_length] and ids[s+1 : s+max_length+1] with s = i * stride.",
                ))


def _ref_embed(token_ids: torch.Tensor, tok_emb: nn.Embedding, pos_emb: nn.Embedding) -> torch.Tensor:
    positions = torch.arange(token_ids.shape[-1], device=token_ids.device)
    return tok_emb(token_ids) + pos_emb(positions)


def check_embeddings(
    fn: Callable,
    *,
    vocab_size: int = 50,
    context_length: int = 8,
    emb_dim: int = 6,
    batch_size: int = 2,
    num_tokens: int = 5,
    seed: int = 0,
) -> None:
    """Grade ``fn(token_ids, tok_emb, pos_emb)``: token embeddings plus position embeddings.

    token_ids: (B, T) with T <= context_length; the result is (B, T, emb_dim), the
    embedding of each token plus the embedding of its position 0..T-1.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tok_emb = nn.Embedding(vocab_size, emb_dim)
        pos_emb = nn.Embedding(context_length, emb_dim)
    ids = _seeded_ints(vocab_size, batch_size, num_tokens, seed=seed + 1)
    case = f"token_ids of shape {_fmt_shape(ids.shape)}, vocab_size={vocab_size}, context_length={context_length}, emb_dim={emb_dim}"

    def diagnoses(token_ids, tok, pos):
        return [
            (tok(token_ids), "the position embeddings were not added."),
            (pos(token_ids.clamp(max=context_length - 1)) + tok(token_ids), "positions were looked up by token id instead of 0..T-1."),
        ]

    with torch.no_grad():
        check_function(fn, _ref_embed, [(case, (ids, tok_emb, pos_emb))], name="your embedding function",
                       diagnoses=diagnoses,
                       hint="look up tok_emb(token_ids) (B, T, emb) and pos_emb(torch.arange(T)) (T, emb), "
                            "then add them (broadcasting over the batch).")


# --- chapter 3: attention -------------------------------------------------------------------


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
        hint="scores = queries @ keys.transpose(-2, -1): use the last two dimensions so batches work too.",
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
                   hint="weights = torch.softmax(scores / d_k**0.5, dim=-1).")


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
                   hint="context = weights @ values.")


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


_MASK_SLICE_HINT = ("if the error is about sizes: the input may be shorter than context_length, so use only the "
                    "first T rows and columns of the mask (mask[:T, :T] with T = x.shape[1]).")


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
        hint="queries, keys, values = W_query(x), W_key(x), W_value(x); "
             "weights = softmax(queries @ keys.transpose(-2, -1) / d_out**0.5, dim=-1); return weights @ values.",
    )


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
        hint="mask the scores above the diagonal with -inf (use only the first T rows and columns of the "
             "mask), softmax(scores / d_out**0.5, dim=-1), dropout on the weights, then weights @ values.",
    )
    student.eval()
    check_causal(student, xs[0], name="CausalAttention", case=case.replace("T,", f"{num_tokens},", 1))
    check_dropout_behaviour(student, lambda: (xs[0].clone(),), dropout=dropout, name="CausalAttention", case=case)


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
        hint="project, view as (b, T, num_heads, head_dim) and transpose(1, 2); masked softmax of "
             "q @ k.transpose(2, 3) / head_dim**0.5; dropout; weights @ v; transpose back, reshape to "
             "(b, T, d_out), then out_proj.",
    )
    student.eval()
    check_causal(student, xs[0], name="MultiHeadAttention", case=case.replace("T,", f"{num_tokens},", 1))
    check_dropout_behaviour(student, lambda: (xs[0].clone(),), dropout=dropout, name="MultiHeadAttention", case=case)


# --- chapter 4: the GPT model ------------------------------------------------------------------


def grading_config(**overrides: Any) -> GPTConfig:
    """The small GPT configuration the chapter-4 checks build (dropout on, untied head)."""
    fields = dict(vocab_size=97, context_length=12, emb_dim=16, n_heads=4, n_layers=2, drop_rate=0.1,
                  qkv_bias=False, tie_weights=False)
    return GPTConfig(**{**fields, **overrides})


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
            hint="a fresh LayerNorm gives each row mean 0 and variance 1: initialise scale = "
                 "nn.Parameter(torch.ones(emb_dim)) and shift = nn.Parameter(torch.zeros(emb_dim)), and normalise "
                 "over the last dimension.",
        )
    reference = _RefLayerNorm(emb_dim).to(dtype)
    check_module_against_reference(
        student, reference, [(case, (x,)), (f"{case}, values scaled by 1e-3 (eps matters)", (tiny,))],
        name="LayerNorm", perturb_seed=seed, diagnoses=_layer_norm_variants,
        transfer_hint="create exactly two parameters: scale (emb_dim,) and shift (emb_dim,).",
        hint="mean and var over dim=-1 with keepdim=True, var with unbiased=False; "
             "(x - mean) / torch.sqrt(var + 1e-5) * scale + shift.",
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
                       hint="0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))).")


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
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        student = _build(cls, (cfg,), {}, "FeedForward", case).to(dtype)
        reference = _RefFeedForward(cfg).to(dtype)
    x = seeded_randn(batch_size, num_tokens, cfg.emb_dim, seed=seed + 1, dtype=dtype)
    check_module_against_reference(
        student, reference, [(case, (x,))], name="FeedForward", perturb_seed=seed, diagnoses=_ff_variants,
        transfer_hint="create nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim) and nn.Linear(4 * cfg.emb_dim, cfg.emb_dim), in that order.",
        hint="self.layers = nn.Sequential(nn.Linear(emb, 4 * emb), GELU(), nn.Linear(4 * emb, emb)).",
    )


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
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        student = _build(cls, (cfg,), {}, "TransformerBlock", case).to(dtype)
        reference = _RefTransformerBlock(cfg).to(dtype)
    x = seeded_randn(batch_size, num_tokens, cfg.emb_dim, seed=seed + 1, dtype=dtype)
    check_module_against_reference(
        student, reference, [(case, (x,))], name="TransformerBlock", perturb_seed=seed, diagnoses=_block_variants,
        transfer_hint="create self.att (MultiHeadAttention), self.ff (FeedForward), self.norm1, self.norm2 "
                      "(LayerNorm) and self.drop_shortcut (nn.Dropout), with the names given.",
        hint="x = x + drop_shortcut(att(norm1(x))); then x = x + drop_shortcut(ff(norm2(x))).",
    )
    student.eval()
    check_causal(student, x, name="TransformerBlock", case=case)
    check_dropout_behaviour(student, lambda: (x.clone(),), dropout=cfg.drop_rate, name="TransformerBlock", case=case)


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
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        student = _build(cls, (cfg,), {}, "GPTModel", case).to(dtype)
        reference = _RefGPTModel(cfg).to(dtype)
    ids = [_seeded_ints(cfg.vocab_size, batch_size, t, seed=seed + t) for t in sorted({num_tokens, cfg.context_length})]
    check_module_against_reference(
        student, reference, [(case.replace("T)", f"{i.shape[1]})", 1), (i,)) for i in ids], name="GPTModel",
        perturb_seed=seed, diagnoses=_gpt_variants, tol=Tolerance(1e-4, 1e-4) if dtype != torch.float64 else None,
        transfer_hint="create tok_emb, pos_emb (nn.Embedding), drop_emb, trf_blocks (n_layers blocks), final_norm "
                      "and out_head = nn.Linear(emb_dim, vocab_size, bias=False), with the names given.",
        hint="x = tok_emb(idx) + pos_emb(torch.arange(T)); dropout; the blocks in order; final_norm; out_head.",
    )
    student.eval()
    label = case.replace("T)", f"{num_tokens})", 1)
    check_causal(student, ids[0], name="GPTModel", case=label, vocab_size=cfg.vocab_size,
                 tol=Tolerance(1e-4, 1e-4) if dtype != torch.float64 else None)
    check_dropout_behaviour(student, lambda: (ids[0].clone(),), dropout=cfg.drop_rate, name="GPTModel", case=label)


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
    with torch.no_grad():
        got = _call(fn, model, idx.clone(), max_new_tokens, context_size, what="your generate function", case=case,
                    hint="feed the model at most the last context_size tokens: idx[:, -context_size:].")
    check_shape(got, expected.shape, name="generated ids", case=case,
                hint="return the prompt followed by the new tokens: torch.cat((idx, next_id), dim=1) each step.")
    if not torch.equal(got.long(), expected):
        with torch.no_grad():
            candidates = [
                (_greedy_first_position(model, idx.clone(), max_new_tokens, context_size), "the next token was read from the FIRST position's logits; use the last: logits[:, -1, :]."),
                (_greedy_uncropped_cut(model, idx.clone(), max_new_tokens, context_size), "the model was fed the first context_size tokens (idx[:, :context_size]); feed the last: idx[:, -context_size:]."),
            ]
        cause = next((why for cand, why in candidates if torch.equal(got.long(), cand)), None)
        row = int((got.long() != expected).any(dim=1).nonzero()[0])
        col = int((got.long()[row] != expected[row]).nonzero()[0])
        raise AssertionError(_message(
            "generated ids: differ from greedy decoding.", case=case,
            lines=[f"sequence {row}, first difference at position {col} (the prompt is {prompt_length} tokens)",
                   f"expected {expected[row].tolist()}", f"got      {got[row].tolist()}"],
            cause=cause,
            hint="each step: logits = model(idx[:, -context_size:]); next_id = logits[:, -1, :].argmax(dim=-1, keepdim=True); "
                 "idx = torch.cat((idx, next_id), dim=1).",
        ))


# --- chapter 7: instruction batches ----------------------------------------------------------


def check_instruction_collate(
    fn: Callable,
    *,
    lengths: Sequence[int] = (5, 2, 4),
    pad_token_id: int = 50256,
    ignore_index: int = -100,
    allowed_max_length: int | None = None,
    seed: int = 0,
) -> None:
    """Grade ``fn(batch, pad_token_id=..., ignore_index=..., allowed_max_length=...)``.

    ``batch`` is a list of token-id lists. Expected: (B, L) inputs padded with
    ``pad_token_id``; targets shifted left by one, the first padding position kept as
    ``pad_token_id`` (it teaches the model to stop), every later one ``ignore_index``.
    """
    g = torch.Generator().manual_seed(seed)
    batch = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in lengths]
    case = f"{len(batch)} examples of lengths {list(lengths)}, pad_token_id={pad_token_id}, allowed_max_length={allowed_max_length}"
    kwargs = dict(pad_token_id=pad_token_id, ignore_index=ignore_index, allowed_max_length=allowed_max_length)
    exp_in, exp_tg = _ref_instruction_collate([list(b) for b in batch], **kwargs)
    got = _call(fn, [list(b) for b in batch], what="your collate function", case=case, **kwargs)
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        raise AssertionError(_message("your collate function must return (inputs, targets).", case=case))
    got_in, got_tg = got
    for what, g_t, e_t in (("inputs", got_in, exp_in), ("targets", got_tg, exp_tg)):
        check_shape(g_t, e_t.shape, name=what, case=case)
        if not torch.equal(g_t.long(), e_t):
            row = int((g_t.long() != e_t).any(dim=1).nonzero()[0])
            cause = None
            if what == "targets":
                if not (g_t == ignore_index).any():
                    cause = f"no padding position is masked with {ignore_index}: the loss would learn to predict padding."
                elif torch.equal(g_t.long()[g_t != ignore_index], exp_in[g_t != ignore_index]):
                    cause = "the targets are not shifted: target j must be input j + 1."
                elif ((g_t == ignore_index) | (g_t == pad_token_id)).sum() == ((e_t == ignore_index) | (e_t == pad_token_id)).sum():
                    cause = f"the first padding token after each text must stay a target ({pad_token_id}, 'stop here'); only the later ones become {ignore_index}."
            raise AssertionError(_message(
                f"{what}: wrong values in row {row}.", case=case,
                lines=[f"expected {e_t[row].tolist()}", f"got      {g_t[row].tolist()}"], cause=cause,
                hint=f"pad every example with {pad_token_id} to the longest length + 1; inputs drop the last column, "
                     f"targets drop the first; in the targets replace every padding token except the first by {ignore_index}.",
            ))
