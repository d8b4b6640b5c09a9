"""Files given by URL (checkpoints): downloaded once into a cache folder named by a hash of the whole URL,
verified, then moved into place; a cached file keeps the SHA-256 it was downloaded with, to be checked on use."""
import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from .atomic_file import temporary_beside

CHUNK = 1 << 20
TIMEOUT_S = 60  # per connection attempt and per read
# torch.hub's convention: a file name ending in -<first hex digits of its SHA-256>.<suffix> (8 at least here, so
# that names such as detr-r50-e12.pth are not taken for one)
HASH_PREFIX = re.compile(r"-([0-9a-f]{8,64})\.[^.]+$")


class DownloadError(RuntimeError):
    """A file that could not be downloaded or is not what was asked for; its message is one line naming the URL."""


def is_url(source):
    return str(source).startswith(("https://", "http://"))


def default_cache_root():
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / "by_url"


def cached_path(url, root=None):
    """Where `url` is cached: <root>/<SHA-256 of the URL, 16 hex digits>/<the URL's file name>: two URLs with the
    same file name never share a file."""
    name = Path(urlparse(url).path).name or "download"
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Path(root if root is not None else default_cache_root()) / key / name


def _digest_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _digest_path(path):
    return path.with_name(path.name + ".sha256")


def cached_file_problem(path):
    """None when the cached file still has the SHA-256 it was downloaded with, else what is wrong."""
    recorded = _digest_path(path)
    if not recorded.is_file():
        return f"{recorded.name} (its SHA-256 at download) is missing"
    if _digest_file(path) != recorded.read_text().strip():
        return "its SHA-256 is no longer the one it was downloaded with"
    return None


def _reason(error):
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return f"{type(error).__name__}: {error}" if not isinstance(error, OSError) else str(error)


def download(url, destination):
    """Download `url` into a temporary file beside `destination`; returns (its path, its SHA-256). The length must
    be the announced Content-Length and, when the file name carries a hash prefix (name-<hex>.pth), the SHA-256
    must start with it. Any failure is a DownloadError naming the URL and the reason; nothing is left behind."""
    destination = Path(destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temporary_beside(destination)
    except OSError as error:
        raise DownloadError(f"cannot download {url}: cannot write to the cache folder {destination.parent}: "
                            f"{error}") from error
    digest, size = hashlib.sha256(), 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "h-deformable-detr"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            announced = response.headers.get("Content-Length")
            expected = int(announced) if announced is not None and announced.isdigit() else None
            try:
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    digest.update(block)
                    size += len(block)
            except http.client.IncompleteRead as error:
                size += len(error.partial)
        if expected is not None and size != expected:
            raise DownloadError(f"cannot download {url}: the connection ended after {size} of its {expected} bytes")
        found = HASH_PREFIX.search(Path(urlparse(url).path).name)
        if found and not digest.hexdigest().startswith(found.group(1)):
            raise DownloadError(f"the file downloaded from {url} is not the one its name promises: its SHA-256 "
                                f"starts {digest.hexdigest()[:len(found.group(1))]}, not {found.group(1)}")
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, DownloadError):
            raise
        if isinstance(error, (OSError, ValueError, http.client.HTTPException)):
            raise DownloadError(f"cannot download {url}: {_reason(error)}") from error
        raise
    return tmp, digest.hexdigest()


def place(tmp, destination, sha256):
    """Move a verified download onto `destination`, recording its SHA-256 beside it (both atomically)."""
    destination = Path(destination)
    fd, digest_tmp = temporary_beside(_digest_path(destination))
    with os.fdopen(fd, "w") as f:
        f.write(sha256 + "\n")
    os.replace(digest_tmp, _digest_path(destination))
    os.replace(tmp, destination)
