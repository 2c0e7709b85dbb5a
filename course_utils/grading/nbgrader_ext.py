"""nbgrader add-ons that keep one student's broken notebook from spoiling a grading run.

:class:`RobustExecute` replaces nbgrader's ``Execute`` preprocessor in
``nbgrader_config.py``. It behaves the same (cells that raise or time out score
zero, the rest run on) and adds two things nbgrader 0.9 lacks:

* **Kernel crashes are graded, not fatal.** When the kernel dies in a cell (``os._exit``,
  a segfault, running out of memory), nbgrader would drop the student's whole
  submission and fail the run. Here the cell gets an error output saying so, a
  fresh kernel re-runs the notebook with that cell skipped, and the cells after it
  are graded normally. After ``max_kernel_restarts`` crashes the remaining cells are
  marked as not run (scoring zero).
* **Demo cells cost no grading time.** A code cell tagged ``demo`` (one that only shows
  things: a training run, a generated text) and carrying no nbgrader metadata is not
  run; its output says so. Solution and test cells always run, whatever their tags.
* **Output is capped while it arrives.** A cell printing in a loop would hold every
  line in memory until nbgrader's ``LimitOutput`` trims it afterwards; here a cell's
  stream output stops growing after ``max_output_chars`` characters, with a note.

This module imports no torch: nbgrader loads it with its configuration.
"""
from __future__ import annotations

import copy
import typing as t

from nbclient.exceptions import DeadKernelError
from nbformat import NotebookNode
from traitlets import Integer

from nbgrader.preprocessors import Execute

CRASH_ENAME = "KernelDied"
DEMO_TAG = "demo"
DEMO_NOTE = "(a demo cell, tagged 'demo': not run while grading)\n"


def is_demo_cell(cell: NotebookNode) -> bool:
    """A code cell tagged ``demo`` that is neither a solution nor a test cell."""
    return (cell.cell_type == "code" and DEMO_TAG in cell.metadata.get("tags", [])
            and not cell.metadata.get("nbgrader", {}).get("grade") and not cell.metadata.get("nbgrader", {}).get("solution"))


def _error_output(ename: str, evalue: str) -> NotebookNode:
    return NotebookNode(output_type="error", ename=ename, evalue=evalue, traceback=[f"{ename}: {evalue}"])


class RobustExecute(Execute):
    """nbgrader's ``Execute`` that survives kernel crashes and floods of output."""

    max_kernel_restarts = Integer(
        3, help="How many kernel crashes in one notebook are skipped over before giving up on the rest."
    ).tag(config=True)

    max_output_chars = Integer(
        100_000, help="Stream output kept per cell, in characters (-1: no limit); the rest is dropped."
    ).tag(config=True)

    def preprocess(self, nb: NotebookNode, resources: t.Any = None, km: t.Any = None):
        pristine = copy.deepcopy(nb)
        self._skip: dict[int, NotebookNode] = {}
        for _attempt in range(self.max_kernel_restarts + 1):
            work = copy.deepcopy(pristine)
            self._current_index = -1
            try:
                return super().preprocess(work, resources, km)
            except DeadKernelError:
                index = self._current_index
                self.log.warning("The kernel died in cell %d; re-running the notebook without it.", index)
                self._skip[index] = _error_output(
                    CRASH_ENAME,
                    "the kernel stopped while running this cell (a crash, os._exit, or too much memory). "
                    "The cell scores zero; the notebook was re-run without it.",
                )
        # too many crashes: grade what ran before the last one, mark the rest as not run
        self.log.error("The kernel died %d times; the remaining cells are not graded.", len(self._skip))
        last = max(self._skip)
        for index, cell in enumerate(work.cells):
            if cell.cell_type == "code" and index >= last:
                cell.outputs = [_error_output(CRASH_ENAME, "not run: the kernel kept crashing in this notebook.")]
        return work, resources

    def preprocess_cell(self, cell: NotebookNode, resources: t.Any, index: int):
        self._current_index = index
        if index in self._skip:
            cell.outputs = [copy.deepcopy(self._skip[index])]
            cell.execution_count = None
            return cell, resources
        if is_demo_cell(cell):
            cell.outputs = [NotebookNode(output_type="stream", name="stdout", text=DEMO_NOTE)]
            cell.execution_count = None
            return cell, resources
        self._chars_kept = 0
        self._truncated = False
        return super().preprocess_cell(cell, resources, index)

    def output(self, outs: list, msg: dict, display_id: t.Any, cell_index: int):
        if self.max_output_chars >= 0 and msg.get("msg_type") == "stream":
            text = msg["content"].get("text", "")
            room = self.max_output_chars - self._chars_kept
            if room <= 0:
                if not self._truncated:
                    self._truncated = True
                    note = f"\n... output truncated: more than {self.max_output_chars} characters ...\n"
                    msg = {**msg, "content": {**msg["content"], "text": note}}
                    return super().output(outs, msg, display_id, cell_index)
                return None
            if len(text) > room:
                text = text[:room]
            self._chars_kept += len(text)
            msg = {**msg, "content": {**msg["content"], "text": text}}
        return super().output(outs, msg, display_id, cell_index)
