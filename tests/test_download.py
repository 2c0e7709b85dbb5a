"""download_file against a loopback HTTP server the test starts itself."""
from __future__ import annotations

import hashlib
import http.server
import socket
import threading

import pytest

from course_utils.download import ChecksumError, DownloadError, download_file

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).requests.append(self.path)
        if self.path == "/file.bin":
            self._send(PAYLOAD, len(PAYLOAD))
        elif self.path == "/truncated.bin":
            self._send(PAYLOAD[: len(PAYLOAD) // 3], len(PAYLOAD))  # announces more than it sends
        elif self.path == "/other.bin":
            self._send(b"not the file you wanted", None)
        else:
            self.send_error(404)

    def _send(self, body: bytes, length: int | None):
        self.send_response(200)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_success_and_cache_reuse(server, tmp_path):
    target = tmp_path / "cache" / "file.bin"
    assert download_file(f"{server}/file.bin", target, PAYLOAD_SHA, progress=False) == target
    assert target.read_bytes() == PAYLOAD
    assert _leftovers(target.parent) == ["file.bin"]
    _Handler.requests.clear()
    download_file(f"{server}/file.bin", target, PAYLOAD_SHA, progress=False)
    assert _Handler.requests == []  # the cached file was reused, no request made


def test_cached_file_with_wrong_hash_is_fetched_again(server, tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"stale")
    download_file(f"{server}/file.bin", target, PAYLOAD_SHA, progress=False)
    assert target.read_bytes() == PAYLOAD


def test_hash_mismatch_leaves_nothing(server, tmp_path):
    target = tmp_path / "file.bin"
    with pytest.raises(ChecksumError, match="expected"):
        download_file(f"{server}/other.bin", target, PAYLOAD_SHA, progress=False)
    assert _leftovers(tmp_path) == []


def test_hash_mismatch_keeps_an_existing_good_copy_untouched(server, tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"previous version")
    with pytest.raises(ChecksumError):
        download_file(f"{server}/other.bin", target, PAYLOAD_SHA, progress=False)
    assert target.read_bytes() == b"previous version"
    assert _leftovers(tmp_path) == ["file.bin"]


def test_truncated_response_is_not_cached(server, tmp_path):
    target = tmp_path / "file.bin"
    with pytest.raises(DownloadError):
        download_file(f"{server}/truncated.bin", target, PAYLOAD_SHA, progress=False)
    assert _leftovers(tmp_path) == []


def test_truncated_response_without_hash_is_still_detected(server, tmp_path):
    target = tmp_path / "file.bin"
    with pytest.raises(DownloadError):
        download_file(f"{server}/truncated.bin", target, None, progress=False)
    assert _leftovers(tmp_path) == []


def test_http_error(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download_file(f"{server}/missing.bin", tmp_path / "x.bin", PAYLOAD_SHA, progress=False)
    assert _leftovers(tmp_path) == []


def test_dead_server(tmp_path):
    with socket.socket() as sock:  # find a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError, match="internet connection"):
        download_file(f"http://127.0.0.1:{port}/file.bin", tmp_path / "file.bin", PAYLOAD_SHA, progress=False, timeout=5)
    assert _leftovers(tmp_path) == []
