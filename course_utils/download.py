"""Downloading files safely: streamed, hashed, and never half-written.

A download goes to a temporary file next to its destination; only when every byte
has arrived and the sha256 matches is it renamed into place. A failed or corrupt
download therefore never looks like a finished one.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

CHUNK_BYTES = 1 << 20


class DownloadError(RuntimeError):
    """The file could not be fetched completely (network failure or short read)."""


class ChecksumError(ValueError):
    """A file's sha256 is not the one the course expects."""


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks so large files use little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    url: str,
    path: str | os.PathLike,
    sha256: str | None = None,
    *,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Fetch ``url`` into ``path`` and return the path.

    If ``path`` already exists and matches ``sha256`` it is reused without a network
    call; a cached file with the wrong hash is fetched again, and so is any cached
    file when ``sha256`` is None (nothing says it is the right one). After the
    download the hash is checked before the file is moved into place, so a failed
    download leaves an earlier file at ``path`` untouched. ``timeout`` (seconds)
    applies to connecting and to each read; ``progress`` shows a progress bar.

    Raises:
        DownloadError: the server could not be reached, answered with an error, or
            sent fewer bytes than it announced.
        ChecksumError: the downloaded bytes do not hash to ``sha256``.
    """
    path = Path(path)
    if path.exists() and sha256 is not None and sha256_of(path) == sha256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        received = 0
        # Wrap the descriptor in a file object before anything can fail, so that every
        # failure below (refused connection, HTTP error, short read) closes it too.
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    announced = response.headers.get("Content-Length")
                    total = int(announced) if announced is not None else None
                    with tqdm(total=total, unit="B", unit_scale=True, desc=path.name, disable=not progress) as bar:
                        for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                            out.write(chunk)
                            digest.update(chunk)
                            received += len(chunk)
                            bar.update(len(chunk))
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:  # HTTP errors, timeouts, resets, short reads
                raise DownloadError(
                    f"Could not download {url}: {err}. Check your internet connection (or the URL), "
                    f"then run again; nothing was written to {path}."
                ) from err
        if total is not None and received != total:
            raise DownloadError(
                f"Download of {url} stopped early: got {received} of {total} bytes. "
                f"Run again; nothing was written to {path}."
            )
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256:
            raise ChecksumError(
                f"{url} downloaded with sha256 {actual}, expected {sha256}. The file may be "
                f"corrupt or changed upstream; it was discarded and {path} left untouched."
            )
        os.replace(tmp, path)
        return path
    finally:
        if tmp.exists():
            tmp.unlink()
