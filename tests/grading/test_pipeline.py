"""The nbgrader pipeline end to end, in a temporary course directory (the repo is never written).

One session-scoped course directory holds a copy of ``solutions/`` and
``nbgrader_config.py``; every assignment found under ``solutions/`` is generated,
validated and graded, so new assignments are covered without editing this file.
A made-up class (``course_utils.grading.demo``) hands in the solutions, the untouched
student versions, and faulty work. On ``ch03`` one student per fault: an infinite loop,
a kernel crash, a rewritten and a deleted locked test cell, a flood of output, a
malformed notebook and a missing one. On every assignment a ``saboteur`` with the four
cell faults in one notebook (one kernel crash and one time-out per assignment keep the
run within CI's time) and a ``partial`` student whose first exercise is undone: its
cell and its feedback must carry the check's short message, not a traceback into the
grader.
Notebooks run in quick mode (``COURSE_SMOKE=1``) with a 15 s cell limit.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

from course_utils.grading import demo

REPO = Path(__file__).resolve().parents[2]
ASSIGNMENTS = demo.find_assignments(REPO / "solutions")
FAULTY_ON = "ch03"  # the file faults (malformed, absent); the cell faults go to every assignment
CELL_TIMEOUT = ["--Execute.timeout=15"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def course(tmp_path_factory) -> Path:
    """A course directory with every assignment generated into ``exercises/``."""
    root = tmp_path_factory.mktemp("course")
    assert demo.make_course_dir(root) == ASSIGNMENTS
    demo.generate_all(root, ASSIGNMENTS)
    return root


@pytest.fixture(scope="session")
def graded(course) -> dict:
    """The class handed in, autograded (per assignment) and exported: returns the runs and scores."""
    demo.make_class(course, [FAULTY_ON], faulty_on=[FAULTY_ON])
    others = [a for a in ASSIGNMENTS if a != FAULTY_ON]
    demo.make_class(course, others, faulty_on=others, faulty_kinds=("saboteur", "partial"))
    runs = {a: demo.autograde(course, a, extra_args=CELL_TIMEOUT)[0] for a in ASSIGNMENTS}
    return {"runs": runs, "scores": demo.scores(course)}


def _notebooks(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*.ipynb"))


def _normalised(path: Path) -> dict:
    """A notebook's cells without volatile fields (outputs, execution counts)."""
    nb = json.loads(path.read_text())
    cells = []
    for cell in nb["cells"]:
        cells.append({"cell_type": cell["cell_type"], "id": cell.get("id"),
                      "source": "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"],
                      "metadata": cell.get("metadata", {})})
    return {"cells": cells, "kernelspec": nb["metadata"].get("kernelspec"), "nbformat": nb["nbformat"]}


def test_assignments_found():
    assert "ch03" in ASSIGNMENTS


def test_committed_exercises_are_what_generation_gives(course):
    generated = {p.relative_to(course / "exercises") for p in _notebooks(course / "exercises")}
    committed = {p.relative_to(REPO / "exercises") for p in _notebooks(REPO / "exercises")}
    assert committed == generated, "exercises/ is out of date: run `nbgrader generate_assignment <name> --force` and commit"
    for rel in sorted(generated):
        assert _normalised(REPO / "exercises" / rel) == _normalised(course / "exercises" / rel), (
            f"exercises/{rel} differs from what nbgrader generates from solutions/: regenerate it and commit")


def test_release_has_no_solutions_or_hidden_tests(course):
    for path in _notebooks(course / "exercises"):
        text = path.read_text()
        assert "BEGIN SOLUTION" not in text and "BEGIN HIDDEN TESTS" not in text, path
        assert "raise NotImplementedError()" in text, path


def test_sources_pass_validate(course):
    result = demo.run_nbgrader(["validate", *map(str, _notebooks(course / "solutions"))], course, check=False)
    out = result.stdout + result.stderr
    assert out.count("Success! Your notebook passes all the tests.") == len(_notebooks(course / "solutions")), out


def test_release_fails_every_test(course):
    result = demo.run_nbgrader(["validate", "--invert", *map(str, _notebooks(course / "exercises"))], course, check=False)
    out = result.stdout + result.stderr
    assert out.count("Success! The notebook does not pass any tests.") == len(_notebooks(course / "exercises")), out


def test_solutions_get_full_marks_and_release_gets_zero(graded):
    scores = graded["scores"]
    for assignment in ASSIGNMENTS:
        score, max_score = scores["solver"][assignment]
        assert max_score > 0 and score == max_score, (assignment, score, max_score)
        assert scores["blank"][assignment] == (0.0, max_score), assignment


def _max(graded, assignment: str) -> float:
    return graded["scores"]["solver"][assignment][1]


def _points(course: Path, grade_id: str, assignment: str) -> float:
    nb = nbformat.read(next((course / "solutions" / assignment).glob("*.ipynb")), as_version=4)
    cells = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")]
    return {c.metadata["nbgrader"]["grade_id"]: c.metadata["nbgrader"]["points"] for c in cells}[grade_id]


