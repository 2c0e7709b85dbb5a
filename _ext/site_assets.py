"""Serve the site's scripts from the site itself, so pages work offline and from disk.

Sphinx loads MathJax from a CDN, and myst-nb loads RequireJS and the ipywidgets HTML
manager (which draws saved widget state) from CDNs too: offline, every formula shows
as raw TeX and every widget as an empty box. This extension copies pinned releases of
those three npm packages into the site's ``_static/`` folder and points the pages at
the copies:

* ``mathjax`` (es5 build: ``tex-chtml.js``, its fonts and extensions) -> ``_static/mathjax/``
* ``requirejs`` (``require.js``) -> ``_static/require.js``
* ``@jupyter-widgets/html-manager`` (``dist/embed-amd.js``, which bundles the standard
  widgets) -> ``_static/html-manager/embed-amd.js``, with its one web-font import
  (Google Fonts' Roboto Mono) removed, so nothing is fetched from a font CDN; the
  widgets fall back to the page's monospace font.

The packages are downloaded from the npm registry on the first build (plain HTTPS: npm
itself is not needed) and kept, checked against the sha512 pinned below, in
``.cache/site-assets/``. An offline machine can place the same ``.tgz`` files there.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE = REPO_ROOT / ".cache" / "site-assets"


@dataclass(frozen=True)
class NpmAsset:
    name: str
    version: str
    integrity: str  # npm's "sha512-<base64>" of the tarball, as `npm view NAME@VERSION dist.integrity` prints it
    source: str  # path inside the package (a file or a folder)
    target: str  # path under _static/
    suffixes: tuple[str, ...] = ()  # from a folder, copy only files with these endings (all when empty)

    @property
    def tarball(self) -> Path:
        return CACHE / f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"


ASSETS = [
    NpmAsset("mathjax", "3.2.2",
             "sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw==",
             "es5", "mathjax"),
    NpmAsset("requirejs", "2.3.8",
             "sha512-7/cTSLOdYkNBNJcDMWf+luFvMriVm7eYxp4BcFCsAX0wF421Vyce5SXP17c+Jd5otXKGNehIonFlyQXSowL6Mw==",
             "require.js", "require.js"),
    NpmAsset("@jupyter-widgets/html-manager", "1.0.15",
             "sha512-5thBIV6ymNgmPVOHvzx+gGy8ZSKmSazhtGw4/c4xJDVzRhG9PTeQsRjF3FUTopvFi//SABeNz1yp47bCrJ3CQA==",
             "dist", "html-manager", ("embed-amd.js", ".woff", ".woff2", ".ttf", ".eot", ".svg")),
]
STATIC = CACHE / "static"  # what is added to html_static_path
OWN_STATIC = Path(__file__).resolve().parent / "static"  # site-compat.js, committed
FONT_IMPORT = re.compile(r"@import url\((?:\\?[\"'])?https://fonts\.googleapis\.com/[^)]*\);?")


class SiteAssetError(RuntimeError):
    pass


def integrity_of(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def tarball_url(asset: NpmAsset) -> str:
    """Where the npm registry keeps a package's tarball (COURSE_NPM_REGISTRY for a mirror)."""
    registry = os.environ.get("COURSE_NPM_REGISTRY", "https://registry.npmjs.org").rstrip("/")
    basename = asset.name.split("/")[-1]
    return f"{registry}/{asset.name}/-/{basename}-{asset.version}.tgz"


def fetch(asset: NpmAsset) -> Path:
    """The package's tarball, from the cache or the npm registry (no npm needed), checked against the pinned hash."""
    CACHE.mkdir(parents=True, exist_ok=True)
    if not asset.tarball.exists():
        url = tarball_url(asset)
        partial = asset.tarball.with_suffix(".part")
        try:
            with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as err:
            partial.unlink(missing_ok=True)
            raise SiteAssetError(
                f"The site serves {asset.name} {asset.version} itself and downloads it once from the npm registry, "
                f"but {url} could not be fetched ({err}). Connect once (it is then kept in {CACHE}), set "
                f"COURSE_NPM_REGISTRY to a mirror, or put {asset.tarball.name} (from `npm pack "
                f"{asset.name}@{asset.version}` on another machine) into {CACHE}."
            ) from err
        found = integrity_of(partial)
        if found != asset.integrity:
            partial.unlink()
            raise SiteAssetError(
                f"{url} does not match its pinned hash (got {found[:24]}..., expected {asset.integrity[:24]}...); "
                f"nothing was kept. A registry mirror serving other files? Build again to retry."
            )
        os.replace(partial, asset.tarball)
    found = integrity_of(asset.tarball)
    if found != asset.integrity:
        asset.tarball.unlink()
        raise SiteAssetError(
            f"{asset.tarball.name} does not match its pinned hash (got {found[:24]}..., expected "
            f"{asset.integrity[:24]}...); the file was removed, build again to fetch it anew."
        )
    return asset.tarball


