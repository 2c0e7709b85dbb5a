"""Every public ``check_*`` function of every grading module has a right and a wrong case in a table.

The tables are the ``CASES`` of the test modules (``test_ch03.py`` for
``course_utils.grading.ch03``, ...), run by the tests that ``helpers.registry_tests``
makes. This walk makes sure a new check cannot be added without them: a grading
module with a public check needs a test module with a table, the table needs an entry
for each check (and none for checks that no longer exist), and each entry needs at
least one implementation that must pass and one that must fail.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import course_utils.grading

MODULES = sorted(info.name for info in pkgutil.iter_modules(course_utils.grading.__path__))


def public_checks(module) -> set[str]:
    """The ``check_*`` functions a grading module defines (not those it imports)."""
    return {name for name, obj in vars(module).items()
            if name.startswith("check_") and inspect.isfunction(obj) and obj.__module__ == module.__name__}


def test_the_walk_sees_the_assignment_modules():
    assert {"core", "ch02", "ch03", "ch04", "ch05", "ch06", "ch07", "appendix_a", "appendix_d", "appendix_e"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_every_public_check_is_in_the_table(name):
    module = importlib.import_module(f"course_utils.grading.{name}")
    checks = public_checks(module)
    if not checks:
        return
    try:
        tests = importlib.import_module(f"{__package__}.test_{name}")
    except ModuleNotFoundError as exc:
        pytest.fail(f"course_utils.grading.{name} defines {sorted(checks)} but tests/grading/test_{name}.py is missing ({exc})")
    table = getattr(tests, "CASES", None)
    assert isinstance(table, dict), f"tests/grading/test_{name}.py has no CASES table"
    missing, stale = sorted(checks - set(table)), sorted(set(table) - checks)
    assert not missing, f"checks of course_utils.grading.{name} without registry cases: {missing}"
    assert not stale, f"registry cases of tests/grading/test_{name}.py for checks that do not exist: {stale}"
    for check, entry in table.items():
        assert entry.right, f"{name}.{check}: no implementation that must pass"
        assert entry.wrong, f"{name}.{check}: no implementation that must fail"
        assert all(case.words for case in entry.wrong), f"{name}.{check}: a wrong case without words for its message"
    for attr in ("test_correct_passes", "test_mistake_fails", "test_early_return_is_caught"):
        registry = getattr(getattr(tests, attr, None), "registry", None)
        assert registry is not None and registry[0] is module and registry[1] is table, (
            f"tests/grading/test_{name}.py must bind {attr} = registry_tests({name}, CASES)")
