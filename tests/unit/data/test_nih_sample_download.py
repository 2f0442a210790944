"""`cxrstudy data download nih-sample`: the 618-image sample rebuilt from the NIH archives.

Mechanics on local archives (file:// URLs) with synthetic pixels under real image ids; the
shipped manifest against the real sample when CXRSTUDY_DATA_ROOT is set.
"""
from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrstudy.data import nih_sample
from cxrstudy.data.download import DownloadError, OfflineError
from cxrstudy.data.obtain import main_download

IDS = ["00000282_000.png", "00001437_012.png", "00030774_000.png"]  # ids of the real sample


def _release_png(seed: int) -> tuple[bytes, np.ndarray]:
    """A 1024 px release-style PNG and the sums of its 2 × 2 blocks."""
    rng = np.random.default_rng(seed)
    big = rng.integers(0, 256, (1024, 1024), dtype=np.uint8)
    small = big.reshape(512, 2, 512, 2).astype(np.int64).sum(axis=(1, 3))  # 4 × the mean
    buffer = io.BytesIO()
    Image.fromarray(big, mode="L").save(buffer, format="PNG")
    return buffer.getvalue(), small


def _archive(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(f"images/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path.as_uri()


@pytest.fixture()
def release(tmp_path):
    """Two archives (ids 0 and 1 in the first with a stranger, id 2 in the second), and a
    manifest made from the expected 512 px images."""
    pngs = {i: _release_png(n) for n, i in enumerate(IDS)}
    stranger, _ = _release_png(99)
    first = _archive(tmp_path / "images_001.tar.gz",
                     {IDS[0]: pngs[IDS[0]][0], "00000001_000.png": stranger, IDS[1]: pngs[IDS[1]][0]})
    second = _archive(tmp_path / "images_002.tar.gz", {IDS[2]: pngs[IDS[2]][0]})
    expected = {i: nih_sample.reduce_to_sample(png) for i, (png, _) in pngs.items()}
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["image_id", "pixel_sha256", "thumbnail"])
        writer.writeheader()
        writer.writerows(nih_sample.manifest_row(expected[i], i) for i in IDS)
    return {"archives": {"images_001.tar.gz": first, "images_002.tar.gz": second},
            "manifest": manifest, "expected": expected}


def test_reduce_averages_each_2x2_block():
    png, sums = _release_png(5)
    reduced = nih_sample.reduce_to_sample(png)
    assert reduced.shape == (512, 512) and reduced.dtype == np.uint8
    assert np.array_equal(reduced, (sums + 2) // 4)  # each block's mean, rounded half up


def test_thumbnail_is_the_block_mean_on_an_8x8_grid():
    pixels = np.zeros((512, 512), dtype=np.uint8)
    pixels[:64, :64] = 200
    pixels[:32, 64:128] = 100  # half of block (0, 1)
    thumb = nih_sample.thumbnail(pixels)
    assert thumb.shape == (8, 8)
    assert thumb[0, 0] == 200 and thumb[0, 1] == 50 and thumb[1:, :].max() == 0


def test_builds_the_sample_from_the_archives(tmp_path, release):
    folder = nih_sample.download_nih_sample(tmp_path / "data", release["archives"],
                                            manifest=release["manifest"], progress=False)
    assert folder == tmp_path / "data" / "nih-sample"
    assert sorted(p.name for p in (folder / "images").iterdir()) == sorted(IDS)  # no stranger
    for image_id in IDS:
        written = np.asarray(Image.open(folder / "images" / image_id))
        assert np.array_equal(written, release["expected"][image_id])
    labels = pd.read_csv(folder / "Data_Entry_2017_v2020.csv")
    assert labels["Image Index"].tolist() == IDS  # the manifest's order
    assert "Finding Labels" in labels.columns and "OriginalImage[Width" in labels.columns
    boxes = pd.read_csv(folder / "BBox_List_2017.csv")
    assert set(boxes["Image Index"]) <= set(IDS)
    assert (folder / ".download" / "archives_done.txt").read_text().split() == [
        "images_001.tar.gz", "images_002.tar.gz"]


def test_stops_reading_once_every_image_is_found(tmp_path, release):
    two_ids = tmp_path / "two.csv"
    rows = list(csv.DictReader(open(release["manifest"])))[:2]
    with open(two_ids, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    archives = dict(release["archives"], **{"images_002.tar.gz": "http://127.0.0.1:9/never.tar.gz"})
    folder = nih_sample.download_nih_sample(tmp_path / "data", archives, manifest=two_ids,
                                            progress=False)
    assert sorted(p.name for p in (folder / "images").iterdir()) == sorted(IDS[:2])


def test_a_rerun_keeps_checked_images_and_needs_no_network(tmp_path, release):
    nih_sample.download_nih_sample(tmp_path / "data", release["archives"],
                                   manifest=release["manifest"], progress=False)
    image = tmp_path / "data" / "nih-sample" / "images" / IDS[0]
    stamp = image.stat().st_mtime_ns
    offline = {name: f"http://127.0.0.1:9/{name}" for name in release["archives"]}
    nih_sample.download_nih_sample(tmp_path / "data", offline, manifest=release["manifest"],
                                   progress=False)
    assert image.stat().st_mtime_ns == stamp


def test_a_damaged_image_in_place_is_rebuilt(tmp_path, release):
    folder = nih_sample.download_nih_sample(tmp_path / "data", release["archives"],
                                            manifest=release["manifest"], progress=False)
    Image.fromarray(np.zeros((512, 512), dtype=np.uint8)).save(folder / "images" / IDS[2])
    (folder / ".download" / "archives_done.txt").unlink()
    nih_sample.download_nih_sample(tmp_path / "data", release["archives"],
                                   manifest=release["manifest"], progress=False)
    assert np.array_equal(np.asarray(Image.open(folder / "images" / IDS[2])),
                          release["expected"][IDS[2]])


def test_a_wrong_image_is_refused_and_not_written(tmp_path, release):
    rows = list(csv.DictReader(open(release["manifest"])))
    rows[1]["pixel_sha256"] = "0" * 64
    rows[1]["thumbnail"] = bytes(64).hex()  # an all-black reference: the member is not it
    with open(release["manifest"], "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(nih_sample.SampleMismatchError, match=IDS[1]):
        nih_sample.download_nih_sample(tmp_path / "data", release["archives"],
                                       manifest=release["manifest"], progress=False)
    assert not (tmp_path / "data" / "nih-sample" / "images" / IDS[1]).exists()


def test_within_rounding_is_accepted_and_counted_as_not_identical(release):
    expected = nih_sample.read_manifest(release["manifest"])[IDS[0]]
    pixels = release["expected"][IDS[0]].copy()
    assert nih_sample.check_image(pixels, expected) is True
    pixels[0, 0] = pixels[0, 0] ^ 1  # one grey level at one pixel
    assert nih_sample.check_image(pixels, expected) is False


def test_offline_says_what_to_do(tmp_path, release, capsys, monkeypatch):
    offline = {"images_001.tar.gz": "http://127.0.0.1:9/images_001.tar.gz"}
    with pytest.raises(OfflineError, match="NIH sample"):
        nih_sample.download_nih_sample(tmp_path / "data", offline, manifest=release["manifest"],
                                       progress=False)
    # through the command line (the NIH's URLs swapped for an unreachable one): exit status 1
    # and one line naming the archive, no traceback
    monkeypatch.setattr(nih_sample, "NIH_ARCHIVE_URLS", offline)
    status = main_download(["nih-sample", "--root", str(tmp_path / "data"), "--no-progress"])
    printed = capsys.readouterr().out
    assert status == 1 and printed.startswith("error: ") and "images_001.tar.gz" in printed


def test_missing_images_are_named(tmp_path, release):
    only_first = {"images_001.tar.gz": release["archives"]["images_001.tar.gz"]}
    with pytest.raises(DownloadError, match=IDS[2]):
        nih_sample.download_nih_sample(tmp_path / "data", only_first,
                                       manifest=release["manifest"], progress=False)


def test_the_shipped_manifest_matches_the_real_sample(nih_sample_root):
    """Every row of the manifest is an image of the real sample with its own checksum."""
    manifest = nih_sample.read_manifest()
    labels = pd.read_csv(nih_sample_root / "Data_Entry_2017_v2020.csv")
    assert list(manifest) == labels["Image Index"].tolist() and len(manifest) == 618
    for image_id in list(manifest)[::61]:
        pixels = np.asarray(Image.open(nih_sample_root / "images" / image_id).convert("L"))
        assert nih_sample.check_image(pixels, manifest[image_id]) is True
