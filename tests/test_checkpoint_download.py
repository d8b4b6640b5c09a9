"""Checkpoints given as URLs (util.download, util.checkpoint.load_url_checkpoint), served by a local HTTP server:
cached by the whole URL, verified (complete, loadable, hash prefix), a damaged cached copy downloaded again, network
failures one line naming the URL (main.py too); and checkpoint files written with the user's umask."""
import hashlib
import http.server
import io
import os
import stat
import subprocess
import sys
import threading

import pytest
import torch
from model_helpers import ROOT

from util.checkpoint import load_checkpoint, load_url_checkpoint, save_checkpoint
from util.download import DownloadError, cached_path

UNREACHABLE = "http://127.0.0.1:9/x.pth"  # the discard port: nothing listens there


def checkpoint_bytes(value):
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.full((64,), float(value))}, "epoch": int(value)}, buffer)
    return buffer.getvalue()


class Server:
    """Files served at http://127.0.0.1:<port>/<path>; `short` paths announce more bytes than they send."""

    def __init__(self):
        self.files, self.short, self.requests = {}, set(), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path in server.short else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path):
        return self.base + path


@pytest.fixture
def server(monkeypatch, tmp_path):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # torch.hub's cache folder, for this test
    served = Server()
    yield served
    served.httpd.shutdown()
    served.httpd.server_close()


def cache_files(tmp_path):
    root = tmp_path / "torch_home"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_two_urls_with_the_same_file_name_keep_their_own_weights(server, tmp_path, capsys):
    server.files = {"/a/model.pth": checkpoint_bytes(1), "/b/model.pth": checkpoint_bytes(2)}
    first = load_checkpoint(server.url("/a/model.pth"))
    second = load_checkpoint(server.url("/b/model.pth"))
    assert first["epoch"] == 1 and second["epoch"] == 2
    assert cached_path(server.url("/a/model.pth")) != cached_path(server.url("/b/model.pth"))
    assert cached_path(server.url("/a/model.pth")).name == "model.pth"
    assert f"downloaded {server.url('/a/model.pth')} to " in capsys.readouterr().out
    # the cache answers now: no further request, the same weights
    assert load_checkpoint(server.url("/a/model.pth"))["epoch"] == 1
    assert load_checkpoint(server.url("/b/model.pth"))["epoch"] == 2
    assert server.requests == ["/a/model.pth", "/b/model.pth"]
    assert len([f for f in cache_files(tmp_path) if f.endswith(".pth")]) == 2
    assert all(not f.split("/")[-1].startswith(".") for f in cache_files(tmp_path))  # no temporaries left


def test_a_damaged_cached_copy_is_downloaded_again(server, capsys):
    url = server.url("/model.pth")
    server.files = {"/model.pth": checkpoint_bytes(3)}
    load_checkpoint(url)
    cached = cached_path(url)
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: found by the SHA-256 recorded at download
    cached.write_bytes(bytes(data))
    assert load_checkpoint(url)["epoch"] == 3
    out = capsys.readouterr().out
    assert f"the cached copy {cached} of {url} is damaged (its SHA-256 is no longer the one it was downloaded " \
           "with): downloading it again" in out
    cached.write_bytes(cached.read_bytes()[:100])  # truncated
    assert torch.equal(load_checkpoint(url)["model"]["w"], torch.full((64,), 3.0))
    assert server.requests == ["/model.pth"] * 3


def test_a_download_cut_short_is_refused_and_not_cached(server, tmp_path):
    server.files = {"/short.pth": checkpoint_bytes(4)}
    server.short = {"/short.pth"}
    size = len(checkpoint_bytes(4))
    with pytest.raises(DownloadError, match=rf"^cannot download {server.url('/short.pth')}: the connection ended "
                                            rf"after {size // 2} of its {size} bytes$"):
        load_checkpoint(server.url("/short.pth"))
    assert cache_files(tmp_path) == []


def test_a_download_that_is_not_a_checkpoint_is_refused_and_not_cached(server, tmp_path):
    server.files = {"/page.pth": b"<html>sign in to download</html>"}
    with pytest.raises(DownloadError, match=r"^the file downloaded from .*/page\.pth is not a loadable checkpoint: "
                                            r".*page\.pth is not a PyTorch checkpoint"):
        load_checkpoint(server.url("/page.pth"))
    assert cache_files(tmp_path) == []


def test_a_hash_prefix_in_the_file_name_is_checked(server):
    data = checkpoint_bytes(5)
    digest = hashlib.sha256(data).hexdigest()
    server.files = {f"/r50-{digest[:10]}.pth": data, "/r50-0123456789.pth": data, "/detr-r50-e12.pth": data}
    assert load_checkpoint(server.url(f"/r50-{digest[:10]}.pth"))["epoch"] == 5
    with pytest.raises(DownloadError, match=r"is not the one its name promises: its SHA-256 starts .{10}, not "
                                            r"0123456789"):
        load_checkpoint(server.url("/r50-0123456789.pth"))
    assert load_checkpoint(server.url("/detr-r50-e12.pth"))["epoch"] == 5  # "e12" is too short to be a hash


def test_http_errors_and_no_network_are_one_line_naming_the_url(server, monkeypatch):
    with pytest.raises(DownloadError, match=rf"^cannot download {server.url('/gone.pth')}: HTTP 404 Not Found$"):
        load_checkpoint(server.url("/gone.pth"))
    with pytest.raises(DownloadError, match=rf"^cannot download {UNREACHABLE}: \[Errno 111\] Connection refused$"):
        load_checkpoint(UNREACHABLE)
    import socket
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr("urllib.request.urlopen", offline)
    url = "https://github.com/HDETR/H-Deformable-DETR/releases/download/v0.1/model.pth"
    with pytest.raises(DownloadError, match=rf"^cannot download {url}: \[Errno -3\] Temporary failure in name "
                                            r"resolution$"):
        load_url_checkpoint(url)


def test_main_reports_an_unreachable_resume_url_in_one_line(tmp_path):
    from datasets.synthetic import make_synthetic_coco

    make_synthetic_coco(tmp_path / "coco", 2, 2, image_size=64, seed=0)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["TORCH_HOME"] = str(tmp_path / "torch_home")
    flags = ["--device", "cpu", "--backbone", "resnet18", "--no_pretrained_backbone", "--num_feature_levels", "1",
             "--hidden_dim", "32", "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1", "--dim_feedforward",
             "32", "--num_queries_one2one", "4", "--num_queries_one2many", "4", "--val_scale", "64", "--max_size",
             "64", "--batch_size", "1", "--num_workers", "0", "--coco_path", str(tmp_path / "coco"), "--eval",
             "--resume", UNREACHABLE]
    result = subprocess.run([sys.executable, "main.py", *flags], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        f"main.py: cannot download {UNREACHABLE}: [Errno 111] Connection refused"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoints_and_downloads_follow_the_umask(tmp_path, umask, mode, server):
    previous = os.umask(umask)
    try:
        save_checkpoint({"epoch": 1}, tmp_path / "run" / "checkpoint.pth")
        server.files = {"/m.pth": checkpoint_bytes(6)}
        load_checkpoint(server.url("/m.pth"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "run" / "checkpoint.pth").stat().st_mode) == mode
    cached = cached_path(server.url("/m.pth"))
    assert stat.S_IMODE(cached.stat().st_mode) == mode
    assert stat.S_IMODE(cached.with_name("m.pth.sha256").stat().st_mode) == mode
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pth") == {"epoch": 1}
