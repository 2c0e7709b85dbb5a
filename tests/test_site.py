"""The course site builds without a single warning, and its pages show every output.

Builds the book exactly as `./course.sh book` does (`jupyter-book build -W -n
--keep-going .`), into a temporary folder, from the outputs committed with the
notebooks (execution is off, see _config.yml), so it takes about a minute. Then, for
every page of _toc.yml: the HTML exists, it shows each notebook's figures as images
that were written next to it, and it shows the notebook's printed output.
"""
from __future__ import annotations

import functools
import html
import http.server
import json
import os
import re
import shutil
import socketserver
import subprocess
import sys
import threading
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


# --- the pages in a real browser ---------------------------------------------------------
#
# Chromium (Debian's package) driven by Playwright for Python, over a loopback HTTP server.
# Where no Chromium is installed the browser tests skip, except when COURSE_REQUIRE_BROWSER=1
# (.ci/run sets it after installing Chromium): there a missing browser is a failure.

BROWSER_REQUIRED = os.environ.get("COURSE_REQUIRE_BROWSER", "") == "1"
SCREENSHOTS = Path(os.environ.get("COURSE_SCREENSHOTS", REPO_ROOT / "_build" / "screenshots"))


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    missing = None
    if _chromium() is None:
        missing = "no Chromium on this machine (Debian/Ubuntu: apt-get install chromium)"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            missing = "Playwright for Python is not installed (pip install playwright; it drives the system Chromium)"
    if missing:
        if BROWSER_REQUIRED:
            pytest.fail(f"the browser tests are required here (COURSE_REQUIRE_BROWSER=1) but {missing}")
        pytest.skip(missing)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def served(site):
    """The built site on http://127.0.0.1:PORT/ (a thread of the test process)."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output readable
        pass


PAGE_PROBE = """() => {
  const maths = Array.from(document.querySelectorAll("span.math, div.math"));
  const untypeset = maths.filter(m => !m.querySelector("mjx-container")).map(m => m.textContent.slice(0, 60));
  const images = Array.from(document.querySelectorAll("article img")).map(i => [i.getAttribute("src"), i.complete && i.naturalWidth > 0]);
  const views = document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]').length;
  const drawn = Array.from(document.querySelectorAll(".jupyter-widgets")).filter(w => w.getBoundingClientRect().height > 0).length;
  const visible = e => e.getClientRects().length > 0 && getComputedStyle(e).visibility !== "hidden";
  const searches = Array.from(document.querySelectorAll("form.bd-search, .search-button-field, button.search-button")).filter(visible).length;
  return {
    title: document.title,
    maths: maths.length, untypeset,
    images, views, drawn, searches,
    prev: !!document.querySelector("a.left-prev"), next: !!document.querySelector("a.right-next"),
    text: document.querySelector("article") ? document.querySelector("article").innerText.length : 0,
  };
}"""


def _load(browser, url: str, screenshot: Path | None = None) -> tuple[dict, list[str], list[str]]:
    """Open ``url``; return the probe's findings, console errors and requests that left loopback."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors, outside = [], []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
    page.on("requestfailed", lambda request: errors.append(f"request failed: {request.url}"))
    page.on("response", lambda response: errors.append(f"HTTP {response.status}: {response.url}") if response.status >= 400 else None)
    page.on("request", lambda request: outside.append(request.url)
            if not request.url.startswith(("http://127.0.0.1", "file://", "data:", "blob:")) else None)
    page.goto(url, wait_until="networkidle")
    page.wait_for_function("() => !window.MathJax || !window.MathJax.startup || !!window.MathJax.startup.document", timeout=30000)
    page.wait_for_timeout(1000)  # the widget manager renders after load
    found = page.evaluate(PAGE_PROBE)
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
    page.close()
    return found, errors, outside


@pytest.mark.parametrize("name", toc_files())
def test_page_works_in_a_real_browser(site, served, browser, name):
    source = page(site, name)
    found, errors, outside = _load(browser, f"{served}/{name}.html", SCREENSHOTS / f"{Path(name).name}.png")
    assert not errors, f"{name}: console errors: {errors[:5]}"
    assert not outside, f"{name}: requests outside the site: {sorted(set(outside))[:5]}"
    assert found["text"] > 200, f"{name}: the article shows almost no text"
    assert not found["untypeset"], f"{name}: math left as TeX: {found['untypeset'][:3]}"
    if 'class="math' in source:
        assert found["maths"] > 0
    broken = [src for src, ok in found["images"] if not ok]
    assert not broken, f"{name}: images that did not load: {broken[:5]}"
    assert found["drawn"] >= found["views"], f"{name}: {found['views']} widgets saved, {found['drawn']} drawn"
    assert found["searches"] <= 1, f"{name}: {found['searches']} search boxes at 1280 px"
    title = found["title"]
    assert title.count("LLMs from Scratch") <= 1, f"{name}: the title repeats the site name: {title!r}"
    if name != toc_files()[0]:
        assert found["prev"], f"{name}: no link to the previous page"
    if name != toc_files()[-1]:
        assert found["next"], f"{name}: no link to the next page"


def test_a_chapter_opened_from_disk_shows_math_and_widgets(site, browser):
    """No server at all: a reader double-clicks the HTML file."""
    name = "book/ch03_attention"
    found, errors, outside = _load(browser, (site / f"{name}.html").as_uri())
    assert not outside, f"requests outside the site: {sorted(set(outside))[:5]}"
    assert found["maths"] > 0 and not found["untypeset"]
    assert found["views"] > 0 and found["drawn"] >= found["views"]
    assert all(ok for _, ok in found["images"])


def _internal_links(html_text: str) -> list[str]:
    return [href for href in re.findall(r'<a[^>]+href="([^"]+)"', html_text)
            if not href.startswith(("http:", "https:", "mailto:", "javascript:", "#"))]


def test_no_internal_link_is_broken(site):
    broken = []
    anchors: dict[Path, set[str]] = {}
    for path in site.rglob("*.html"):
        if "_static" in path.parts:
            continue
        for href in _internal_links(path.read_text(encoding="utf-8")):
            target, _, anchor = html.unescape(href).partition("#")
            target = target.split("?")[0]
            resolved = (path.parent / target).resolve() if target else path
            if resolved.is_dir():
                resolved = resolved / "index.html"
            if not resolved.exists():
                broken.append(f"{path.relative_to(site)} -> {href}")
                continue
            if anchor and resolved.suffix == ".html":
                if resolved not in anchors:
                    anchors[resolved] = set(re.findall(r'id="([^"]+)"', resolved.read_text(encoding="utf-8")))
                if anchor not in anchors[resolved]:
                    broken.append(f"{path.relative_to(site)} -> {href} (no such anchor)")
    assert not broken, f"{len(broken)} broken internal links, e.g. {broken[:8]}"