def _grade_ids(course: Path, assignment: str) -> list[str]:
    nb = nbformat.read(next((course / "solutions" / assignment).glob("*.ipynb")), as_version=4)
    return [c.metadata["nbgrader"]["grade_id"] for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")]


def _autograded(course: Path, student: str, assignment: str = FAULTY_ON):
    return nbformat.read(next((course / "autograded" / student / assignment).glob("*.ipynb")), as_version=4)


def _errors(nb) -> list[tuple[str, str]]:
    return [(c.metadata.get("nbgrader", {}).get("grade_id", ""), o.ename)
            for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]


def _last_solution_points(course: Path, assignment: str) -> float:
    """Points of the test cells that grade the last solution cell (one cell, or ch07's two)."""
    nb = nbformat.read(next((course / "solutions" / assignment).glob("*.ipynb")), as_version=4)
    last_solution = max(i for i, c in enumerate(nb.cells) if c.metadata.get("nbgrader", {}).get("solution"))
    return sum(c.metadata["nbgrader"]["points"] for c in nb.cells[last_solution:]
               if c.metadata.get("nbgrader", {}).get("grade"))


def test_infinite_loop_times_out_and_the_rest_is_graded(course, graded):
    assert graded["scores"]["looper"][FAULTY_ON][0] == _max(graded, FAULTY_ON) - _last_solution_points(course, FAULTY_ON)
    assert "CellTimeoutError" in {e for _, e in _errors(_autograded(course, "looper"))}


def test_kernel_crash_is_graded_not_fatal(course, graded):
    assert graded["scores"]["crasher"][FAULTY_ON][0] < _max(graded, FAULTY_ON)
    assert graded["scores"]["crasher"][FAULTY_ON][0] > 0  # cells after the crash still scored
    assert "KernelDied" in {e for _, e in _errors(_autograded(course, "crasher"))}


def test_edited_and_deleted_locked_cells_are_restored_and_run(course, graded):
    ids = _grade_ids(course, FAULTY_ON)
    assert graded["scores"]["cheater"][FAULTY_ON][0] == _max(graded, FAULTY_ON) - _points(course, ids[-1], FAULTY_ON)
    nb = _autograded(course, "cheater")
    by_id = {c.metadata.get("nbgrader", {}).get("grade_id"): c for c in nb.cells}
    assert "all tests passed" not in by_id[ids[-1]].source  # the rewritten test was replaced by the original
    assert "added back by nbgrader" in by_id[ids[0]].source  # the deleted test is back ...
    assert any("visible tests passed" in o.get("text", "") for o in by_id[ids[0]].outputs)  # ... and ran


def test_flood_of_output_is_truncated(course, graded):
    assert graded["scores"]["flooder"][FAULTY_ON][0] == _max(graded, FAULTY_ON)
    nb = _autograded(course, "flooder")
    longest = max(len(o.get("text", "")) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert longest < 20_000
    assert "truncated" in json.dumps(nbformat.writes(nb))


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_every_assignment_survives_the_four_cell_faults(course, graded, assignment):
    """A loop, a crash, an edited and a deleted locked cell, a flood: graded, and scored as it should be."""
    student = "saboteur"
    ids = _grade_ids(course, assignment)
    # the last exercise loops (and its rewritten test was put back, so it scores 0); the crash cell is skipped
    assert graded["scores"][student][assignment][0] == _max(graded, assignment) - _last_solution_points(course, assignment)
    nb = _autograded(course, student, assignment)
    errors = {e for _, e in _errors(nb)}
    assert {"CellTimeoutError", "KernelDied"} <= errors, errors
    by_id = {c.metadata.get("nbgrader", {}).get("grade_id"): c for c in nb.cells}
    assert "all tests passed" not in by_id[ids[-1]].source
    assert "added back by nbgrader" in by_id[ids[0]].source
    assert any("visible tests passed" in o.get("text", "") for o in by_id[ids[0]].outputs)
    longest = max(len(o.get("text", "")) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert longest < 20_000 and "truncated" in json.dumps(nbformat.writes(nb))


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_a_failed_check_shows_its_message_not_a_traceback(course, graded, assignment):
    """The partial student's first test fails; the cell's error and the feedback HTML hold the short message."""
    first = _grade_ids(course, assignment)[0]
    nb = _autograded(course, "partial", assignment)
    errors = [o for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == first
              for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors and errors[0].ename == "CheckFailed", errors
    shown = "\n".join(errors[0].traceback)
    assert "not implemented yet" in shown and "Hint:" in shown
    assert "course_utils/grading" not in shown and "check_" not in shown.split("Where your code")[0]
    demo.run_nbgrader(["generate_feedback", assignment, "--student", "partial"], course, check=False)
    html = next((course / "feedback" / "partial" / assignment).glob("*.html")).read_text()
    assert "not implemented yet" in html and "course_utils/grading" not in html


def test_demo_cells_are_not_run_while_grading(course, graded):
    nb = _autograded(course, "solver", "ch05")
    demos = [c for c in nb.cells if "demo" in c.metadata.get("tags", [])]
    assert demos and all("not run while grading" in "".join(o.get("text", "") for o in c.outputs) for c in demos)


def test_malformed_and_missing_notebooks_are_reported_and_the_class_graded(course, graded):
    run = graded["runs"][FAULTY_ON]
    out = run.stdout + run.stderr
    assert "There was an error processing assignment 'ch03' for student 'malformed'" in out
    assert "No notebooks were matched" in out and "absent" in out
    for student in ("malformed", "absent"):
        assert graded["scores"][student][FAULTY_ON][0] == 0.0
    for student in ("solver", "cheater", "flooder"):  # graded in the same run
        assert (course / "autograded" / student / FAULTY_ON).is_dir()


def test_feedback_and_export(course, graded):
    for assignment in ASSIGNMENTS:
        demo.run_nbgrader(["generate_feedback", assignment], course, check=False)
        html = next((course / "feedback" / "solver" / assignment).glob("*.html")).read_text()
        score, max_score = graded["scores"]["solver"][assignment]
        assert re.search(rf"Score:\s*{score:g}(\.0)?\s*/\s*{max_score:g}", html), "no score line in the feedback"
        assert "BEGIN HIDDEN TESTS" not in html  # hidden tests stay hidden
    csv_text = (course / "grades.csv").read_text()
    assert csv_text.startswith("assignment,") and "solver" in csv_text and "blank" in csv_text
