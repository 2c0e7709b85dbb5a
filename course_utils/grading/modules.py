"""Comparing a student's ``nn.Module`` with the reference, and its behaviour on its own.

* ``_build(cls, args, kwargs, what, case)``: construct the student's module, with
  errors in ``__init__`` reported as failures.
* :func:`check_module_against_reference`: perturb the student's parameters, transfer
  them into the reference (:mod:`course_utils.grading.weights`) and compare the two in
  eval mode on labelled cases.
* :func:`check_causal`: changing later tokens must not change earlier outputs.
* :func:`check_dropout_behaviour`: deterministic in eval mode, random in train mode.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..device import eval_mode
from .core import (
    CheckFailed,
    Tolerance,
    _call,
    _clone_args,
    _fmt_num,
    _is_own_class,
    _message,
    _seeded_ints,
    check_shape,
    check_tensor_close,
    default_tolerance,
    seeded_randn,
)
from .weights import QKV_LAYOUTS, perturb_parameters, transfer_weights

__all__ = ["check_module_against_reference", "check_causal", "check_dropout_behaviour"]


def _use_reference_parts(student: nn.Module, parts: dict[str, Callable[[], nn.Module]], *,
                         match: Callable[[str, nn.Module], str | None] | None = None) -> list[str]:
    """Put reference modules in place of the sub-modules the student wrote, where the notebook fixes them.

    ``parts`` maps an attribute path (``"norm1"``, ``"trf_blocks.0"``) to a factory of the
    reference module; ``match(path, module)`` may name a factory for other paths. Only a
    module whose class the student wrote is replaced (torch's and the course's stay), in
    the dtype of the module it replaces. Returns the paths replaced. The composite check
    then grades what the component adds, not its parts again (they are perturbed and
    transferred to the reference with the rest of the weights).
    """
    replaced = []
    for path, module in list(student.named_modules()):
        if not path or not _is_own_class(module) or any(path.startswith(done + ".") for done in replaced):
            continue
        key = path if path in parts else (match(path, module) if match else None)
        if key is None or key not in parts:
            continue
        new = parts[key]()
        dtype = next((p.dtype for p in module.parameters()), None)
        if dtype is not None:
            new = new.to(dtype)
        parent_name, _, leaf = path.rpartition(".")
        setattr(student.get_submodule(parent_name) if parent_name else student, leaf, new)
        replaced.append(path)
    return replaced


@contextmanager
def _inner_dropout_off(module: nn.Module) -> Iterator[None]:
    """Dropout layers below the module's direct children off (p = 0) while the block runs: what is
    left random in train mode is the module's own dropout (its direct nn.Dropout children)."""
    own = {id(child) for child in module.children()}
    changed = []
    for child in module.modules():
        if isinstance(child, nn.Dropout) and id(child) not in own and child.p > 0:
            changed.append((child, child.p))
            child.p = 0.0
    try:
        yield
    finally:
        for child, p in changed:
            child.p = p


def _build(cls: Callable, args: tuple, kwargs: dict, what: str, case: str) -> nn.Module:
    module = _call(cls, *args, what=f"{what}(...) (your __init__)", case=case, **kwargs)
    if not isinstance(module, nn.Module):
        raise CheckFailed(_message(
            f"{what}: expected an nn.Module, got {type(module).__name__}.", case=case,
            hint="subclass torch.nn.Module and call super().__init__() first in __init__."))
    return module


class _Calls:
    """What happened to a model while student code ran: ``modes`` holds (training, grad enabled) per forward."""

    def __init__(self, model: nn.Module) -> None:
        self.modes: list[tuple[bool, bool]] = []
        self.params = [p.detach().clone() for p in model.parameters()]
        self.grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]


@contextmanager
def _watching(model: nn.Module) -> Iterator[_Calls]:
    """Record the mode and grad mode of every forward pass of ``model`` while the block runs."""
    calls = _Calls(model)
    handle = model.register_forward_pre_hook(lambda m, args: calls.modes.append((m.training, torch.is_grad_enabled())))
    try:
        yield calls
    finally:
        handle.remove()


