"""Single-mistake hand-ins, graded in-process: what one mistake in one component costs.

Each :class:`Handin` is a solution notebook with exactly one solution cell replaced,
either by a correct implementation written differently or by a common mistake. It is
graded the way nbgrader grades it, without a kernel: the notebook's code cells run in one
namespace (solution cells, set-up cells; cells tagged ``demo`` are left out, as the
grader leaves them out), then every locked test cell from the replaced component on,
hidden tests included. A test cell that raises scores zero.

``lost`` is what the hand-in lost; ``should_lose`` what it ought to lose: nothing for a
correct variant, the replaced component's own cells for a mistake. Cells before the
replaced one are not run: they cannot see a definition made after them.

Run ``python -m tests.grading.handins`` (from the repository root, ``COURSE_SMOKE=1``
is set for you) to print the table; ``test_handins.py`` asserts ``lost ==
should_lose`` for every hand-in.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Handin:
    assignment: str
    component: str  # the solution cell replaced: "<grade_id>_solution"
    label: str
    source: str  # the new cell
    should_lose: tuple[str, ...] = ()  # grade_ids; empty for a correct variant

    @property
    def kind(self) -> str:
        return "mistake" if self.should_lose else "correct"


@lru_cache(maxsize=None)
def _cells(assignment: str) -> tuple[tuple[str, str, str, float], ...]:
    """(kind, grade_id, source, points) per code cell; kind is setup, solution, test or demo."""
    path = next((REPO / "solutions" / assignment).glob("*.ipynb"))
    out = []
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        meta = cell["metadata"].get("nbgrader", {})
        source = "".join(cell["source"])
        if meta.get("grade"):
            kind = "test"
        elif meta.get("solution"):
            kind = "solution"
        else:
            kind = "demo" if "demo" in cell["metadata"].get("tags", []) else "setup"
        out.append((kind, meta.get("grade_id", ""), source, float(meta.get("points", 0))))
    return tuple(out)


def points(assignment: str) -> dict[str, float]:
    return {gid: pts for kind, gid, _, pts in _cells(assignment) if kind == "test"}


def grade(handin: Handin) -> tuple[dict[str, str], float]:
    """Failed grade_ids of the hand-in (with the first line of each failure) and the seconds it took."""
    cells = _cells(handin.assignment)
    assert any(gid == handin.component for _, gid, _, _ in cells), handin.component
    namespace: dict = {"__name__": "__main__"}
    failed: dict[str, str] = {}
    reached = False
    start = time.perf_counter()
    quiet = io.StringIO()
    saved = os.environ.get("COURSE_SMOKE")
    os.environ["COURSE_SMOKE"] = "1"  # the notebooks' set-up cells at quick-mode sizes; put back afterwards
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: os.environ.pop("COURSE_SMOKE") if saved is None else os.environ.update(COURSE_SMOKE=saved))
        stack.enter_context(contextlib.redirect_stdout(quiet))
        for kind, gid, source, _ in cells:
            if kind == "demo":
                continue
            if kind == "solution" and gid == handin.component:
                source, reached = handin.source, True
            if kind == "test" and not reached:
                continue
            try:
                exec(compile(source, f"<{handin.assignment}:{gid or kind}>", "exec"), namespace)
            except Exception as exc:  # noqa: BLE001 - a failing cell scores zero, as in nbgrader
                if kind == "test":
                    failed[gid] = (str(exc).splitlines() or [type(exc).__name__])[0]
                else:
                    raise
    return failed, time.perf_counter() - start


def cost(handin: Handin) -> tuple[float, float, dict[str, str]]:
    """(points lost, points that should be lost, failures)."""
    failed, _ = grade(handin)
    pts = points(handin.assignment)
    return sum(pts[g] for g in failed), sum(pts[g] for g in handin.should_lose), failed


def main() -> None:
    from .handin_cases import HANDINS

    print("| assignment | component | kind | hand-in | points lost | should lose | seconds |")
    print("|---|---|---|---|---|---|---|")
    wrong = 0
    for h in HANDINS:
        failed, seconds = grade(h)
        pts = points(h.assignment)
        lost, should = sum(pts[g] for g in failed), sum(pts[g] for g in h.should_lose)
        wrong += set(failed) != set(h.should_lose)
        flag = "" if set(failed) == set(h.should_lose) else f" **{sorted(failed)}**"
        print(f"| {h.assignment} | {h.component.removesuffix('_solution')} | {h.kind} | {h.label} | "
              f"{lost:g}{flag} | {should:g} | {seconds:.1f} |")
    print(f"\n{len(HANDINS) - wrong} of {len(HANDINS)} hand-ins graded exactly right", file=sys.stderr)


if __name__ == "__main__":
    main()
