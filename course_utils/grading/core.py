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
* **Failures**: :class:`CheckFailed`, an ``AssertionError`` that Jupyter shows as its
  message alone (no traceback into ``course_utils``, no grader source).
* **Isolation**: ``_swapped_names(student, {"GELU": reference_gelu, ...})`` lets a
  composite component run on the reference sub-components while it is graded, so a
  mistake in a sub-component costs only that sub-component's points.
* **Comparisons**: :func:`check_shape`, :func:`check_tensor_close` (index, values,
  tolerance, and a matching known mistake from ``diagnoses``), :func:`check_function`
  (a student's function against the reference on labelled cases), and for single
  numbers ``_as_number``, ``_close``, ``_check_number``.
"""
from __future__ import annotations

import functools
import math
import numbers
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckFailed",
    "Tolerance",
    "default_tolerance",
    "seeded_randn",
    "check_shape",
    "check_tensor_close",
    "check_function",
]


# --- failures -------------------------------------------------------------------------


class CheckFailed(AssertionError):
    """A failed check: an ``AssertionError`` whose message is all a student sees.

    IPython calls ``_render_traceback_`` instead of printing a traceback, so the cell
    shows the message (what failed, on which input, expected against got, a hint) and
    not the grader's frames or source lines. nbgrader stores those lines as the error's
    traceback, so the feedback HTML carries the same message.
    """

    def _render_traceback_(self) -> list[str]:
        lines = [f"\x1b[0;31mTest failed:\x1b[0m {self.args[0] if self.args else ''}"]
        cause = self.__cause__
        if cause is not None and not isinstance(cause, CheckFailed):
            # where the student's code raised: their frames only, never the grader's
            frames = [f for f in traceback.extract_tb(cause.__traceback__) if not f.filename.startswith(_PACKAGE_DIR)]
            if frames:
                lines.append("  Where your code raised it:")
                lines.extend(line.rstrip("\n") for line in traceback.format_list(frames[-3:]))
                lines.append("".join(traceback.format_exception_only(type(cause), cause)).rstrip("\n"))
        return lines


_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])  # course_utils/


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


def number_tolerance(dtype: torch.dtype = torch.float64) -> Tolerance:
    """Tolerance for a single number computed by a short formula in ``dtype``.

    About a hundred units in the last place, relative: float64 1e-12 + 1e-10, float32
    1e-9 + 1e-5 (a float32 formula is off by about 1e-7), half precision 1e-4 + 1e-2.
    """
    if dtype in (torch.float16, torch.bfloat16):
        return Tolerance(1e-4, 1e-2)
    if dtype == torch.float32:
        return Tolerance(1e-9, 1e-5)
    return Tolerance(1e-12, 1e-10)


def _computed_dtype(values: Iterable[Any]) -> torch.dtype:
    """The precision student numbers were computed in: a tensor's dtype, else float32 when every
    value is exactly a float32 number (a float32 result turned into a Python float), else float64."""
    values = list(values)
    dtypes = {v.dtype for v in values if isinstance(v, torch.Tensor) and v.dtype.is_floating_point}
    for low in (torch.float16, torch.bfloat16, torch.float32):
        if low in dtypes:
            return low
    floats = [float(v) for v in values if isinstance(v, (float, torch.Tensor)) and not isinstance(v, bool)]
    floats = [f for f in floats if math.isfinite(f) and f != 0.0]
    if floats and all(float(torch.tensor(f, dtype=torch.float32)) == f for f in floats) and not all(
            f == int(f) for f in floats):
        return torch.float32
    return torch.float64


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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
        raise CheckFailed(_message(
            f"{what} is not implemented yet (it raised NotImplementedError).",
            case=case, hint="replace the `raise NotImplementedError()` line with your code.",
        )) from exc
    except AssertionError:
        raise
    except Exception as exc:  # the student's bug, reported with the input that triggered it
        raise CheckFailed(_message(
            f"{what} raised {_describe_exception(exc)}",
            case=case, hint=hint or "the lines of your code where it happened are shown below this message.",
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


# --- isolation: grading a component on the reference sub-components ------------------


def _namespace_of(student: Any) -> dict | None:
    """The global namespace student code looks its names up in (a notebook's, for notebook code)."""
    fn = student
    if isinstance(student, type):
        fn = None
        for cls in student.__mro__:
            if cls.__module__.startswith(("torch", "builtins", "course_utils")):
                break
            fn = next((v for v in vars(cls).values() if hasattr(getattr(v, "__func__", v), "__globals__")), None)
            if fn is not None:
                break
    fn = getattr(fn, "__func__", fn)
    fn = getattr(fn, "func", fn)  # functools.partial
    namespace = getattr(fn, "__globals__", None)
    return namespace if isinstance(namespace, dict) else None


@contextmanager
def _swapped_names(student: Any, replacements: dict[str, Any]) -> Iterator[list[str]]:
    """While the block runs, the names in ``replacements`` that the student's namespace defines
    point to the reference implementations; yields the names swapped. Restored afterwards.

    A composite component (a block built from the student's LayerNorm, a loss over a loader
    calling the student's batch loss) then runs on the reference parts, so a mistake in a part
    is graded once, where the part is graded.
    """
    namespace = _namespace_of(student)
    saved: dict[str, Any] = {}
    if namespace is not None:
        for name, value in replacements.items():
            # never the graded object itself: its own code may name it (super(FeedForward, self))
            if name in namespace and namespace[name] is not value and namespace[name] is not student:
                saved[name] = namespace[name]
                namespace[name] = value
    try:
        yield sorted(saved)
    finally:
        if namespace is not None:
            namespace.update(saved)


def _grades_on(replacements: dict[str, Any]) -> Callable[[Callable], Callable]:
    """Decorate a check: while it runs, the student's namespace uses ``replacements`` (see
    :func:`_swapped_names`) for the names the notebook gives the sub-components."""

    def decorate(check: Callable) -> Callable:
        @functools.wraps(check)
        def wrapper(student: Any, *args: Any, **kwargs: Any) -> Any:
            with _swapped_names(student, replacements):
                return check(student, *args, **kwargs)

        return wrapper

    return decorate


def _is_own_class(module: Any) -> bool:
    """Whether a module's class was written by the student (not torch's, not the course's)."""
    return not type(module).__module__.startswith(("torch", "course_utils"))


# --- comparing tensors ----------------------------------------------------------------


Diagnoses = Sequence[tuple[Any, str]] | Callable[[], Sequence[tuple[Any, str]]]


def check_shape(got: Any, expected_shape: Sequence[int] | None, *, name: str = "output", case: str | None = None,
                hint: str | None = None) -> None:
    """Fail unless ``got`` is a tensor of exactly ``expected_shape`` (any shape when None)."""
    if not isinstance(got, torch.Tensor):
        shape = f" of shape {_fmt_shape(expected_shape)}" if expected_shape is not None else ""
        raise CheckFailed(_message(
            f"{name}: expected a torch.Tensor{shape}, got {type(got).__name__}.",
            case=case, hint=hint or "return a tensor (did you forget a `return`?).",
        ))
    if expected_shape is not None and tuple(got.shape) != tuple(expected_shape):
        lines = [f"expected shape {_fmt_shape(expected_shape)}, got {_fmt_shape(got.shape)}"]
        if sorted(got.shape) == sorted(expected_shape):
            lines.append("the sizes are right but in another order: check your transpose/view/permute calls")
        raise CheckFailed(_message(f"{name}: wrong shape.", case=case, lines=lines, hint=hint))


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
        raise CheckFailed(_message(
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
    raise CheckFailed(_message(f"{name}: values differ from the reference.", case=case, lines=lines,
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
            raise CheckFailed(_message(
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
            raise CheckFailed(_message(
                f"{name}: expected a single number, got a tensor of shape {_fmt_shape(value.shape)}.",
                case=case, hint=hint or "reduce to one number (a mean), and return it."))
        return float(value.detach().double())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CheckFailed(_message(
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
    raise CheckFailed(_message(
        f"{name}: wrong value.", case=case,
        lines=[f"expected {_fmt_num(expected)}, got {_fmt_num(got)} (tolerance {tol})", *lines],
        cause=cause, hint=hint))
