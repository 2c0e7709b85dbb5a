"""Checks of assignment appendix_e (parameter-efficient fine-tuning with LoRA).

:func:`check_lora_layer`, :func:`check_linear_with_lora` and
:func:`check_replace_linear_with_lora`, against :mod:`course_utils.lora`: how the
layers start (the update exactly zero), then, after seeded values are written into
every ``A`` and ``B``, the same outputs as the reference. :func:`grading_config` is
importable from here, for hidden tests with other sizes.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..gpt import GPTConfig
from ..lora import LinearWithLoRA as _RefLinearWithLoRA
from ..lora import LoRALayer as _RefLoRALayer
from ..lora import replace_linear_with_lora as _ref_replace_linear_with_lora
from .core import CheckFailed, Tolerance, _call, _grades_on, _is_own_class, _fmt_shape, _fmt_values, _message, _one_thread, _seeded, _seeded_ints, _short_list, check_tensor_close, seeded_randn
from .factories import _tiny_gpt, grading_config
from .modules import _build

__all__ = ["grading_config", "check_lora_layer", "check_linear_with_lora", "check_replace_linear_with_lora"]


# --- reading and writing a student's LoRA matrices ------------------------------------


def _lora_matrices(module: nn.Module, in_dim: int, out_dim: int, rank: int, *, name: str, case: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (in, rank) A and (rank, out) B of a student's LoRA layer (nn.Linear A/B accepted, transposed)."""
    found = []
    for attr, shape in (("A", (in_dim, rank)), ("B", (rank, out_dim))):
        value = getattr(module, attr, None)
        if isinstance(value, nn.Linear):
            value = value.weight.T
        if not isinstance(value, torch.Tensor):
            raise CheckFailed(_message(
                f"{name}: no matrix `{attr}` found.", case=case,
                hint=f"create self.A = nn.Parameter(...) of shape (in_dim, rank) = {_fmt_shape((in_dim, rank))} and "
                     f"self.B = nn.Parameter(...) of shape (rank, out_dim) = {_fmt_shape((rank, out_dim))}."))
        if tuple(value.shape) != shape:
            raise CheckFailed(_message(
                f"{name}: {attr} has shape {_fmt_shape(value.shape)}; expected {_fmt_shape(shape)}.", case=case,
                hint="A is (in_dim, rank) and B is (rank, out_dim), so that x @ A @ B maps in_dim to out_dim."))
        found.append(value)
    return found[0], found[1]


def _set_lora(module: nn.Module, A: torch.Tensor, B: torch.Tensor) -> None:
    """Write A (in, rank) and B (rank, out) into a student's LoRA layer."""
    with torch.no_grad():
        for attr, value in (("A", A), ("B", B)):
            target = getattr(module, attr)
            if isinstance(target, nn.Linear):
                target.weight.copy_(value.T)
            else:
                target.copy_(value)


def _check_fresh_lora(student: nn.Module, A: torch.Tensor, B: torch.Tensor, *, name: str, case: str) -> None:
    if not bool((B == 0).all()):
        raise CheckFailed(_message(
            f"{name}: B does not start at zero.", case=case, lines=[f"B = {_fmt_values(B)}"],
            cause="with a random B the update x @ A @ B is not zero at the start, so the adapted model no longer "
                  "computes what the pretrained model computed.",
            hint="create B filled with zeros, of shape (rank, out_dim)."))
    A, B = A.detach(), B.detach()
    if bool((A == 0).all()) or float(A.std()) == 0.0:
        raise CheckFailed(_message(
            f"{name}: A does not start random.", case=case, lines=[f"A = {_fmt_values(A)}"],
            cause="if A and B both start constant (e.g. zero), their gradients stay zero or equal and LoRA learns nothing.",
            hint="give A random values (for example with one of torch.nn.init's functions) when you create it."))
    trainable = {id(p) for p in student.parameters() if p.requires_grad}
    for attr in ("A", "B"):
        value = getattr(student, attr)
        params = list(value.parameters()) if isinstance(value, nn.Module) else [value]
        if not all(isinstance(p, nn.Parameter) and id(p) in trainable for p in params):
            raise CheckFailed(_message(f"{name}: {attr} is not a trainable parameter.", case=case,
                                          hint="wrap it in nn.Parameter(...) so that the optimizer trains it."))


