"""The shared core of the checks: tolerances, seeded inputs, messages, comparisons.

Every assignment module builds on these pieces:

* **Tolerances and inputs**: :class:`Tolerance`, :func:`default_tolerance` (what one
  layer's arithmetic in a dtype may differ by), :func:`seeded_randn` and
  ``_seeded_ints`` (random inputs from a private generator; the global random state is
  never touched).
* **Messages**: ``_message(title, case=, lines=, cause=, hint=)`` lays out every
  failure the same way: what failed, on which input, expected against got, the likely
  cause and a hint. ``_fmt_num``, ``_fmt_values``, ``_fmt_shape`` and ``_short_list``
  keep the numbers short.
* **Calling student code**: ``_call(fn, *args, what=, case=)`` turns the student's
  exceptions (``NotImplementedError`` included) into an ``AssertionError`` that says
  where; ``_seeded(seed)`` runs a block with the global random state seeded and
  restored; ``_one_thread`` runs a check on one CPU thread.
* **Comparisons**: :func:`check_shape`, :func:`check_tensor_close` (index, values,
  tolerance, and a matching known mistake from ``diagnoses``), :func:`check_function`
  (a student's function against the reference on labelled cases), and for single
  numbers ``_as_number``, ``_close``, ``_check_number``.
"""
from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Tolerance",
    "default_tolerance",
    "seeded_randn",
    "check_shape",
    "check_tensor_close",
    "check_function",
]


# --- tolerances and inputs ------------------------------------------------------------


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


# --- message formatting ---------------------------------------------------------------


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


def _short_list(names: Sequence[str], n: int = 6) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


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


# --- calling student code -------------------------------------------------------------


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


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block with the global random state seeded, and restore the caller's state afterwards."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def _one_thread(check: Callable) -> Callable:
    """Run a check on one CPU thread (restored afterwards): its tiny tensors train several
    times faster without the cost of splitting work between threads."""

    @functools.wraps(check)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return check(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


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


# --- comparing numbers ----------------------------------------------------------------


def _as_number(value: Any, *, name: str, case: str | None, hint: str | None = None) -> float:
    """A Python float from a number or a one-element tensor; anything else fails."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise AssertionError(_message(
                f"{name}: expected a single number, got a tensor of shape {_fmt_shape(value.shape)}.",
                case=case, hint=hint or "reduce to one number (a mean), and return it."))
        return float(value.detach().double())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise AssertionError(_message(
            f"{name}: expected a number, got {type(value).__name__}.", case=case,
            hint=hint or "return the number (did you forget a `return`?)."))
    return float(value)


def _close(got: float, expected: float, tol: Tolerance) -> bool:
    if math.isnan(expected) or math.isnan(got):
        return math.isnan(expected) and math.isnan(got)
    return abs(got - expected) <= tol.atol + tol.rtol * abs(expected)


def _check_number(got: float, expected: float, *, name: str, case: str | None, tol: Tolerance,
                  variants: Callable[[], Sequence[tuple[float, str]]] | None = None, hint: str | None = None,
                  lines: Sequence[str] = ()) -> None:
    if _close(got, expected, tol):
        return
    cause = None
    if variants is not None:
        try:
            cause = next((why for value, why in variants() if _close(got, value, tol)), None)
        except Exception:  # a diagnosis is a bonus
            cause = None
    raise AssertionError(_message(
        f"{name}: wrong value.", case=case,
        lines=[f"expected {_fmt_num(expected)}, got {_fmt_num(got)} (tolerance {tol})", *lines],
        cause=cause, hint=hint))
