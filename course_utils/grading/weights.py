"""Weight transfer: copy a student's parameters into the reference module.

The checks never assume how a module is structured inside. They nudge the student's
parameters to seeded random values (:func:`perturb_parameters`, so that, e.g., a
LayerNorm's scale is not all ones), copy them into a fresh reference module
(:func:`transfer_weights`), and compare the two modules' outputs
(:func:`course_utils.grading.modules.check_module_against_reference`). Parameters are
matched in this order:

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
   projections; a fused bias likewise. Its rows may be laid out in any order of the
   three axes (which of q/k/v, which head, which element of the head): ``[Q; K; V]``
   blocks (``qkv_layout=("qkv", "head", "dim")``, tried first), or per head, each head's
   q, k and v side by side (``("head", "qkv", "dim")``), and so on;
   :data:`QKV_LAYOUTS` lists them, and the module check tries each.
4. **By order**: the parameters still unmatched are paired in the order the
   modules create them (registration order) and must agree in shape (a bare
   parameter may be the transpose of an ``nn.Linear`` weight).

Parameters on either side that stay unmatched fail the check with both lists
printed, so a student sees, e.g., that their projections have a bias that the
reference has not.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .core import CheckFailed, _fmt_shape, _message

__all__ = ["transfer_weights", "perturb_parameters", "QKV_LAYOUTS"]

# the orders in which a fused projection's rows may hold (q/k/v, head, element of the head)
QKV_LAYOUTS = (("qkv", "head", "dim"), ("head", "qkv", "dim"), ("head", "dim", "qkv"), ("qkv", "dim", "head"),
               ("dim", "qkv", "head"), ("dim", "head", "qkv"))


def _split_fused(t: torch.Tensor, layout: Sequence[str], num_heads: int) -> list[torch.Tensor]:
    """Query, key and value parts of a fused (3 * d_out, ...) tensor whose rows follow ``layout``."""
    d_out = t.shape[0] // 3
    sizes = {"qkv": 3, "head": num_heads, "dim": d_out // num_heads}
    rest = tuple(t.shape[1:])
    grid = t.reshape(*(sizes[a] for a in layout), *rest)
    order = [list(layout).index(a) for a in ("qkv", "head", "dim")] + list(range(3, 3 + len(rest)))
    parts = grid.permute(*order).reshape(3, d_out, *rest)
    return [parts[0], parts[1], parts[2]]


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


def transfer_weights(student: nn.Module, reference: nn.Module, *, name: str = "your module", hint: str | None = None,
                     qkv_layout: Sequence[str] = QKV_LAYOUTS[0], num_heads: int = 1) -> list[tuple[str, str]]:
    """Copy the student's parameters into ``reference`` (see the module docstring for the rules).

    Returns the pairs ``(student parameter, reference parameter)`` that were matched;
    raises AssertionError, listing both sides, when they cannot be matched.
    """
    pairs: list[tuple[str, str]] = []
    with torch.no_grad():
        _transfer_group(student, reference, "", pairs, name, hint, (tuple(qkv_layout), num_heads))
    return pairs


def _transfer_group(student: nn.Module, reference: nn.Module, prefix: str, pairs: list, name: str, hint: str | None,
                    fused: tuple) -> None:
    s_children = dict(student.named_children())
    r_children = dict(reference.named_children())
    shared = {
        n for n, child in r_children.items()
        if n in s_children and isinstance(s_children[n], nn.Module) and (_has_params(child) or _has_params(s_children[n]))
    }
    for n in r_children:  # in the reference's order
        if n in shared:
            _transfer_group(s_children[n], r_children[n], f"{prefix}{n}.", pairs, name, hint, fused)
    s_items = _param_list(student, shared)
    r_items = _param_list(reference, shared)
    _match_flat(s_items, r_items, prefix, pairs, name, hint, fused)


def _match_flat(s_items: list, r_items: list, prefix: str, pairs: list, name: str, hint: str | None,
                fused: tuple = (QKV_LAYOUTS[0], 1)) -> None:
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
                        parts = _split_fused(s_p, *fused)
                    elif tuple(s_p.shape) == (r_shape[1], 3 * r_shape[0]) and not s_lin:
                        parts = _split_fused(s_p.T, *fused)
                elif kind == "bias" and s_p.dim() == 1 and s_p.shape[0] == 3 * r_shape[0]:
                    parts = _split_fused(s_p, *fused)
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
        raise CheckFailed(_message(
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
