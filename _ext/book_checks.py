"""Sphinx extension for the course site: refuse notebooks whose stored outputs are unfit.

The site shows the outputs committed with each notebook (``execute_notebooks: "off"``
in ``_config.yml``), so myst-nb never runs a cell and cannot fail on one. This
extension restores that guarantee and checks what the site will show. For every
notebook in the build it warns (and ``jupyter-book build -W`` turns warnings into a
failed build) when:

* a cell has a stored error output (the notebook failed when its author ran it);
* a code cell was never executed, while execution is off (its output would be missing);
* an ipywidgets view has no saved widget state (it would render as an empty space).

The checks run on every build, including incremental ones where the notebook itself
is not re-read, so an unchanged broken notebook cannot slip through a warm build.
"""
from __future__ import annotations

import json
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def notebook_problems(notebook: dict, execution_off: bool) -> list[str]:
    """Reasons why the stored outputs of ``notebook`` (parsed JSON) are unfit for the site."""
    problems = []
    unexecuted = []
    saved_widgets = notebook.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    code_cells = [cell for cell in notebook.get("cells", []) if cell.get("cell_type") == "code"]
    for number, cell in enumerate(code_cells, start=1):
        where = f"code cell {number}"
        source = "".join(cell.get("source", []))
        if execution_off and source.strip() and cell.get("execution_count") is None:
            unexecuted.append(number)
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                problems.append(f"{where} has a stored error ({output.get('ename')}: {output.get('evalue')})")
            view = output.get("data", {}).get(WIDGET_VIEW)
            if view and view.get("model_id") not in saved_widgets:
                problems.append(
                    f"{where} shows a widget whose state was not saved; save the notebook with its widget state "
                    f"(JupyterLab: Settings > Save Widget State Automatically) or execute it with nbconvert/nbclient"
                )
    if unexecuted:
        shown = ", ".join(map(str, unexecuted[:10])) + (", ..." if len(unexecuted) > 10 else "")
        problems.append(
            f"{len(unexecuted)} of {len(code_cells)} code cells have not been executed (cells {shown}); "
            f"run the whole notebook in full mode and commit it with its outputs"
        )
    return problems


def check_notebooks(app: Sphinx, env, added, changed, removed) -> list[str]:
    execution_off = app.config.nb_execution_mode == "off"
    for docname in sorted(env.found_docs):
        path = Path(env.doc2path(docname))
        if path.suffix != ".ipynb":
            continue
        notebook = json.loads(path.read_text(encoding="utf-8"))
        for problem in notebook_problems(notebook, execution_off):
            logger.warning(problem, location=docname, type="course", subtype="notebook")
    return []  # nothing extra to re-read


def setup(app: Sphinx) -> dict:
    app.connect("env-get-outdated", check_notebooks)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