def _check_lora_arguments(lora: nn.Module, in_dim: int, out_dim: int, rank: int, alpha: float, *, case: str) -> None:
    """A wrapper's own LoRA layer must be built with (in_features, out_features, rank, alpha): compared with
    the same class built that way, with the same A and B (so that only the wrapper's arguments are judged)."""
    try:
        twin = type(lora)(in_dim, out_dim, rank, alpha)
        A, B = seeded_randn(in_dim, rank, seed=41), seeded_randn(rank, out_dim, seed=42)
        _set_lora(lora, A, B)
        _set_lora(twin, A, B)
        x = seeded_randn(3, in_dim, seed=43)
        with torch.no_grad():
            same = torch.allclose(lora(x), twin(x))
    except Exception:  # the LoRA layer itself is broken: that is exercise 1's to grade
        return
    if not same:
        raise CheckFailed(_message(
            "LinearWithLoRA: the LoRA layer inside computes something else than the same class built with "
            "(linear.in_features, linear.out_features, rank, alpha).", case=case,
            hint="pass the wrapper's rank and alpha on to the LoRA layer, in the order the exercise gives."))


# --- the checks -----------------------------------------------------------------------


def check_lora_layer(
    cls: Callable,
    *,
    in_dim: int = 6,
    out_dim: int = 4,
    rank: int = 2,
    alpha: float = 4.0,
    batch_shape: Sequence[int] = (3,),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Grade ``cls(in_dim, out_dim, rank, alpha)``: ``x -> (alpha / rank) * x @ A @ B``.

    A (in_dim, rank) starts random and B (rank, out_dim) at zeros, so a fresh layer
    outputs zeros; both are trainable. After seeded values are written into A and B the
    output must equal :class:`course_utils.lora.LoRALayer`'s (scaling alpha / rank).
    """
    case = f"x of shape {_fmt_shape((*batch_shape, in_dim))}, in_dim={in_dim}, out_dim={out_dim}, rank={rank}, alpha={alpha}, {dtype}"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        student = _build(cls, (in_dim, out_dim, rank, alpha), {}, "LoRALayer", case).to(dtype)
    A, B = _lora_matrices(student, in_dim, out_dim, rank, name="LoRALayer", case=case)
    _check_fresh_lora(student, A, B, name="LoRALayer", case=case)
    x = seeded_randn(*batch_shape, in_dim, seed=seed + 1, dtype=dtype)
    with torch.no_grad():
        fresh = _call(student, x.clone(), what="LoRALayer.forward", case=case)
    check_tensor_close(fresh, torch.zeros(*batch_shape, out_dim, dtype=dtype), name="LoRALayer, freshly created", case=case,
                       hint="with B all zeros the update is zero, whatever A holds: scale the product of x, A and B.")
    new_A = seeded_randn(in_dim, rank, seed=seed + 2, dtype=dtype)
    new_B = seeded_randn(rank, out_dim, seed=seed + 3, dtype=dtype)
    _set_lora(student, new_A, new_B)
    with _seeded(seed + 4):
        reference = _RefLoRALayer(in_dim, out_dim, rank, alpha).to(dtype)
    with torch.no_grad():
        reference.A.copy_(new_A)
        reference.B.copy_(new_B)
        expected = reference(x)
        got = _call(student, x.clone(), what="LoRALayer.forward", case=case)
    product = x @ new_A @ new_B
    check_tensor_close(
        got, expected, name="LoRALayer", case=f"{case}, after random values were written into A and B",
        diagnoses=[(alpha * product, "the update is multiplied by alpha; the course scales by alpha / rank."),
                   (product, "the update is not scaled: multiply x @ A @ B by alpha / rank."),
                   (rank / alpha * product, "the scaling is upside down: alpha / rank, not rank / alpha.")],
        hint="multiply the product of x, A and B by alpha / rank.")


@_grades_on({"LoRALayer": _RefLoRALayer})  # a LoRALayer mistake is graded once, in exercise 1
def check_linear_with_lora(
    cls: Callable,
    *,
    in_dim: int = 5,
    out_dim: int = 3,
    rank: int = 2,
    alpha: float = 8.0,
    bias: bool = True,
    batch_shape: Sequence[int] = (2, 4),
    seed: int = 0,
) -> None:
    """Grade ``cls(linear, rank, alpha)``: ``linear(x) + lora(x)``, keeping the given layer as ``self.linear``.

    The wrapper's ``lora`` (any LoRA layer with ``A`` and ``B``, e.g. the student's own)
    starts at zero, so a fresh wrapper computes exactly ``linear(x)``; after random
    values are written into A and B it must equal :class:`course_utils.lora.LinearWithLoRA`.
    """
    case = f"x of shape {_fmt_shape((*batch_shape, in_dim))}, nn.Linear({in_dim}, {out_dim}, bias={bias}), rank={rank}, alpha={alpha}"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        linear = nn.Linear(in_dim, out_dim, bias=bias)
        saved = copy.deepcopy(linear.state_dict())
        student = _build(cls, (linear, rank, alpha), {}, "LinearWithLoRA", case)
    kept = getattr(student, "linear", None)
    if not isinstance(kept, nn.Linear):
        raise CheckFailed(_message("LinearWithLoRA: no nn.Linear stored as self.linear.", case=case,
                                      hint="keep the layer you are given as the attribute `linear`."))
    if any(not torch.equal(v, kept.state_dict()[k]) for k, v in saved.items()):
        raise CheckFailed(_message("LinearWithLoRA: self.linear's weights are not those of the layer you were given.", case=case,
                                      hint="store the given layer itself; do not create a new nn.Linear."))
    lora = getattr(student, "lora", None)
    if not isinstance(lora, nn.Module):
        raise CheckFailed(_message("LinearWithLoRA: no LoRA layer stored as self.lora.", case=case,
                                      hint="create a LoRA layer from the linear layer's sizes, rank and alpha, as the attribute `lora`."))
    if _is_own_class(lora):  # a LoRA layer of another name: check its arguments, then grade on the reference
        _check_lora_arguments(lora, in_dim, out_dim, rank, alpha, case=case)
        with _seeded(seed + 5):
            student.lora = lora = _RefLoRALayer(in_dim, out_dim, rank, alpha)
    _lora_matrices(lora, in_dim, out_dim, rank, name="LinearWithLoRA.lora", case=case)
    x = seeded_randn(*batch_shape, in_dim, seed=seed + 1)
    with torch.no_grad():
        fresh = _call(student, x.clone(), what="LinearWithLoRA.forward", case=case)
        base = linear(x)
    check_tensor_close(fresh, base, name="LinearWithLoRA, freshly created", case=case,
                       diagnoses=[(torch.zeros_like(base), "only the LoRA update is returned; add the linear layer's output.")],
                       hint="a fresh wrapper computes exactly what the linear layer computes, because the update starts at zero: add the two outputs.")
    new_A = seeded_randn(in_dim, rank, seed=seed + 2)
    new_B = seeded_randn(rank, out_dim, seed=seed + 3)
    _set_lora(lora, new_A, new_B)
    with _seeded(seed + 4):
        reference = _RefLinearWithLoRA(copy.deepcopy(linear), rank, alpha)
    with torch.no_grad():
        reference.lora.A.copy_(new_A)
        reference.lora.B.copy_(new_B)
        expected = reference(x)
        got = _call(student, x.clone(), what="LinearWithLoRA.forward", case=case)
    update = x @ new_A @ new_B * (alpha / rank)
    check_tensor_close(got, expected, name="LinearWithLoRA", case=f"{case}, after random values were written into lora.A and lora.B",
                       diagnoses=[(base, "the LoRA update is not added to the linear layer's output."),
                                  (update, "the linear layer's output is missing: add it to the LoRA update."),
                                  (base + update * rank, "the update is scaled by alpha; the course scales by alpha / rank.")],
                       hint="the output is the linear layer's output plus the LoRA layer's output.")


@_one_thread
@_grades_on({"LinearWithLoRA": _RefLinearWithLoRA, "LoRALayer": _RefLoRALayer})  # graded in exercises 1-2
def check_replace_linear_with_lora(
    fn: Callable,
    *,
    cfg: GPTConfig | None = None,
    rank: int = 2,
    alpha: float = 4.0,
    batch_size: int = 2,
    num_tokens: int = 5,
    seed: int = 0,
) -> None:
    """Grade ``fn(model, rank, alpha)``: wrap every ``nn.Linear`` of a GPTModel (at any depth) with LoRA.

    In place (the model is also returned): every ``nn.Linear`` becomes a wrapper with
    the original layer as ``.linear`` and a LoRA layer as ``.lora``; afterwards only the
    LoRA matrices are trainable. Checked: no layer missed, the original weights kept,
    the trainable set, the same logits as before (the updates start at zero), and,
    after random values are written into every A and B, the same logits as
    :func:`course_utils.lora.replace_linear_with_lora`.
    """
    cfg = cfg or grading_config(drop_rate=0.0)
    base = _tiny_gpt(cfg, seed).eval()
    linear_names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
    model = copy.deepcopy(base)
    case = f"a GPTModel with {cfg.n_layers} blocks ({len(linear_names)} nn.Linear layers), rank={rank}, alpha={alpha}"
    hint = ("freeze every parameter first; then walk the children of each module: put a LinearWithLoRA wrapping the "
            "layer in place of each nn.Linear child (setattr), and walk into every other child (recursion).")
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        got = _call(fn, model, rank, alpha, what="replace_linear_with_lora", case=case, hint=hint)
    model = got if isinstance(got, nn.Module) else model
    missed, wrappers = [], {}
    for name in linear_names:
        module = model.get_submodule(name)
        inner = getattr(module, "linear", None)
        if isinstance(module, nn.Linear) or not isinstance(inner, nn.Linear) or not isinstance(getattr(module, "lora", None), nn.Module):
            missed.append(name)
        else:
            wrappers[name] = module
    if missed:
        top = [n for n in missed if "." not in n]
        cause = ("only the model's direct children were replaced: the layers inside the transformer blocks need a "
                 "recursive walk." if len(top) < len(missed) and len(missed) < len(linear_names) else None)
        raise CheckFailed(_message(
            f"replace_linear_with_lora: {len(missed)} of {len(linear_names)} nn.Linear layers were not wrapped.", case=case,
            lines=[f"not wrapped: {_short_list(missed)}"], cause=cause, hint=hint))
    base_params = dict(base.named_parameters())
    for name, wrapper in wrappers.items():
        if not torch.equal(wrapper.linear.weight, base_params[f"{name}.weight"]):
            raise CheckFailed(_message(f"replace_linear_with_lora: {name}.linear has new weights.", case=case,
                                          hint="wrap the existing layer; do not create a new one."))
    lora_params = {id(p) for w in wrappers.values() for p in w.lora.parameters()}
    named = list(model.named_parameters())
    extra = [n for n, p in named if p.requires_grad and id(p) not in lora_params]
    frozen_lora = [n for n, p in named if not p.requires_grad and id(p) in lora_params]
    if extra or frozen_lora or not lora_params:
        lines = []
        if extra:
            lines.append(f"trainable but should be frozen: {_short_list(extra)}")
        if frozen_lora:
            lines.append(f"LoRA weights that are frozen: {_short_list(frozen_lora)}")
        cause = ("the base weights were left trainable: set requires_grad = False on every original parameter."
                 if extra else "the LoRA matrices were frozen too: freeze before adding them, or unfreeze them afterwards.")
        raise CheckFailed(_message("replace_linear_with_lora: the wrong parameters are trainable.", case=case,
                                      lines=lines, cause=cause, hint="only LoRA's A and B may train."))
    ids = _seeded_ints(cfg.vocab_size, batch_size, num_tokens, seed=seed + 2)
    model.eval()
    with torch.no_grad():
        expected = base(ids)
        fresh = _call(model, ids, what="the adapted model's forward", case=case)
    check_tensor_close(fresh, expected, name="the adapted model, freshly wrapped", case=case, tol=Tolerance(1e-4, 1e-4),
                       hint="the adapted model must start out computing exactly what it computed before: B starts at zeros.")
    with _seeded(seed + 4):
        reference = _ref_replace_linear_with_lora(copy.deepcopy(base), rank, alpha).eval()
    for i, (name, wrapper) in enumerate(wrappers.items()):
        lin = base.get_submodule(name)
        new_A = seeded_randn(lin.in_features, rank, seed=seed + 10 + 2 * i, scale=0.3)
        new_B = seeded_randn(rank, lin.out_features, seed=seed + 11 + 2 * i, scale=0.3)
        _lora_matrices(wrapper.lora, lin.in_features, lin.out_features, rank, name=f"{name}.lora", case=case)
        _set_lora(wrapper.lora, new_A, new_B)
        ref_lora = reference.get_submodule(name).lora
        with torch.no_grad():
            ref_lora.A.copy_(new_A)
            ref_lora.B.copy_(new_B)
    with torch.no_grad():
        expected = reference(ids)
        got_logits = _call(model, ids, what="the adapted model's forward", case=case)
    check_tensor_close(got_logits, expected, name="the adapted model", case=f"{case}, random values written into every A and B",
                       tol=Tolerance(1e-4, 1e-4),
                       hint="every nn.Linear (at any depth) must be wrapped, and nothing else changed.")
