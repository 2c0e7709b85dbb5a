"""Structure of the course book: the table of contents and the notebooks it lists.

Fast checks (no execution) on what the site will publish. The notebooks are committed
with the outputs of a full run (the site shows them as they are, see _config.yml), so
the outputs are checked here too: no stored errors, every cell run, top to bottom, in
full mode, and nothing in them that names the author's machine. Running the notebooks
is nbval's job (`./course.sh test` runs it over book/ in quick mode).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
BOOK_DIR = REPO_ROOT / "book"
MIN_CHECKED_CELLS = 3  # cells marked # NBVAL_CHECK_OUTPUT, whose output nbval compares
CHECK_MARKER = re.compile(r"^\s*#\s*NBVAL_CHECK_OUTPUT\b", re.MULTILINE)
EXERCISES_HEADING = re.compile(r"^#{2,3}\s+Exercises\b", re.MULTILINE)

# The same checks the site build applies (stored errors, unexecuted cells, widgets without state).
_spec = importlib.util.spec_from_file_location("book_checks", REPO_ROOT / "_ext" / "book_checks.py")
book_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(book_checks)


def toc_files() -> list[str]:
    """Every document of _toc.yml (root first), as paths relative to the repository without suffix."""
    toc = yaml.safe_load((REPO_ROOT / "_toc.yml").read_text(encoding="utf-8"))
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("chapters"))
            walk(entry.get("sections"))
            walk(entry.get("parts"))

    walk(toc.get("parts"))
    walk(toc.get("chapters"))
    return files


def toc_notebooks() -> list[Path]:
    return [REPO_ROOT / f"{name}.ipynb" for name in toc_files() if (REPO_ROOT / f"{name}.ipynb").exists()]


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def cell_text(cell: dict) -> str:
    return "".join(cell.get("source", []))


def output_texts(cell: dict) -> list[str]:
    """The text a reader sees in a cell's outputs (images left out)."""
    texts = []
    for output in cell.get("outputs", []):
        if "text" in output:
            texts.append("".join(output["text"]))
        for mime, value in output.get("data", {}).items():
            if mime.startswith("text/"):
                texts.append("".join(value) if isinstance(value, list) else str(value))
        texts.extend(output.get("traceback", []))
    return texts


def machine_paths() -> list[str]:
    """Absolute paths that would only make sense on the machine that ran a notebook."""
    candidates = {str(REPO_ROOT), str(Path.home()), sys.prefix, tempfile.gettempdir()}
    return sorted(p for p in candidates if len(p) > 4)  # skip "/" or "/tmp"-like stubs that are too short


# anyone's home folder, on Linux, macOS or Windows; Python installations
GENERIC_PATHS = re.compile(
    r"(?<![\w.])(?:/home/\w[\w.-]*/|/Users/\w[\w.-]*/|/root/|[A-Za-z]:\\Users\\|/tmp/[\w.-]+|\S*site-packages[/\\])"
)

NOTEBOOKS = toc_notebooks()
IDS = [path.stem for path in NOTEBOOKS]


def test_toc_lists_existing_documents():
    missing = [name for name in toc_files() if not any((REPO_ROOT / f"{name}{ext}").exists() for ext in (".ipynb", ".md"))]
    assert not missing, f"_toc.yml lists documents that do not exist: {missing}"


def test_every_book_notebook_is_in_the_toc():
    listed = {str(path.relative_to(REPO_ROOT).with_suffix("")) for path in BOOK_DIR.glob("*.ipynb")}
    missing = sorted(listed - set(toc_files()))
    assert not missing, f"notebooks in book/ that _toc.yml does not list (add them, or they never reach the site): {missing}"


