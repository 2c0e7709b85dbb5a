"""What the tests of the grading checks share: ``fails`` and the registry of cases.

Every test module of an assignment (``test_ch03.py``, ...) ends with a table::

    CASES = {
        "check_causal_attention": Cases(
            right=[right("reference", CausalAttention), ...],
            wrong=[wrong("no_mask", make_causal("no_mask"), "no causal mask"), ...],
        ),
        ...
    }
    test_correct_passes, test_mistake_fails, test_early_return_is_caught = registry_tests(ch03, CASES)

``registry_tests`` turns it into three parametrized tests: every right case must pass
the check, every wrong case must fail it with a message holding the given words, and
the check must still catch a broken implementation when it is cut short (see
:func:`early_return_mutants`). ``test_registry.py`` fails when a public ``check_*``
function of a grading module has no entry in its table.
"""
from __future__ import annotations

import __future__
import ast
import copy
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch


def fails(check, *args, words=(), **kwargs) -> str:
    """Run a check that must fail; assert its message contains every word (case-insensitive)."""
    with pytest.raises(AssertionError) as info:
        check(*args, **kwargs)
    message = str(info.value)
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in message:\n{message}"
    return message


def stub(*args, **kwargs):
    """A student's function before they wrote it."""
    raise NotImplementedError()


def leaves_state_alone(run: Callable[[], Any]) -> None:
    """``run()`` must leave the global random state and the number of CPU threads as they were."""
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    run()
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == threads


# --- the registry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One implementation (or input) for a check: ``run(check)`` calls the check on it."""

    label: str
    run: Callable[[Callable], Any]
    words: tuple[str, ...] = ()  # wrong cases: words the failure message must contain
    marks: tuple = field(default=())


class Cases(NamedTuple):
    right: list[Case]  # must pass
    wrong: list[Case]  # must raise AssertionError


def right(label: str, impl: Any, *, marks: tuple = (), **kwargs: Any) -> Case:
    """``check(impl, **kwargs)`` must pass."""
    return Case(label, lambda check: check(impl, **kwargs), (), marks)


def wrong(label: str, impl: Any, *words: str, marks: tuple = (), **kwargs: Any) -> Case:
    """``check(impl, **kwargs)`` must fail, with every one of ``words`` in its message."""
    return Case(label, lambda check: check(impl, **kwargs), words, marks)


def _passes(case: Case, check: Callable) -> bool:
    try:
        case.run(check)
    except AssertionError:
        return False
    return True


def registry_tests(module: Any, cases: dict[str, Cases]):
    """The three registry tests of one grading module, to be bound to module-level ``test_*`` names."""
    right_params = [pytest.param(name, c, id=f"{name}-{c.label}", marks=c.marks)
                    for name, entry in cases.items() for c in entry.right]
    wrong_params = [pytest.param(name, c, id=f"{name}-{c.label}", marks=c.marks)
                    for name, entry in cases.items() for c in entry.wrong]

    @pytest.mark.parametrize("name, case", right_params)
    def test_correct_passes(name: str, case: Case) -> None:
        case.run(getattr(module, name))

    @pytest.mark.parametrize("name, case", wrong_params)
    def test_mistake_fails(name: str, case: Case) -> None:
        fails(case.run, getattr(module, name), words=case.words)

    @pytest.mark.parametrize("name", list(cases))
    @pytest.mark.filterwarnings("ignore")
    def test_early_return_is_caught(name: str) -> None:
        for where, mutant in early_return_mutants(getattr(module, name)):
            if not any(_passes(case, mutant) for case in cases[name].wrong):
                pytest.fail(f"{name} cut short by a `return` {where} still fails every wrong case of the table, "
                            "so a check that stopped there would go unnoticed: add a wrong case that fails only "
                            "in the part that comes after.")

    for test in (test_correct_passes, test_mistake_fails, test_early_return_is_caught):
        test.registry = (module, cases)  # what test_registry.py verifies
    return test_correct_passes, test_mistake_fails, test_early_return_is_caught


# --- early-return mutants ------------------------------------------------------------------------

_COMPOUND = (ast.For, ast.While, ast.With, ast.If, ast.Try)


def _checks(stmt: ast.stmt) -> bool:
    """Whether a statement can fail a check: it raises, asserts or calls something."""
    return any(isinstance(node, (ast.Raise, ast.Assert, ast.Call)) for node in ast.walk(stmt))


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _insertion_points(fdef: ast.FunctionDef) -> list[tuple[list[tuple[str, int]], ast.stmt]]:
    """Where a ``return`` goes: at the top, then before the last statement that checks, descending
    into it while it is a loop, ``with``, ``if`` or ``try`` (each point is later than the one before)."""
    first = 1 if fdef.body and _is_docstring(fdef.body[0]) else 0
    points = [([("body", first)], fdef.body[first])]
    node, attr, path = fdef, "body", []
    while True:
        stmts = getattr(node, attr)
        last = max((i for i, s in enumerate(stmts) if _checks(s) and not _is_docstring(s)), default=None)
        if last is None:
            break
        path = path + [(attr, last)]
        points.append((path, stmts[last]))
        stmt = stmts[last]
        if not isinstance(stmt, _COMPOUND):
            break
        if isinstance(stmt, ast.If) and not any(_checks(s) for s in stmt.body):
            attr = "orelse"
        else:
            attr = "body"
        node = stmt
    return points


def early_return_mutants(check: Callable) -> list[tuple[str, Callable]]:
    """Copies of ``check`` that return early: ``(where, mutant)`` pairs.

    The first returns before doing anything (the fault of a check that compares
    nothing); the others return just before the check's last statement that can
    fail, and then before the last such statement inside it when that is a loop, a
    ``with``, an ``if`` or a ``try``. A table whose wrong cases all still fail under
    a mutant has no wrong case for the part the mutant skips.
    """
    fn = inspect.unwrap(check)  # below decorators such as _one_thread (the copy is decorated again)
    module = sys.modules[fn.__module__]
    filename = inspect.getsourcefile(fn)
    source = Path(filename).read_text()
    tree = ast.parse(source, filename)
    fdef = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == fn.__name__)
    mutants = []
    for path, stmt in _insertion_points(fdef):
        copy_def = copy.deepcopy(fdef)
        node = copy_def
        for attr, index in path[:-1]:
            node = getattr(node, attr)[index]
        attr, index = path[-1]
        getattr(node, attr).insert(index, ast.copy_location(ast.Return(value=None), stmt))
        code = compile(ast.fix_missing_locations(ast.Module(body=[copy_def], type_ignores=[])), filename, "exec",
                       flags=__future__.annotations.compiler_flag, dont_inherit=True)
        namespace = dict(vars(module))
        exec(code, namespace)
        first_line = ast.get_source_segment(source, stmt) or ""
        where = f"before line {stmt.lineno} ({first_line.splitlines()[0].strip()[:60]!r})"
        mutants.append((where, namespace[fn.__name__]))
    return mutants