def _check_left_alone(model: nn.Module, calls: _Calls, *, name: str, case: str, training: bool | None) -> None:
    """An evaluation must leave the caller's model as it was: weights, gradients, and (when given) its mode."""
    if any(not torch.equal(p.detach(), before) for p, before in zip(model.parameters(), calls.params)):
        raise CheckFailed(_message(f"{name}: the model's weights changed.", case=case,
                                   hint="measuring must not train: no backward pass and no optimizer step here."))
    if any((p.grad is None) != (g is None) or (g is not None and not torch.equal(p.grad, g))
           for p, g in zip(model.parameters(), calls.grads)):
        raise CheckFailed(_message(f"{name}: the model's gradients changed.", case=case,
                                   hint="measuring must not call backward(); run it under torch.no_grad()."))
    if training is not None and model.training != training:
        raise CheckFailed(_message(
            f"{name}: the model was handed over in {'train' if training else 'eval'} mode and came back in "
            f"{'train' if model.training else 'eval'} mode.", case=case,
            hint="leave the caller's model in the mode it had (or do what the exercise says about the mode)."))


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
    pairs = transfer_weights(student, reference, name=name, hint=transfer_hint)
    student.eval()
    reference.eval()
    if cases:
        label, args = cases[0]
        check_dropout_behaviour(student, lambda: _clone_args(args), dropout=0.0, name=name, case=label,
                                call_hint=call_hint)
    if not any("[W_query]" in s_name for s_name, _ in pairs):
        return _compare(student, reference, cases, name, tol, hint, diagnoses, call_hint)
    # a fused query/key/value projection: accept whichever layout of its rows gives the reference's output
    heads = max((getattr(m, "num_heads", 1) for m in reference.modules()), default=1)
    first_failure = None
    for layout in QKV_LAYOUTS:
        transfer_weights(student, reference, name=name, hint=transfer_hint, qkv_layout=layout, num_heads=heads)
        try:
            return _compare(student, reference, cases, name, tol, hint, diagnoses, call_hint)
        except CheckFailed as failure:
            first_failure = first_failure or failure
    raise CheckFailed(f"{first_failure.args[0]}\n  (your fused query/key/value projection was read in each layout: "
                      f"[Q; K; V] blocks, per head q, k, v side by side, and the other orders of these axes)") from None


def _compare(student: nn.Module, reference: nn.Module, cases: Sequence[tuple[str, tuple]], name: str,
             tol: Tolerance | None, hint: str | None, diagnoses: Callable | None, call_hint: str | None) -> None:
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
        raise CheckFailed(_message(
            f"{name}: not causal - changing tokens {position}..{num_tokens - 1} changed the output at "
            f"earlier position {bad[1]}.",
            case=case,
            lines=[f"at index {tuple(bad)}: before {_fmt_num(float(before[tuple(bad)]))}, "
                   f"after {_fmt_num(float(after[tuple(bad)]))}"],
            hint="a token may attend only to itself and earlier tokens: set the scores above the diagonal "
                 "to -inf BEFORE the softmax.",
        ))
    late_changed = ~torch.isclose(before[:, position:], after[:, position:], atol=tol.atol, rtol=tol.rtol)
    if not bool(late_changed.any()):
        raise CheckFailed(_message(
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
    with eval_mode(module):  # every module's mode is put back at the end, even on failure
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(1)
            first = _call(module, *make_input(), what=f"{name}.forward", case=case, hint=call_hint)
            second = _call(module, *make_input(), what=f"{name}.forward", case=case, hint=call_hint)
        check_shape(first, None, name=f"{name} output", case=case)
        if not torch.equal(first, second):
            raise CheckFailed(_message(
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
            raise CheckFailed(_message(
                f"{name}: in train mode with dropout={dropout} the output is not random.",
                case=case,
                hint="apply the nn.Dropout layer you created (in attention: to the attention weights, after the "
                     "softmax); in train mode it zeroes a random fraction of them.",
            ))