def test_toc_lists_the_intro_and_at_least_one_notebook():
    assert toc_files()[0] == "book/intro" and (BOOK_DIR / "intro.md").exists()
    assert NOTEBOOKS, "no notebook of _toc.yml exists yet"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_valid_nbformat(path):
    nbformat = pytest.importorskip("nbformat")
    nbformat.validate(nbformat.read(path, as_version=4))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_starts_with_a_title(path):
    cells = load(path)["cells"]
    first = cells[0] if cells else {}
    assert first.get("cell_type") == "markdown" and cell_text(first).lstrip().startswith("# "), (
        f"{path.name}: the first cell must be markdown starting with a '# Title' line (the page title on the site)"
    )
    titles = [c for c in cells if c["cell_type"] == "markdown" and re.search(r"^# ", cell_text(c), re.MULTILINE)]
    assert len(titles) == 1, f"{path.name}: exactly one '# ' title, found {len(titles)} (use '## ' for sections)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_ends_with_exercises(path):
    markdown = [cell_text(c) for c in load(path)["cells"] if c["cell_type"] == "markdown"]
    assert any(EXERCISES_HEADING.search(text) for text in markdown), f"{path.name}: no '## Exercises' section"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_has_checked_outputs(path):
    code = [cell_text(c) for c in load(path)["cells"] if c["cell_type"] == "code"]
    checked = sum(bool(CHECK_MARKER.search(text)) for text in code)
    assert checked >= MIN_CHECKED_CELLS, (
        f"{path.name}: {checked} cells marked '# NBVAL_CHECK_OUTPUT', want at least {MIN_CHECKED_CELLS} "
        f"(cells whose output does not depend on quick mode, so nbval can compare it)"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_outputs_fit_the_site(path):
    problems = book_checks.notebook_problems(load(path), execution_off=True)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_was_run_top_to_bottom_in_full_mode(path):
    code = [c for c in load(path)["cells"] if c["cell_type"] == "code" and cell_text(c).strip()]
    counts = [c.get("execution_count") for c in code]
    assert all(isinstance(n, int) for n in counts), f"{path.name}: unexecuted cells (execution counts {counts})"
    assert counts == sorted(counts) and len(set(counts)) == len(counts), (
        f"{path.name}: cells were run out of order ({counts}); restart the kernel and run all cells"
    )
    first = code[0] if code else {}
    assert "environment_report(" in cell_text(first), f"{path.name}: the first code cell must print environment_report()"
    report = "\n".join(output_texts(first))
    assert "quick mode off" in report, (
        f"{path.name}: the stored outputs come from a quick-mode run ({report.strip()!r}); "
        f"the site publishes them, so run the notebook without COURSE_SMOKE before committing"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_names_no_path_of_the_authors_machine(path):
    found = []
    for number, cell in enumerate(load(path)["cells"], start=1):
        for text in [cell_text(cell), *output_texts(cell)]:
            found += [f"cell {number}: {p}" for p in machine_paths() if p in text]
            found += [f"cell {number}: {m}" for m in GENERIC_PATHS.findall(text)]
    assert not found, f"{path.name} contains absolute paths (print relative paths or file names):\n" + "\n".join(found[:20])


def test_sanitizer_file_parses():
    patterns = re.findall(r"^regex: (.*)$\n^replace: (.*)$", (REPO_ROOT / "nbval_sanitize.cfg").read_text(encoding="utf-8"), re.MULTILINE)
    assert len(patterns) >= 5
    for regex, replace in patterns:
        re.sub(regex, replace, "0x7f3a2b1c4d5e 1.5 s /tmp/tmpab12cd34/x.pt")  # compiles, and the replacement is valid
    sanitized = "any text"
    for regex, replace in patterns:
        sanitized = re.sub(regex, replace, sanitized)
    assert sanitized == "any text", "a sanitizer pattern matches ordinary text"


# --- starting from the site: a downloaded notebook installs what it imports ---------------

GUARD_CHECK = 'importlib.util.find_spec("course_utils") is None'


def repository_url() -> str:
    return yaml.safe_load((REPO_ROOT / "_config.yml").read_text(encoding="utf-8"))["repository"]["url"]


def _guard_of(path: Path) -> str:
    first = cell_text(next(c for c in load(path)["cells"] if c["cell_type"] == "code"))
    lines = first.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if "import importlib.util" in line), None)
    assert start is not None and GUARD_CHECK in first, (
        f"{path.name}: the first code cell must install the course package where it is missing "
        f"(see tests/test_book.py: `if {GUARD_CHECK}: %pip install ...`)"
    )
    return "".join(lines[start:start + 3])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_first_cell_installs_the_course_package_only_where_missing(path, monkeypatch):
    from IPython.core.inputtransformer2 import TransformerManager
    import importlib.util

    code = TransformerManager().transform_cell(_guard_of(path))  # %pip -> get_ipython().run_line_magic(...)
    calls = []

    class Shell:
        def run_line_magic(self, name, line):
            calls.append((name, line))

    exec(code, {"get_ipython": Shell})  # course_utils is installed here: nothing happens
    assert calls == [], f"{path.name}: the guard ran pip although course_utils is installed"

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "course_utils" else real(name, *a))
    exec(code, {"get_ipython": Shell})  # as on Colab
    assert len(calls) == 1 and calls[0][0] == "pip", calls
    assert f"git+{repository_url()}" in calls[0][1], f"{path.name}: installs from {calls[0][1]!r}, not the repository in _config.yml"


def test_repository_url_is_the_one_of_config_everywhere():
    url = repository_url()
    assert url.startswith("https://github.com/"), "the launch buttons (Colab, Binder) need a GitHub repository"
    for doc in ("README.md", "book/intro.md", "pyproject.toml"):
        text = (REPO_ROOT / doc).read_text(encoding="utf-8")
        found = set(re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", text)) - {url}
        assert url in text, f"{doc} does not name the repository {url}"
        assert not found, f"{doc} names another repository: {sorted(found)}"
