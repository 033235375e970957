"""``generalist data fetch`` against a local HTTP server: resume, checksums, atomic unpacking."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from generalist.cli import main
from generalist.data import load_splits
from generalist.data.fetch import SOURCES, Remote, Source, fetch
from generalist.errors import DataError


class Server:
    """Serves ``files`` on 127.0.0.1 with HTTP Range support; ``cut`` paths send only half of
    their bytes once (a dropped connection), ``no_range`` paths ignore Range headers."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.cut: set[str] = set()
        self.no_range: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server calls this name
                name = self.path.lstrip("/")
                wanted = self.headers.get("Range")
                server.requests.append((name, wanted))
                if name not in server.files:
                    self.send_error(404)
                    return
                body, status = server.files[name], 200
                if wanted and name not in server.no_range:
                    start = int(wanted.removeprefix("bytes=").rstrip("-"))
                    if start >= len(body):
                        self.send_error(416)
                        return
                    body, status = body[start:], 206
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in server.cut:
                    server.cut.discard(name)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    serving = Server({})
    yield serving
    serving.httpd.shutdown()


def _cifar_archive() -> bytes:
    """A valid miniature cifar-10-python.tar.gz: 30 training and 10 test images."""
    rng = np.random.default_rng(0)

    def batch(n: int) -> bytes:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        return pickle.dumps({"data": data, "labels": [i % 10 for i in range(n)]})

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, payload in (("data_batch_1", batch(30)), ("test_batch", batch(10))):
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return raw.getvalue()


def _source(server: Server, name: str, payload: bytes, md5: str | None = None) -> Source:
    server.files[name] = payload
    digest = md5 or hashlib.md5(payload).hexdigest()
    return Source((Remote(name, (server.url,), digest),), "cifar-10-batches-py", "tar", ".")


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_a_cut_download_resumes_with_a_range_request_then_unpacks(server, tmp_path):
    archive = _cifar_archive()
    source = _source(server, "cifar-10-python.tar.gz", archive)
    server.cut.add("cifar-10-python.tar.gz")
    said: list[str] = []
    with pytest.raises(DataError, match=r"stopped after [\d,]+ of [\d,]+ bytes; run the same"):
        fetch("cifar10", tmp_path, source=source, echo=said.append)
    part = tmp_path / ".downloads" / "cifar-10-python.tar.gz.part"
    assert part.stat().st_size == len(archive) // 2
    assert _leftovers(tmp_path) == [".downloads"]  # nothing unpacked, no staging folder
    data_dir = fetch("cifar10", tmp_path, source=source, echo=said.append)
    assert server.requests[-1] == ("cifar-10-python.tar.gz", f"bytes={len(archive) // 2}-")
    assert any(line.startswith("resuming") for line in said)
    assert data_dir == tmp_path and _leftovers(tmp_path) == ["cifar-10-batches-py"]
    splits = load_splits("cifar10", data_dir, val_size=0)
    assert (len(splits.train), len(splits.test)) == (30, 10)
    assert said[-1] == (
        f"cifar10 is ready in {tmp_path / 'cifar-10-batches-py'}: "
        f"pass --dataset cifar10 --data-dir {tmp_path}"
    )


def test_a_server_that_ignores_range_is_downloaded_again_from_the_start(server, tmp_path):
    archive = _cifar_archive()
    source = _source(server, "cifar-10-python.tar.gz", archive)
    server.cut.add("cifar-10-python.tar.gz")
    server.no_range.add("cifar-10-python.tar.gz")
    with pytest.raises(DataError, match="stopped after"):
        fetch("cifar10", tmp_path, source=source, echo=lambda _: None)
    said: list[str] = []
    fetch("cifar10", tmp_path, source=source, echo=said.append)
    assert any("does not resume downloads; starting it again" in line for line in said)
    assert load_splits("cifar10", tmp_path, val_size=0).train.images.shape == (30, 3, 32, 32)


def test_a_wrong_checksum_deletes_the_download_and_unpacks_nothing(server, tmp_path):
    source = _source(server, "cifar-10-python.tar.gz", _cifar_archive(), md5="0" * 32)
    with pytest.raises(DataError, match=r"has MD5 [0-9a-f]{32}, not the published 0{32}"):
        fetch("cifar10", tmp_path, source=source, echo=lambda _: None)
    assert _leftovers(tmp_path) == [".downloads"]
    assert _leftovers(tmp_path / ".downloads") == []


def test_the_cli_checks_the_official_checksum_in_one_line(server, tmp_path, capsys):
    """A mirror serving other bytes under the official name is caught by the published MD5."""
    server.files["cifar-10-python.tar.gz"] = _cifar_archive()
    status = main(["data", "fetch", "cifar10", str(tmp_path), "--mirror", server.url])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert f"not the published {SOURCES['cifar10'].files[0].md5}" in err
    assert not (tmp_path / "cifar-10-batches-py").exists()


def test_an_archive_reaching_outside_the_folder_is_refused(server, tmp_path):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    source = _source(server, "evil.tar.gz", raw.getvalue())
    with pytest.raises(DataError, match=r"holds '\.\./escaped', a link or a path outside"):
        fetch("cifar10", tmp_path / "data", source=source, echo=lambda _: None)
    assert not (tmp_path / "escaped").exists()
    assert _leftovers(tmp_path / "data") == [".downloads"]


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def test_mnist_files_are_verified_and_put_in_the_folder_the_reader_expects(server, tmp_path):
    rng = np.random.default_rng(1)
    payloads = {
        "train-images-idx3-ubyte.gz": _idx(rng.integers(0, 256, (6, 28, 28))),
        "train-labels-idx1-ubyte.gz": _idx(np.arange(6) % 10),
        "t10k-images-idx3-ubyte.gz": _idx(rng.integers(0, 256, (4, 28, 28))),
        "t10k-labels-idx1-ubyte.gz": _idx(np.arange(4)),
    }
    server.files.update(payloads)
    remotes = tuple(
        Remote(name, ("http://127.0.0.1:9/", server.url), hashlib.md5(data).hexdigest())
        for name, data in payloads.items()
    )  # the first mirror refuses connections: the second one is used
    data_dir = fetch(
        "mnist", tmp_path, source=Source(remotes, "mnist", "copy", "mnist"), echo=lambda _: None
    )
    assert data_dir == tmp_path / "mnist" and _leftovers(tmp_path) == ["mnist"]
    assert len(load_splits("mnist", data_dir, val_size=0).train) == 6


def test_imagenet_prints_what_to_download_and_how_to_lay_it_out(tmp_path, capsys):
    assert main(["data", "fetch", "imagenet", str(tmp_path / "imagenet")]) == 0
    said = capsys.readouterr().out
    assert "ILSVRC2012_img_train.tar" in said and "29b22e2961454d5413ddabcf34fc5622" in said
    assert f"--dataset imagenet --data-dir {tmp_path / 'imagenet'}" in said
    assert not (tmp_path / "imagenet").exists()
