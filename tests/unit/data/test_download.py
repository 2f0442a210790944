"""Downloads, offline: a Range-aware HTTP server on 127.0.0.1 serves fabricated files."""
from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from cxrstudy.data import download as dl
from cxrstudy.data import obtain
from cxrstudy.data.base import read_image_file


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.files[path]``; honours ``Range: bytes=N-``; logs what was asked/sent."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        body = server.files.get(self.path)
        asked = self.headers.get("Range")
        server.requests.append({"path": self.path, "range": asked})
        if body is None:
            self.send_error(404)
            return
        start = 0
        if asked and server.wrong_range:  # a broken server: 206 but from byte 0
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 0-{len(body) - 1}/{len(body)}")
        elif asked and not server.ignore_range:
            start = int(asked.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        chunk = body[start:]
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        # counted before the write: the client may finish reading (and the test assert) before
        # this handler thread runs its next line
        server.sent[self.path] = server.sent.get(self.path, 0) + len(chunk)
        self.wfile.write(chunk)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.sent = {}, [], {}
    httpd.ignore_range = httpd.wrong_range = False
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02},
                              daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 20), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _tar_gz(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, payload in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


PAYLOAD = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_full_download_verifies_and_renames(server, tmp_path):
    server.files["/blob.bin"] = PAYLOAD
    dest = dl.fetch(f"{server.url}/blob.bin", tmp_path / "blob.bin", checksum=f"sha256:{SHA}",
                    progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "blob.bin.part").exists()
    assert server.requests == [{"path": "/blob.bin", "range": None}]
    dl.fetch(f"{server.url}/blob.bin", dest, checksum=f"sha256:{SHA}", progress=False)
    assert len(server.requests) == 1  # already in place: no second request


def test_resume_fetches_only_the_remainder(server, tmp_path):
    server.files["/blob.bin"] = PAYLOAD
    (tmp_path / "blob.bin.part").write_bytes(PAYLOAD[:123_456])
    dest = dl.fetch(f"{server.url}/blob.bin", tmp_path / "blob.bin", checksum=f"sha256:{SHA}",
                    progress=False)
    assert server.requests == [{"path": "/blob.bin", "range": "bytes=123456-"}]
    assert server.sent["/blob.bin"] == len(PAYLOAD) - 123_456
    assert dest.read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.files["/blob.bin"] = PAYLOAD
    server.ignore_range = True
    (tmp_path / "blob.bin.part").write_bytes(b"x" * 1000)  # not even the right bytes
    dest = dl.fetch(f"{server.url}/blob.bin", tmp_path / "blob.bin", progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_answer_for_the_wrong_range_is_not_appended(server, tmp_path):
    server.files["/blob.bin"] = PAYLOAD
    server.wrong_range = True
    (tmp_path / "blob.bin.part").write_bytes(PAYLOAD[:5000])
    dest = dl.fetch(f"{server.url}/blob.bin", tmp_path / "blob.bin", checksum=f"sha256:{SHA}",
                    progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert [r["range"] for r in server.requests] == ["bytes=5000-", None]


def test_complete_part_file_is_finished_without_refetching(server, tmp_path):
    server.files["/blob.bin"] = PAYLOAD
    (tmp_path / "blob.bin.part").write_bytes(PAYLOAD)
    dest = dl.fetch(f"{server.url}/blob.bin", tmp_path / "blob.bin", checksum=f"sha256:{SHA}",
                    progress=False)
    assert dest.read_bytes() == PAYLOAD and server.sent.get("/blob.bin", 0) == 0


def test_checksum_mismatch_raises_and_keeps_nothing(server, tmp_path):
    server.files["/blob.bin"] = PAYLOAD
    with pytest.raises(dl.ChecksumError, match="blob.bin") as caught:
        dl.fetch(f"{server.url}/blob.bin", tmp_path / "blob.bin", checksum="sha256:" + "0" * 64,
                 progress=False)
    assert SHA in str(caught.value)
    assert not (tmp_path / "blob.bin").exists() and not (tmp_path / "blob.bin.part").exists()


def test_unreachable_host_fails_at_once_with_the_offline_message(tmp_path):
    url = f"http://127.0.0.1:{_unused_port()}/images_001.tar.gz"
    with pytest.raises(dl.OfflineError) as caught:
        dl.fetch(url, tmp_path / "images_001.tar.gz", dataset="NIH ChestX-ray14", progress=False)
    message = str(caught.value)
    assert "NIH ChestX-ray14" in message and url in message and "offline" in message
    assert str(tmp_path / "images_001.tar.gz") in message


def test_http_error_names_the_url(server, tmp_path):
    with pytest.raises(dl.DownloadError, match="HTTP 404"):
        dl.fetch(f"{server.url}/absent", tmp_path / "absent", progress=False)


def test_nih_download_extracts_into_the_release_layout(server, tmp_path):
    server.files["/a1.gz"] = _tar_gz({"images/00000001_000.png": _png_bytes(10),
                                      "images/00000002_000.png": _png_bytes(200)})
    archives = {"images_001.tar.gz": f"{server.url}/a1.gz"}
    folder = dl.download_nih(tmp_path / "data", archives=archives, progress=False)
    assert folder == tmp_path / "data" / "nih"
    assert read_image_file(folder / "images" / "00000002_000.png")[0, 0] == 200
    assert (folder / "archives" / "images_001.tar.gz.extracted").read_text() == "2 files\n"
    assert not (folder / "archives" / "images_001.tar.gz").exists()  # removed once extracted
    header = (folder / "Data_Entry_2017_v2020.csv").read_text().splitlines()[0]
    assert header.startswith("Image Index,Finding Labels")
    assert (folder / "BBox_List_2017.csv").is_file()
    dl.download_nih(tmp_path / "data", archives=archives, progress=False)
    assert len(server.requests) == 1  # a finished archive is skipped on a rerun


def test_damaged_archive_is_named_and_removed(server, tmp_path):
    server.files["/bad.gz"] = _tar_gz({"images/x.png": _png_bytes(1)})[:-40]
    with pytest.raises(dl.DownloadError, match="images_002.tar.gz"):
        dl.download_nih(tmp_path, archives={"images_002.tar.gz": f"{server.url}/bad.gz"},
                        progress=False)
    store = tmp_path / "nih" / "archives"
    assert not (store / "images_002.tar.gz").exists()
    assert not (store / "images_002.tar.gz.extracted").exists()


def test_unsafe_archive_paths_are_refused(server, tmp_path):
    server.files["/evil.gz"] = _tar_gz({"images/ok.png": _png_bytes(1),
                                        "../escape.png": _png_bytes(2)})
    with pytest.raises(dl.DownloadError, match="unsafe"):
        dl.download_nih(tmp_path, archives={"images_003.tar.gz": f"{server.url}/evil.gz"},
                        progress=False)
    assert not (tmp_path / "escape.png").exists()
    assert not (tmp_path / "nih" / "images" / "ok.png").exists()


def test_nih_archive_list_is_the_twelve_release_archives():
    names = list(dl.NIH_ARCHIVE_URLS)
    assert names[0] == "images_001.tar.gz" and names[-1] == "images_012.tar.gz"
    assert len(set(dl.NIH_ARCHIVE_URLS.values())) == 12
    assert all(u.startswith("https://nihcc.box.com/shared/static/") for u in
               dl.NIH_ARCHIVE_URLS.values())
    with pytest.raises(ValueError, match="images_013"):
        dl.download_nih("/nonexistent", archives=["images_013.tar.gz"])


def _fake_npz(counts: dict[str, int], side: int = 28) -> bytes:
    buffer = io.BytesIO()
    arrays = {}
    for split, n in counts.items():
        arrays[f"{split}_images"] = np.zeros((n, side, side), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.zeros((n, 14), dtype=np.uint8)
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def test_chestmnist_download_gives_a_file_medmnist_opens(server, tmp_path, monkeypatch):
    import medmnist
    from medmnist.info import INFO

    counts = {"train": 3, "val": 2, "test": 1}
    body = _fake_npz(counts)
    server.files["/chestmnist.npz"] = body
    info = INFO["chestmnist"]
    monkeypatch.setitem(info, "url", f"{server.url}/chestmnist.npz")
    monkeypatch.setitem(info, "MD5", hashlib.md5(body).hexdigest())
    monkeypatch.setitem(info, "n_samples", counts)
    assert obtain.download("chestmnist", tmp_path, sizes=[28], progress=False) is True
    path = tmp_path / "medmnist" / "chestmnist.npz"
    assert path.read_bytes() == body
    assert len(medmnist.ChestMNIST(split="val", root=str(path.parent))) == 2
    monkeypatch.setitem(info, "MD5", "0" * 32)
    path.unlink()
    with pytest.raises(dl.ChecksumError, match="chestmnist.npz"):
        dl.download_chestmnist(tmp_path, sizes=[28], progress=False)
    assert not path.exists()


def test_chestmnist_split_count_mismatch_is_an_error(server, tmp_path, monkeypatch):
    from medmnist.info import INFO

    body = _fake_npz({"train": 3, "val": 2, "test": 1})
    server.files["/c.npz"] = body
    info = INFO["chestmnist"]
    monkeypatch.setitem(info, "url", f"{server.url}/c.npz")
    monkeypatch.setitem(info, "MD5", hashlib.md5(body).hexdigest())
    with pytest.raises(dl.DownloadError, match="train_images has 3 images"):
        dl.download_chestmnist(tmp_path, sizes=[28], progress=False)


@pytest.mark.parametrize("name, must_mention", [
    ("chexpert", ["https://stanfordmlgroup.github.io/competitions/chexpert/",
                  "CheXpert-v1.0-small", "train.csv"]),
    ("vindr", ["https://physionet.org/content/vindr-cxr/1.0.0/", "vindr-cxr", "credentialed"]),
])
def test_gated_datasets_print_steps_and_do_not_pretend(name, must_mention, tmp_path, capsys):
    assert obtain.download(name, tmp_path) is False
    out = capsys.readouterr().out
    for text in must_mention:
        assert text in out
    assert str(tmp_path / dl.paths.DATASET_DIRS[name]) in out
    assert not (tmp_path / dl.paths.DATASET_DIRS[name]).exists()
    assert obtain.main_download([name, "--root", str(tmp_path)]) == 2


def test_main_download_reports_offline_as_failure(tmp_path, monkeypatch, capsys):
    url = f"http://127.0.0.1:{_unused_port()}/x.gz"
    monkeypatch.setitem(dl.NIH_ARCHIVE_URLS, "images_001.tar.gz", url)
    status = obtain.main_download(["nih", "--root", str(tmp_path), "--archive", "images_001.tar.gz",
                               "--no-progress"])
    assert status == 1
    out = capsys.readouterr().out
    assert "NIH ChestX-ray14" in out and url in out


def test_target_dir_accepts_the_data_root_or_the_dataset_folder(tmp_path):
    assert dl.target_dir("nih", tmp_path) == tmp_path / "nih"
    assert dl.target_dir("nih", tmp_path / "nih") == tmp_path / "nih"
    assert dl.target_dir("chexpert", tmp_path) == tmp_path / "CheXpert-v1.0-small"


def test_make_data_fetches_only_the_chestmnist_sizes_the_profile_reads(monkeypatch, capsys):
    """The default profile reads ChestMNIST at 28, 64 and 128 px (04's students and teacher, 64
    elsewhere), so `make data` (which passes --profile) never fetches the 224 px file."""
    import argparse

    from cxrstudy.pipeline import cli
    from cxrstudy.data import obtain

    seen = {}
    monkeypatch.setattr(obtain, "main_download",
                        lambda args: seen.setdefault("sizes", args.sizes) and 0)
    args = argparse.Namespace(name="chestmnist", root=None, sizes=None, profile="default",
                              progress=False)
    assert cli._cmd_data_download(args) == 0
    assert seen["sizes"] == [28, 64, 128]
    assert "28 px, 64 px, 128 px" in capsys.readouterr().out
    # a profile that reads no ChestMNIST fetches nothing; explicit sizes win over the profile
    assert cli._cmd_data_download(argparse.Namespace(name="chestmnist", root=None, sizes=None,
                                                     profile="sample", progress=False)) == 0
    assert "nothing to fetch" in capsys.readouterr().out
    seen.clear()
    cli._cmd_data_download(argparse.Namespace(name="chestmnist", root=None, sizes=[224],
                                              profile="default", progress=False))
    assert seen["sizes"] == [224]
