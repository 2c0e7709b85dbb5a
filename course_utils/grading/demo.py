"""Grade a demo class end to end with nbgrader, in a temporary course directory.

``python -m course_utils.grading.demo`` (or ``./course.sh grade-demo``) copies
``solutions/`` and ``nbgrader_config.py`` into a fresh folder, generates the student
versions, hands in work for a made-up class, autogrades it, writes feedback, exports
the grades and prints the score table with the time each step took. The repository
itself is never written to.

The class:

* ``solver`` hands in the solutions of every assignment (full marks expected);
* ``blank`` hands in the untouched student versions (zero expected);
* faulty students, on the assignments given by ``--faulty`` (default ``ch03``):
  ``looper`` (the last exercise's code cell loops forever before defining anything), ``crasher`` (a code cell
  kills the kernel with ``os._exit``), ``cheater`` (leaves the last exercise
  undone, rewrites its locked test to print "passed" and deletes the first test
  cell), ``flooder`` (correct, but prints 200,000 lines), ``partial`` (leaves the first
  exercise undone: its test fails with a short message), ``saboteur`` (all four cell faults
  in one notebook: floods output in the first solution, kills the kernel in a cell of
  its own after it, deletes the first test cell, loops forever in the last solution and
  rewrites the last test to print "passed"), ``malformed`` (the file is
  not JSON) and ``absent`` (hands in a folder without the notebook).

The pipeline tests (``tests/grading/test_pipeline.py``) build their class with the
same functions.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import nbformat

REPO_ROOT = Path(__file__).resolve().parents[2]  # course_utils/grading/demo.py -> the repository
FAULTY_KINDS = ("looper", "crasher", "cheater", "flooder", "saboteur", "partial", "malformed", "absent")
FILE_FAULTS = ("malformed", "absent")  # faults of the handed-in file, not of its cells


# --- the course directory ----------------------------------------------------------------


def find_assignments(solutions_dir: Path) -> list[str]:
    """Assignment names: the folders of ``solutions_dir`` that hold notebooks."""
    return sorted(p.name for p in Path(solutions_dir).iterdir() if p.is_dir() and any(p.glob("*.ipynb")))


def run_nbgrader(args: Sequence[str], course_dir: Path, *, check: bool = True, timeout: float | None = 900,
                 extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``nbgrader <args>`` in ``course_dir`` (quick mode on); output captured as text."""
    env = {**os.environ, "COURSE_SMOKE": os.environ.get("COURSE_SMOKE", "1"), **(extra_env or {})}
    env.pop("COURSE_NBGRADER_ROOT", None)  # the course root is the folder of the copied config
    result = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course_dir, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"nbgrader {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def make_course_dir(course_dir: Path, repo_root: Path = REPO_ROOT) -> list[str]:
    """Copy ``solutions/`` and ``nbgrader_config.py`` into ``course_dir``; return the assignments."""
    course_dir = Path(course_dir)
    course_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(repo_root / "solutions", course_dir / "solutions", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    shutil.copy(repo_root / "nbgrader_config.py", course_dir / "nbgrader_config.py")
    return find_assignments(course_dir / "solutions")


def generate_all(course_dir: Path, assignments: Sequence[str]) -> None:
    """``nbgrader generate_assignment`` for each assignment (into ``exercises/``)."""
    for assignment in assignments:
        run_nbgrader(["generate_assignment", assignment, "--force"], course_dir)


# --- students ------------------------------------------------------------------------------


def _cells(nb, *, solution: bool = False, grade: bool = False) -> list:
    out = []
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if (solution and meta.get("solution")) or (grade and meta.get("grade")):
            out.append(cell)
    return out


def faulty_notebook(kind: str, source_nb: Path, release_nb: Path) -> str | None:
    """Text of the notebook a faulty student of ``kind`` hands in (None: no notebook)."""
    nb = nbformat.read(source_nb, as_version=4)
    solutions = _cells(nb, solution=True)
    tests = _cells(nb, grade=True)
    if kind == "looper":
        solutions[-1].source = "while True:  # never finishes\n    pass\n\n" + solutions[-1].source
    elif kind == "crasher":
        solutions[len(solutions) // 2].source += "\n\nimport os\nos._exit(1)  # the kernel dies here\n"
    elif kind == "cheater":
        stub = nbformat.read(release_nb, as_version=4)
        last_id = solutions[-1].metadata["nbgrader"]["grade_id"]
        solutions[-1].source = next(c.source for c in stub.cells
                                    if c.metadata.get("nbgrader", {}).get("grade_id") == last_id)
        tests[-1].source = 'print("all tests passed")'
        nb.cells.remove(tests[0])
    elif kind == "saboteur":
        solutions[0].source += "\n\nfor i in range(200_000):\n    print('debugging line', i)\n"
        crash = nbformat.v4.new_code_cell("import os\nos._exit(1)  # the kernel dies here")
        nb.cells.insert(nb.cells.index(solutions[0]) + 1, crash)
        solutions[-1].source = "while True:  # never finishes\n    pass\n\n" + solutions[-1].source
        tests[-1].source = 'print("all tests passed")'
        nb.cells.remove(tests[0])
    elif kind == "partial":
        stub = nbformat.read(release_nb, as_version=4)
        first_id = solutions[0].metadata["nbgrader"]["grade_id"]
        solutions[0].source = next(c.source for c in stub.cells
                                   if c.metadata.get("nbgrader", {}).get("grade_id") == first_id)
    elif kind == "flooder":
        solutions[0].source += "\n\nfor i in range(200_000):\n    print('debugging line', i)\n"
    elif kind == "malformed":
        return '{"cells": [ this is not JSON'
    elif kind == "absent":
        return None
    else:
        raise ValueError(f"unknown faulty student {kind!r}; choose from {FAULTY_KINDS}")
    return nbformat.writes(nb)


def submit(course_dir: Path, student: str, assignment: str, notebooks: dict[str, str | None]) -> None:
    """Place a student's work in ``submitted/<student>/<assignment>/`` (None: leave a note only)."""
    folder = Path(course_dir) / "submitted" / student / assignment
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in notebooks.items():
        if text is None:
            (folder / "notes.txt").write_text("I forgot to upload my notebook.\n")
        else:
            (folder / f"{name}.ipynb").write_text(text)


def make_class(course_dir: Path, assignments: Sequence[str], faulty_on: Sequence[str] = ("ch03",),
               faulty_kinds: Sequence[str] = FAULTY_KINDS, file_faults_on: Sequence[str] | None = None) -> list[str]:
    """Hand in work for ``solver`` and ``blank`` on every assignment, and faulty students on ``faulty_on``
    (the file faults, malformed and absent, only on ``file_faults_on`` when it is given)."""
    course_dir = Path(course_dir)
    students = ["solver", "blank"]
    for assignment in assignments:
        for source in sorted((course_dir / "solutions" / assignment).glob("*.ipynb")):
            release = course_dir / "exercises" / assignment / source.name
            submit(course_dir, "solver", assignment, {source.stem: source.read_text()})
            submit(course_dir, "blank", assignment, {source.stem: release.read_text()})
            if assignment in faulty_on:
                for kind in faulty_kinds:
                    if kind in FILE_FAULTS and file_faults_on is not None and assignment not in file_faults_on:
                        continue
                    submit(course_dir, kind, assignment, {source.stem: faulty_notebook(kind, source, release)})
    if faulty_on:
        students += list(faulty_kinds)
    roster = course_dir / "roster.csv"  # so that a student with no notebook still gets a row
    roster.write_text("id\n" + "".join(f"{student}\n" for student in students))
    run_nbgrader(["db", "student", "import", str(roster)], course_dir)
    return students


# --- grading -------------------------------------------------------------------------------


def autograde(course_dir: Path, assignment: str, student: str | None = None,
              extra_args: Sequence[str] = ()) -> tuple[subprocess.CompletedProcess, float]:
    """Autograde one assignment (one student or the class); returns (result, seconds)."""
    args = ["autograde", assignment, *extra_args]
    if student:
        args += ["--student", student]
    start = time.perf_counter()
    result = run_nbgrader(args, course_dir, check=False)
    return result, time.perf_counter() - start


def scores(course_dir: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """student -> assignment -> (score, max score), from ``nbgrader export``'s CSV."""
    run_nbgrader(["export", "--to", "grades.csv"], course_dir)
    table: dict[str, dict[str, tuple[float, float]]] = {}
    with open(Path(course_dir) / "grades.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            table.setdefault(row["student_id"], {})[row["assignment"]] = (float(row["score"]), float(row["max_score"]))
    return table


def format_table(table: dict[str, dict[str, tuple[float, float]]], assignments: Sequence[str]) -> str:
    """Scores as a Markdown table, one row per student."""
    head = "| student | " + " | ".join(assignments) + " | total |"
    rule = "|---|" + "---|" * (len(assignments) + 1)
    rows = [head, rule]
    for student in sorted(table):
        cells, total, total_max = [], 0.0, 0.0
        for assignment in assignments:
            score, max_score = table[student].get(assignment, (0.0, 0.0))
            cells.append(f"{score:g} / {max_score:g}")
            total, total_max = total + score, total_max + max_score
        rows.append(f"| {student} | " + " | ".join(cells) + f" | {total:g} / {total_max:g} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="course directory to use (default: a new temporary folder)")
    parser.add_argument("--faulty", nargs="*", default=["ch03"], help="assignments the faulty students hand in")
    parser.add_argument("--timeout", type=int, default=20, help="per-cell time limit in seconds (config: 120)")
    args = parser.parse_args(argv)

    course_dir = args.dir or Path(tempfile.mkdtemp(prefix="grade-demo-"))
    timings: list[tuple[str, float]] = []

    def timed(label, fn, *a, **k):
        start = time.perf_counter()
        out = fn(*a, **k)
        timings.append((label, time.perf_counter() - start))
        return out

    assignments = make_course_dir(course_dir)
    print(f"course directory: {course_dir}\nassignments: {', '.join(assignments)}", flush=True)
    timed("generate_assignment (all)", generate_all, course_dir, assignments)
    students = timed("hand in", make_class, course_dir, assignments, args.faulty)
    print(f"students: {', '.join(students)}", flush=True)
    limit = [f"--Execute.timeout={args.timeout}"]
    solver_total = 0.0
    for assignment in assignments:
        _, seconds = autograde(course_dir, assignment, "solver", limit)
        solver_total += seconds
        timings.append((f"autograde {assignment}, one student (solver)", seconds))
        print(f"autograded {assignment} for solver in {seconds:.1f} s", flush=True)
    timings.append(("autograde all assignments, one student (solver)", solver_total))
    for assignment in assignments:
        result, seconds = autograde(course_dir, assignment, None, limit)
        timings.append((f"autograde {assignment}, rest of the class", seconds))
        failed = [line for line in (result.stdout + result.stderr).splitlines() if "There was an error processing" in line]
        print(f"autograded {assignment} for the class in {seconds:.1f} s" + (f"; reported: {len(failed)} error(s)" if failed else ""), flush=True)
        for line in failed:
            print("   ", line.split("]", 1)[-1].strip())
    for assignment in assignments:
        timed(f"generate_feedback {assignment}", run_nbgrader, ["generate_feedback", assignment], course_dir, check=False)
    table = timed("export", scores, course_dir)
    print("\n" + format_table(table, assignments) + "\n")
    width = max(len(label) for label, _ in timings)
    for label, seconds in timings:
        print(f"{label:<{width}}  {seconds:6.1f} s")
    print(f"\nfeedback: {course_dir / 'feedback'}\ngrades:   {course_dir / 'grades.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
