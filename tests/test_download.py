"""download_file against a loopback HTTP server the test starts itself."""
from __future__ import annotations

import gc
import hashlib
import http.server
import os
import socket
import threading
import time

import pytest

import course_utils.download as download
from course_utils.download import ChecksumError, DownloadError, download_file, sha256_of

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
OTHER = b"not the file you wanted"
SLOW_S = 3.0


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
        elif self.path == "/slow.bin":
            time.sleep(SLOW_S)  # longer than the client's timeout
            try:
                self._send(PAYLOAD, len(PAYLOAD))
            except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
                pass
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


def _dead_port() -> int:
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _open_descriptors() -> int:
    gc.collect()  # an exception's traceback may hold a socket until collected
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors through /proc (Linux)")
def test_failed_downloads_leak_no_file_descriptors(server, tmp_path):
    """Each failure must close the temporary file's descriptor (mkstemp opens it first)."""
    port = _dead_port()
    for attempt in range(2):  # the first round lets anything opened once and kept (imports, caches) settle
        before = _open_descriptors()
        for i in range(5):
            with pytest.raises(DownloadError):
                download_file(f"http://127.0.0.1:{port}/file.bin", tmp_path / "dead.bin", PAYLOAD_SHA, progress=False, timeout=5)
            with pytest.raises(DownloadError):
                download_file(f"{server}/missing.bin", tmp_path / "missing.bin", PAYLOAD_SHA, progress=False)
            with pytest.raises(DownloadError):
                download_file(f"{server}/truncated.bin", tmp_path / "short.bin", PAYLOAD_SHA, progress=False)
            with pytest.raises(ChecksumError):
                download_file(f"{server}/other.bin", tmp_path / "other.bin", PAYLOAD_SHA, progress=False)
        # the server thread may close its end of the last connection a moment later;
        # a leaked descriptor never closes, so waiting a little cannot hide one
        deadline = time.monotonic() + 5
        while (after := _open_descriptors()) > before and time.monotonic() < deadline:
            time.sleep(0.05)
    assert after == before, f"{after - before} descriptors left open by 20 failed downloads"
    assert _leftovers(tmp_path) == []


def test_without_a_hash_any_complete_download_is_kept_and_always_refetched(server, tmp_path):
    target = tmp_path / "other.bin"
    download_file(f"{server}/other.bin", target, None, progress=False)  # no Content-Length, no hash
    assert target.read_bytes() == OTHER
    target.write_bytes(b"edited")
    _Handler.requests.clear()
    download_file(f"{server}/other.bin", target, None, progress=False)
    assert _Handler.requests == ["/other.bin"], "without a hash the cached copy cannot be trusted"
    assert target.read_bytes() == OTHER


def test_timeout_is_applied(server, tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadError, match="timed out") as err:
        download_file(f"{server}/slow.bin", tmp_path / "slow.bin", PAYLOAD_SHA, progress=False, timeout=0.5)
    assert time.monotonic() - start < SLOW_S, "the download must give up after `timeout` seconds"
    assert err.value.__cause__ is not None and "nothing was written" in str(err.value)
    assert _leftovers(tmp_path) == []


def test_progress_bar_only_when_asked(server, tmp_path, capfd):
    download_file(f"{server}/file.bin", tmp_path / "quiet.bin", PAYLOAD_SHA, progress=False)
    assert capfd.readouterr().err == ""
    download_file(f"{server}/file.bin", tmp_path / "loud.bin", PAYLOAD_SHA)  # progress=True by default
    err = capfd.readouterr().err
    assert "loud.bin" in err and "1.05M" in err, err  # named after the file, sized from Content-Length


def test_sha256_of_reads_in_chunks(tmp_path, monkeypatch):
    file = tmp_path / "data.bin"
    file.write_bytes(PAYLOAD[:1000])
    monkeypatch.setattr(download, "CHUNK_BYTES", 7)  # many chunks, the last one short
    assert sha256_of(file) == hashlib.sha256(PAYLOAD[:1000]).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_of(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
