"""_ext/site_assets.py: the site's scripts come from pinned npm tarballs, verified, or not at all.

Which bugs these catch: a tarball kept although its hash differs from the pin (a
tampered mirror, a truncated download); a failed download leaving a half file that a
later build trusts; files unpacked to the wrong place; the widget manager's web-font
import (a request to Google Fonts from every page) not removed; an offline build
failing without saying what to do.
"""
from __future__ import annotations

import functools
import http.server
import importlib.util
import io
import socket
import socketserver
import sys
import tarfile
import threading
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("site_assets", REPO_ROOT / "_ext" / "site_assets.py")
site_assets = importlib.util.module_from_spec(_spec)
sys.modules["site_assets"] = site_assets  # dataclasses look their module up there
_spec.loader.exec_module(site_assets)


def make_tarball(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A loopback 'npm registry' serving files from a folder; the cache moved to tmp_path."""
    root = tmp_path / "registry"
    root.mkdir()
    server = socketserver.TCPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("COURSE_NPM_REGISTRY", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(site_assets, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(site_assets, "STATIC", tmp_path / "cache" / "static")
    yield root
    server.shutdown()
    server.server_close()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def publish(root: Path, name: str, version: str, data: bytes) -> None:
    path = root / name / "-" / f"{name.split('/')[-1]}-{version}.tgz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def integrity(data: bytes) -> str:
    import base64
    import hashlib

    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def test_a_verified_tarball_is_unpacked_and_the_font_import_removed(registry):
    bundle = b'x=1;s="@import url(https://fonts.googleapis.com/css?family=Roboto+Mono);";y=2'
    data = make_tarball({"dist/embed-amd.js": bundle, "dist/a.woff2": b"font", "dist/embed-amd.js.map": b"{}"})
    publish(registry, "@scope/widgets", "1.0.0", data)
    asset = site_assets.NpmAsset("@scope/widgets", "1.0.0", integrity(data), "dist", "w", ("embed-amd.js", ".woff2"))
    site_assets.unpack(asset)
    out = site_assets.STATIC / "w"
    assert (out / "a.woff2").read_bytes() == b"font"
    assert not (out / "embed-amd.js.map").exists()  # only the endings asked for
    text = (out / "embed-amd.js").read_text()
    assert "fonts.googleapis.com" not in text and text.startswith("x=1;") and text.endswith("y=2")


def test_a_tarball_that_does_not_match_its_pin_is_refused_and_not_kept(registry):
    good = make_tarball({"require.js": b"define()"})
    publish(registry, "requirejs", "9.9.9", make_tarball({"require.js": b"evil()"}))
    asset = site_assets.NpmAsset("requirejs", "9.9.9", integrity(good), "require.js", "require.js")
    with pytest.raises(site_assets.SiteAssetError, match="pinned hash"):
        site_assets.unpack(asset)
    assert not list(site_assets.CACHE.glob("*.tgz")) and not list(site_assets.CACHE.glob("*.part"))
    assert not (site_assets.STATIC / "require.js").exists()


def test_an_unreachable_registry_says_what_to_do(registry, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("COURSE_NPM_REGISTRY", f"http://127.0.0.1:{port}")
    asset = site_assets.NpmAsset("mathjax", "0.0.1", "sha512-x", "es5", "mathjax")
    with pytest.raises(site_assets.SiteAssetError) as err:
        site_assets.fetch(asset)
    assert "COURSE_NPM_REGISTRY" in str(err.value) and "mathjax-0.0.1.tgz" in str(err.value)
    assert not list(site_assets.CACHE.glob("*"))


def test_the_pins_are_the_versions_the_site_names():
    names = {asset.name: asset.version for asset in site_assets.ASSETS}
    assert names == {"mathjax": "3.2.2", "requirejs": "2.3.8", "@jupyter-widgets/html-manager": "1.0.15"}
    assert all(asset.integrity.startswith("sha512-") and len(asset.integrity) == 95 for asset in site_assets.ASSETS)
