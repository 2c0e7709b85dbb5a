"""The shared core (``course_utils.grading.core``): comparisons, messages, calling student code."""
from __future__ import annotations

import torch

from course_utils.grading import core
from course_utils.grading.core import _call, _check_number, _one_thread, _seeded, check_tensor_close

from .helpers import Case, Cases, fails, registry_tests, stub


def test_check_tensor_close_reports_index_values_and_tolerance():
    expected = torch.zeros(2, 3)
    got = expected.clone()
    got[1, 2] = 0.5
    msg = fails(check_tensor_close, got, expected, name="thing", case="my input", words=["thing", "my input", "(1, 2)", "0.5", "atol="])
    assert "1 of 6 values differ" in msg
    check_tensor_close(expected + 1e-7, expected)


def test_check_tensor_close_names_a_matching_diagnosis():
    expected = torch.ones(3)
    fails(check_tensor_close, torch.full((3,), 2.0), expected,
          diagnoses=[(torch.full((3,), 3.0), "wrong one"), (torch.full((3,), 2.0), "doubled it")], words=["doubled it"])
    fails(check_tensor_close, torch.full((3,), 2.0), expected,  # a diagnosis that raises is skipped, the message stays
          diagnoses=lambda: 1 / 0, words=["values differ"])


def test_call_reports_where_student_code_raised():
    fails(_call, stub, what="my function", case="some input", words=["my function is not implemented yet", "some input"])
    fails(_call, lambda: {}["key"], what="lookup", words=["lookup raised KeyError"])
    assert _call(lambda a, b=0: a + b, 1, b=2, what="add") == 3


def test_check_number_names_a_matching_variant():
    tol = core.Tolerance(1e-6, 0.0)
    _check_number(0.5, 0.5, name="n", case=None, tol=tol)
    _check_number(float("nan"), float("nan"), name="n", case=None, tol=tol)
    fails(_check_number, 1.0, 0.5, name="n", case=None, tol=tol, variants=lambda: [(1.0, "doubled")], words=["wrong value", "doubled"])
    fails(_check_number, float("nan"), 0.5, name="n", case=None, tol=tol, words=["nan"])


def test_seeded_and_one_thread_restore_the_callers_state():
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    with _seeded(5):
        a = torch.rand(2)
    with _seeded(5):
        assert torch.equal(torch.rand(2), a)
    assert torch.equal(torch.get_rng_state(), state)

    @_one_thread
    def inside():
        return torch.get_num_threads()

    assert inside() == 1 and torch.get_num_threads() == threads


def _in_place(x):
    return x.mul_(2)


def _two_values(x):
    return x * 2, x


def _broken(x):
    raise ValueError("boom")


CASES = {
    "check_shape": Cases(
        right=[Case("same_shape", lambda check: check(torch.zeros(2, 3), (2, 3))),
               Case("any_shape", lambda check: check(torch.zeros(4), None))],
        wrong=[Case("not_a_tensor", lambda check: check([0.0, 0.0], (2,)), ("torch.Tensor", "list", "return")),
               Case("transposed", lambda check: check(torch.zeros(3, 2), (2, 3)), ("wrong shape", "(2, 3)", "(3, 2)", "another order")),
               Case("other_size", lambda check: check(torch.zeros(5), (4,)), ("wrong shape", "(4,)", "(5,)"))],
    ),
    "check_tensor_close": Cases(
        right=[Case("equal", lambda check: check(torch.ones(3), torch.ones(3))),
               Case("within_tolerance", lambda check: check(torch.ones(3) + 1e-7, torch.ones(3))),
               Case("nan_where_expected", lambda check: check(torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0]))),
               Case("float64", lambda check: check(torch.ones(2, dtype=torch.float64) + 1e-12, torch.ones(2, dtype=torch.float64)))],
        wrong=[Case("values", lambda check: check(torch.tensor([1.0, 2.5]), torch.tensor([1.0, 2.0])), ("values differ", "(1,)", "2.5")),
               Case("shape", lambda check: check(torch.zeros(3, 2), torch.zeros(2, 3)), ("shape", "(2, 3)", "(3, 2)", "another order")),
               Case("dtype", lambda check: check(torch.zeros(2, dtype=torch.float64), torch.zeros(2)), ("dtype", "float64")),
               Case("list", lambda check: check([0.0, 0.0], torch.zeros(2)), ("torch.Tensor", "list")),
               Case("nan", lambda check: check(torch.tensor([float("nan"), 0.0]), torch.zeros(2)), ("NaN",))],
    ),
    "check_function": Cases(
        right=[Case("negation", lambda check: check(lambda x: -x, torch.neg, [("x", (torch.arange(3.0),))])),
               Case("in_place_does_not_leak", lambda check: check(_in_place, lambda x: x * 2, [("x", (torch.ones(3),))])),
               Case("tuples", lambda check: check(_two_values, _two_values, [("x", (torch.ones(2),))]))],
        wrong=[Case("values", lambda check: check(lambda x: x, torch.neg, [("a vector", (torch.ones(3),))]), ("values differ", "a vector")),
               Case("raises", lambda check: check(_broken, torch.neg, [("a vector", (torch.ones(3),))]), ("ValueError", "boom", "a vector")),
               Case("stub", lambda check: check(stub, torch.neg, [("a vector", (torch.ones(3),))]), ("not implemented yet",)),
               Case("return_count", lambda check: check(lambda x: x, _two_values, [("x", (torch.ones(2),))]), ("expected 2 return value(s), got 1",)),
               Case("second_case", lambda check: check(torch.abs, torch.neg, [("zeros", (torch.zeros(2),)), ("ones", (torch.ones(2),))]),
                    ("input: ones",))],
    ),
}