def unpack(asset: NpmAsset) -> None:
    """Copy the asset's file or folder out of the tarball into STATIC/target (once per version)."""
    marker = STATIC / f".{asset.tarball.name}.done"
    if marker.exists():
        return
    target = STATIC / asset.target
    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    prefix = f"package/{asset.source}"
    with tarfile.open(fetch(asset)) as archive:
        for member in archive.getmembers():
            if not member.isfile() or not (member.name == prefix or member.name.startswith(prefix + "/")):
                continue
            if asset.suffixes and not member.name.endswith(asset.suffixes):
                continue
            dest = target / member.name[len(prefix) + 1:] if member.name != prefix else target
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(archive.extractfile(member).read())
    bundle = target / "embed-amd.js"
    if bundle.exists():
        bundle.write_text(FONT_IMPORT.sub("", bundle.read_text(encoding="utf-8")), encoding="utf-8")
    marker.write_text(asset.integrity, encoding="utf-8")


def prepare_assets() -> Path:
    for asset in ASSETS:
        unpack(asset)
    return STATIC


def _on_config_inited(app, config) -> None:
    static = prepare_assets()
    config.html_static_path = [*config.html_static_path, str(static), str(OWN_STATIC)]
    # pydata-sphinx-theme reads the colour mode from the page; without a default it logs
    # "Got invalid theme mode" on every page
    config.html_context = {**config.html_context, "default_mode": "light"}
    # pydata-sphinx-theme 0.17 puts a search box in a header bar that sphinx-book-theme's
    # sidebar already has: keep the sidebar's, drop the header's (and the empty header)
    config.html_theme_options = {**config.html_theme_options, "navbar_persistent": []}
    config.html_css_files = [*config.html_css_files, "site.css"]
    # sphinx-thebe writes a kernel configuration into every page even with thebe off; without a
    # repository it names an example repository of Binder's. Point it at ours (_config.yml).
    repository = config.html_theme_options.get("repository_url")
    if repository and "thebe_config" in config:
        config.thebe_config = {**(config.thebe_config or {}), "repository_url": repository,
                               "repository_branch": config.html_theme_options.get("repository_branch", "main")}
    if not config.html_favicon:  # without one, browsers ask the server for /favicon.ico (a 404)
        config.html_favicon = str(OWN_STATIC / "favicon.svg")
    config.mathjax_path = "mathjax/tex-chtml.js"  # relative paths are read from _static/
    # myst-nb's widget scripts: the local copies, and no CDN for modules outside the bundle
    # (in this order: site-compat.js configures RequireJS and MathJax before the manager loads)
    config.nb_ipywidgets_js = {
        "require.js": {},
        "site-compat.js": {},
        "html-manager/embed-amd.js": {"data-jupyter-widgets-cdn": "_static/"},
    }


def _drop_duplicate_scripts(app, pagename, templatename, context, doctree) -> None:
    """Keep the first of identical script tags (sphinx-thebe's inline THEBE_JS_URL is added twice)."""
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for script in scripts:
        filename = getattr(script, "filename", script) or ""  # an inline script is None or ""
        key = (str(filename), tuple(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            kept.append(script)
    scripts[:] = kept


def assignment_rows(root: Path = REPO_ROOT) -> list[dict[str, object]]:
    """One row per released assignment: its notebook, the chapter page, and its points (from nbgrader's metadata)."""
    import json

    rows = []
    for notebook in sorted((root / "exercises").glob("*/*.ipynb")):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        points = sum(c.get("metadata", {}).get("nbgrader", {}).get("points", 0) or 0 for c in cells)
        tests = sum(1 for c in cells if c.get("metadata", {}).get("nbgrader", {}).get("grade") and c["cell_type"] == "code"
                    and not c["metadata"]["nbgrader"].get("solution"))
        chapter = root / "book" / notebook.name
        rows.append({"assignment": notebook.parent.name, "path": notebook.relative_to(root).as_posix(),
                     "chapter": f"book/{notebook.stem}" if chapter.exists() else None,
                     "points": points, "tests": tests})
    return rows


def _assignment_table_directive():
    from docutils import nodes
    from docutils.parsers.rst import Directive
    from docutils.statemachine import StringList

    class AssignmentTable(Directive):
        """``{assignment-table}``: every assignment of exercises/, with links built from the repository URL."""

        def run(self):
            config = self.state.document.settings.env.config
            repository = config.html_theme_options.get("repository_url", "").rstrip("/")
            branch = config.html_theme_options.get("repository_branch", "main")
            lines = [".. list-table::", "   :header-rows: 1", "", "   * - assignment", "     - chapter",
                     "     - graded tests", "     - points", "     - open the notebook"]
            for row in assignment_rows():
                chapter = f":doc:`/{row['chapter']}`" if row["chapter"] else "(none)"
                opens = f"``{row['path']}``"
                if repository.startswith("https://github.com/"):
                    slug = repository.removeprefix("https://github.com/")
                    opens = (f"`GitHub <{repository}/blob/{branch}/{row['path']}>`__ · "
                             f"`Colab <https://colab.research.google.com/github/{slug}/blob/{branch}/{row['path']}>`__ · "
                             f"``{row['path']}``")
                lines += [f"   * - ``{row['assignment']}``", f"     - {chapter}", f"     - {row['tests']}",
                          f"     - {row['points']}", f"     - {opens}"]
            container = nodes.container()
            self.state.nested_parse(StringList(lines), self.content_offset, container)
            return container.children

    return AssignmentTable


def setup(app):
    app.add_directive("assignment-table", _assignment_table_directive())
    app.connect("config-inited", _on_config_inited, priority=100)
    # early: `html-page-context` stops at the first handler that returns a template name
    app.connect("html-page-context", _drop_duplicate_scripts, priority=200)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
