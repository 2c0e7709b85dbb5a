"""Messages a student can act on, without the answer: no failure's hint holds the answer's code.

Runs every wrong case of every registry table (``CASES`` of the ``test_<assignment>.py``
modules) and reads the ``Hint:`` line of its message: it may name functions and
arguments (``torch.no_grad()``, ``dim=-1``), but it holds no statement of the answer (an
assignment ``x = ...``, a ``return``, a ``for`` loop, a chain of tensor operations).
"""
from __future__ import annotations

import importlib
import re

import pytest

from .test_registry import MODULES

_CODE = [
    (re.compile(r"(^|[;:(]\s*)[A-Za-z_][\w.\[\], ]*\s=\s"), "an assignment"),
    (re.compile(r"\breturn\s+[\w.]+\s*[(\[@*+/,-]"), "a return statement"),
    (re.compile(r"\bfor \w+ in \w+\("), "a for loop"),
    (re.compile(r"\)\s*[@*/+-]\s*\w+\("), "an expression of calls"),
    (re.compile(r"\.\w+\([^()]*\)\.\w+\("), "a chain of tensor operations"),
]


def _wrong_cases():
    for name in MODULES:
        try:
            tests = importlib.import_module(f"{__package__}.test_{name}")
        except ModuleNotFoundError:
            continue
        grading = importlib.import_module(f"course_utils.grading.{name}")
        for check, entry in getattr(tests, "CASES", {}).items():
            for case in entry.wrong:
                yield pytest.param(getattr(grading, check), case, id=f"{name}.{check}-{case.label}", marks=case.marks)


@pytest.mark.parametrize("check, case", list(_wrong_cases()))
def test_no_hint_holds_the_answers_code(check, case):
    with pytest.raises(AssertionError) as info:
        case.run(check)
    for line in str(info.value).splitlines():
        if line.strip().startswith("Hint:"):
            hint = line.split("Hint:", 1)[1]
            for pattern, what in _CODE:
                assert not pattern.search(hint), f"the hint holds {what}: {hint.strip()}"