test_correct_passes, test_mistake_fails, test_early_return_is_caught = registry_tests(core, CASES)


# --- brief messages -------------------------------------------------------------------------------


def _failure_of(run) -> core.CheckFailed:
    try:
        run()
    except core.CheckFailed as failure:
        return failure
    raise AssertionError("no CheckFailed raised")


def test_a_failed_check_renders_as_its_message_alone():
    """IPython shows ``_render_traceback_``'s lines instead of a traceback: no grader frames, no grader source."""
    failure = _failure_of(lambda: check_tensor_close(torch.ones(3), torch.zeros(3), name="thing", hint="look at it"))
    assert isinstance(failure, AssertionError)  # pytest.raises(AssertionError) and nbgrader see a failure
    shown = "\n".join(failure._render_traceback_())
    assert "thing: values differ" in shown and "Hint: look at it" in shown
    assert "course_utils" not in shown and "File " not in shown and "check_tensor_close" not in shown


def test_an_exception_in_student_code_shows_the_students_lines_only():
    def students_function(x):
        return x[99]  # an IndexError in the student's own code

    failure = _failure_of(lambda: _call(students_function, [1], what="my function", case="a list of one"))
    shown = "\n".join(failure._render_traceback_())
    assert "my function raised IndexError" in shown
    assert "students_function" in shown and "x[99]" in shown  # where the student's code raised
    assert "course_utils" not in shown and "_call" not in shown


def test_composite_checks_grade_on_the_reference_parts_by_name():
    namespace = {"part": lambda x: 2 * x}
    exec("def whole(x):\n    return part(x) + 1\n", namespace)
    with core._swapped_names(namespace["whole"], {"part": lambda x: x, "missing": None}) as swapped:
        assert namespace["whole"](1) == 2 and swapped == ["part"] and "missing" not in namespace
    assert namespace["whole"](1) == 3  # put back afterwards


def test_tolerances_follow_the_dtype_the_student_computed_in():
    assert core._computed_dtype([torch.tensor(0.1, dtype=torch.float32)]) == torch.float32
    assert core._computed_dtype([float(torch.tensor(0.1, dtype=torch.float32))]) == torch.float32
    assert core._computed_dtype([0.1, 0.25]) == torch.float64
    assert core.number_tolerance(torch.float32).rtol > 1e-7 > core.number_tolerance(torch.float64).rtol


def test_the_graded_component_keeps_its_own_name():
    namespace = {"torch": torch}
    exec("class FeedForward(torch.nn.Module):\n    def __init__(self):\n        super(FeedForward, self).__init__()\n",
         namespace)
    cls = namespace["FeedForward"]
    with core._swapped_names(cls, {"FeedForward": torch.nn.Identity}) as swapped:
        assert swapped == [] and isinstance(cls(), cls)
