"""The course site builds without a single warning, and its pages show every output.

Builds the book exactly as `./course.sh book` does (`jupyter-book build -W -n
--keep-going .`), into a temporary folder, from the outputs committed with the
notebooks (execution is off, see _config.yml), so it takes about a minute. Then, for
every page of _toc.yml: the HTML exists, it shows each notebook's figures as images
that were written next to it, and it shows the notebook's printed output.
"""
from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_book import REPO_ROOT, load, output_texts, toc_files

BUILD_TIMEOUT_S = 900
JUPYTER_BOOK = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()"]
IMAGE_MIMES = ("image/png", "image/jpeg", "image/svg+xml")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    command = [*JUPYTER_BOOK, "build", "-W", "-n", "--keep-going", "--path-output", str(out), str(REPO_ROOT)]
    try:
        proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the site did not build within {BUILD_TIMEOUT_S} s")
    log = proc.stdout + proc.stderr
    warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    assert proc.returncode == 0 and not warnings, (
        f"jupyter-book build failed (exit code {proc.returncode}):\n" + "\n".join(warnings[:30] or log.splitlines()[-40:])
    )
    return out / "_build" / "html"


def page(site: Path, name: str) -> str:
    path = site / f"{name}.html"
    assert path.exists(), f"{path.name} was not built"
    return path.read_text(encoding="utf-8")


def test_every_toc_page_is_built(site):
    assert (site / "index.html").exists()
    for name in toc_files():
        page(site, name)


def test_intro_links_every_chapter(site):
    intro = page(site, "book/intro")
    for name in toc_files()[1:]:
        assert f'href="{Path(name).name}.html' in intro, f"book/intro.md does not link to {name}"


@pytest.mark.parametrize("name", [n for n in toc_files() if (REPO_ROOT / f"{n}.ipynb").exists()])
def test_notebook_page_shows_its_figures_and_outputs(site, name):
    notebook = load(REPO_ROOT / f"{name}.ipynb")
    text = page(site, name)
    n_figures = sum(
        1
        for cell in notebook["cells"]
        for output in cell.get("outputs", [])
        if any(mime in output.get("data", {}) for mime in IMAGE_MIMES)
    )
    images = re.findall(r'<img[^>]+src="([^"]+)"', text)
    local = [src for src in images if not src.startswith(("http:", "https:", "data:"))]
    assert len(local) >= n_figures, f"{name}: {n_figures} figures in the notebook, {len(local)} images on the page"
    for src in local:
        assert (site / Path(name).parent / src).resolve().exists(), f"{name}: image {src} is missing from the site"
    # the first printed output (the environment report) appears on the page, as text
    first_code = next(c for c in notebook["cells"] if c["cell_type"] == "code")
    report = "\n".join(output_texts(first_code)).strip().splitlines()
    assert report and html.escape(report[0]) in text, f"{name}: the first cell's output is not on the page"


def test_pages_with_widgets_embed_the_widget_state(site):
    for name in toc_files():
        path = REPO_ROOT / f"{name}.ipynb"
        if not path.exists():
            continue
        notebook = json.loads(path.read_text(encoding="utf-8"))
        has_widgets = any(
            "application/vnd.jupyter.widget-view+json" in output.get("data", {})
            for cell in notebook["cells"]
            for output in cell.get("outputs", [])
        )
        if has_widgets:
            assert 'type="application/vnd.jupyter.widget-state+json"' in page(site, name), (
                f"{name}: widgets on the page but no saved widget state to draw them from"
            )


def _chromium() -> str | None:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed (optional: apt-get install chromium)")
@pytest.mark.parametrize("name", ["book/intro", "book/appendix_a_pytorch"])
def test_page_renders_in_headless_chromium(site, name, tmp_path):
    """Optional: a real browser draws the page (text, code and figures), not a blank screen."""
    import matplotlib.image

    shot = tmp_path / "page.png"
    command = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1280,4000",
        "--virtual-time-budget=15000",  # let the theme's scripts run before the picture is taken
        f"--screenshot={shot}", (site / f"{name}.html").as_uri(),
    ]
    subprocess.run(command, capture_output=True, timeout=120)
    assert shot.exists(), "Chromium wrote no screenshot"
    pixels = matplotlib.image.imread(shot)[..., :3]  # (H, W, 3) floats in [0, 1]
    inked = (pixels.min(axis=-1) < 0.8).mean()  # share of pixels that are not (near) white
    colourful = (pixels.max(axis=-1) - pixels.min(axis=-1) > 0.3).mean()  # figures and highlighted code
    assert inked > 0.02, f"{name}: the page looks blank ({inked:.1%} of pixels drawn)"
    assert colourful > 0.001, f"{name}: nothing in colour on the page ({colourful:.2%})"
