"""Preprocessing cache: content, keying, reuse, interrupted builds, failures, bounded memory."""
from __future__ import annotations

import json
import os
import pickle
import threading
import time

import numpy as np
import psutil
import pytest

from _fakes import FolderCXR, GeneratedCXR, fake_pixels, write_fake_folder
from cxrstudy.data.base import read_image_file, resize_uint8
from cxrstudy.data.cache import ImageCache, ImageFailuresError, attach_cache, cache_paths


@pytest.fixture
def folder(tmp_path):
    return write_fake_folder(tmp_path / "fake", n=12, size=40)


def test_build_stores_each_resized_image_in_its_row(folder, tmp_path):
    ds = FolderCXR(folder, image_size=32)
    cache = ImageCache.build(ds, cache_dir=tmp_path / "c", progress=False, workers=2,
                             chunk_size=5)
    assert cache.array.shape == (12, 32, 32)
    for i, image_id in enumerate(ds.records["image_id"]):
        expected = resize_uint8(read_image_file(folder / "images" / image_id), 32)
        assert np.array_equal(cache.get(image_id), expected), image_id
        assert cache.row_of(image_id) == i
    data_path, sidecar_path = cache_paths(ds, tmp_path / "c")
    assert data_path.name.startswith("fakefolder-32px-") and data_path.suffix == ".u8"
    assert len(data_path.stem.rsplit("-", 1)[1]) == 12
    sidecar = json.loads(sidecar_path.read_text())
    assert sidecar["complete"] is True
    assert sidecar["ids"] == ds.records["image_id"].tolist()
    assert sidecar["shape"] == [12, 32, 32] and sidecar["failures"] == []
    assert data_path.stat().st_size == 12 * 32 * 32


def test_second_build_with_same_key_reads_nothing(folder, tmp_path):
    ds = FolderCXR(folder, image_size=32)
    first = ImageCache.build(ds, cache_dir=tmp_path / "c", progress=False)
    assert sum(ds.reads.values()) == 12
    mtime = first.path.stat().st_mtime_ns
    again = FolderCXR(folder, image_size=32)
    second = ImageCache.build(again, cache_dir=tmp_path / "c", progress=False)
    assert sum(again.reads.values()) == 0
    assert second.path == first.path and second.path.stat().st_mtime_ns == mtime


def test_key_depends_on_ids_order_and_size(folder, tmp_path):
    ds = FolderCXR(folder, image_size=32)
    base = cache_paths(ds, tmp_path)[0]
    reversed_ds = ds.subset(np.arange(12)[::-1])
    assert cache_paths(reversed_ds, tmp_path)[0] != base
    assert cache_paths(FolderCXR(folder, image_size=16), tmp_path)[0] != base
    assert cache_paths(FolderCXR(folder, image_size=32), tmp_path)[0] == base


class _Interrupted(GeneratedCXR):
    def read_image(self, i):
        if i == 5:
            raise KeyboardInterrupt
        return super().read_image(i)


def test_interrupted_build_leaves_no_finished_cache_and_is_rebuilt(tmp_path):
    broken = _Interrupted(n=20, image_size=16)
    with pytest.raises(KeyboardInterrupt):
        ImageCache.build(broken, cache_dir=tmp_path, progress=False, workers=1, chunk_size=4)
    data_path, sidecar_path = cache_paths(broken, tmp_path)
    assert not data_path.exists()
    assert json.loads(sidecar_path.read_text())["complete"] is False
    ds = GeneratedCXR(n=20, image_size=16)  # same cache key and ids as ``broken``
    cache = ImageCache.build(ds, cache_dir=tmp_path, progress=False)
    assert sum(ds.reads.values()) == 20
    assert np.array_equal(cache.get("gen000007"), resize_uint8(fake_pixels(7, 48), 16))


def test_temp_file_of_a_killed_build_is_rebuilt_and_removed(tmp_path):
    ds = GeneratedCXR(n=10, image_size=16)
    data_path, sidecar_path = cache_paths(ds, tmp_path)
    tmp_path.mkdir(exist_ok=True)
    stale = data_path.with_name(data_path.name + ".tmp-999999999")  # no such process
    stale.write_bytes(b"\xff" * 100)
    sidecar_path.write_text(json.dumps({"version": 1, "complete": False, "ids": [], "size": 16,
                                        "failures": []}))
    cache = ImageCache.build(ds, cache_dir=tmp_path, progress=False)
    assert not stale.exists()
    assert sum(ds.reads.values()) == 10
    assert np.array_equal(cache.get("gen000003"), resize_uint8(fake_pixels(3, 48), 16))


def test_pixel_file_without_complete_sidecar_is_not_trusted(tmp_path):
    ds = GeneratedCXR(n=6, image_size=16)
    data_path, sidecar_path = cache_paths(ds, tmp_path)
    ImageCache.build(ds, cache_dir=tmp_path, progress=False)
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["complete"] = False
    sidecar_path.write_text(json.dumps(sidecar))
    data_path.write_bytes(b"\x00" * data_path.stat().st_size)  # garbage of the right size
    again = GeneratedCXR(n=6, image_size=16)
    cache = ImageCache.build(again, cache_dir=tmp_path, progress=False)
    assert sum(again.reads.values()) == 6
    assert cache.get("gen000004").max() > 0


def test_missing_and_corrupt_images_are_named_and_zero_filled(tmp_path):
    folder = write_fake_folder(tmp_path / "f", n=8, missing=[2], corrupt=[5])
    ds = FolderCXR(folder, image_size=16)
    cache = ImageCache.build(ds, cache_dir=tmp_path / "c", progress=False)
    assert set(cache.failures) == {"img0002.png", "img0005.png"}
    assert "missing file" in cache.failures["img0002.png"]
    assert "img0002.png" in cache.failures["img0002.png"]
    assert "cannot decode" in cache.failures["img0005.png"]
    assert "img0005.png" in cache.failures["img0005.png"]
    assert cache.get("img0002.png").max() == 0 and cache.get("img0005.png").max() == 0
    assert cache.get("img0003.png").max() > 0
    sidecar = json.loads(cache.sidecar_path.read_text())
    assert {f["image_id"] for f in sidecar["failures"]} == {"img0002.png", "img0005.png"}


def test_attach_cache_drops_failed_rows_with_a_warning(tmp_path):
    folder = write_fake_folder(tmp_path / "f", n=8, missing=[2], corrupt=[5])
    ds = FolderCXR(folder, image_size=16)
    with pytest.warns(UserWarning, match="dropping 2 of 8 images") as caught:
        kept = attach_cache(ds, cache_dir=tmp_path / "c", progress=False)
    message = str(caught[0].message)
    assert "img0002.png" in message and "img0005.png" in message
    assert len(kept) == 6
    assert "img0002.png" not in set(kept.records["image_id"])
    assert kept.cache is ds.cache is not None
    reads_before = sum(ds.reads.values())
    item = kept[2]  # row 2 of the kept rows is img0003.png
    assert kept.records.at[2, "image_id"] == "img0003.png"
    expected = resize_uint8(fake_pixels(3, 40), 16).astype(np.float32) / 255.0
    assert np.allclose(item["image"][0].numpy(), expected)
    assert np.array_equal(item["target"].numpy(), np.nan_to_num(ds.labels[3]))
    assert sum(ds.reads.values()) == reads_before  # items come from the cache, not the files


def test_attach_cache_strict_raises_naming_files(tmp_path):
    folder = write_fake_folder(tmp_path / "f", n=8, missing=[2], corrupt=[5])
    ds = FolderCXR(folder, image_size=16, strict=True)
    with pytest.raises(ImageFailuresError, match="2 of 8 images") as caught:
        attach_cache(ds, cache_dir=tmp_path / "c", progress=False)
    assert "img0002.png" in str(caught.value) and "img0005.png" in str(caught.value)


def test_attach_cache_uses_env_cache_dir_by_default(folder, tmp_path):
    ds = attach_cache(FolderCXR(folder, image_size=16), progress=False)
    assert ds.cache.path.parent == tmp_path / "cache"  # set by conftest's autouse fixture
    assert ds.cache.path.is_file()


def test_rows_for_subset_and_read_rows_keep_requested_order(folder, tmp_path):
    ds = FolderCXR(folder, image_size=16)
    cache = ImageCache.build(ds, cache_dir=tmp_path, progress=False)
    sub = ds.subset([7, 1, 4])
    rows = cache.rows_for(sub)
    assert rows.tolist() == [7, 1, 4] and rows.dtype == np.int64
    block = cache.read_rows([7, 1, 7, 4])
    assert block.shape == (4, 16, 16)
    for got, row in zip(block, [7, 1, 7, 4]):
        assert np.array_equal(got, cache.array[row])
    other = GeneratedCXR(n=3, image_size=16)
    with pytest.raises(KeyError, match="not in the cache"):
        cache.rows_for(other)


def test_cache_pickles_without_its_pixels(tmp_path):
    ds = GeneratedCXR(n=200, image_size=32)
    cache = ImageCache.build(ds, cache_dir=tmp_path, progress=False)
    cache.get("gen000001")  # open the memmap
    blob = pickle.dumps(cache)
    assert len(blob) < 200 * 32 * 32 / 4  # ids and metadata only, not 200 images
    clone = pickle.loads(blob)
    assert np.array_equal(clone.get("gen000150"), cache.get("gen000150"))


def test_streaming_build_keeps_memory_small(tmp_path):
    """2,000 sources of 320 px (205 MB decoded in all) into a 64 px cache: RSS may not grow
    by more than ~100 MB, which holding the decoded sources or the whole output would break."""
    ds = GeneratedCXR(n=2000, image_size=64, source_size=320, tag="rss")
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        cache = ImageCache.build(ds, cache_dir=tmp_path, progress=False, workers=2)
    finally:
        done.set()
        sampler.join()
    growth_mb = (peak[0] - baseline) / 2**20
    assert growth_mb < 100, f"RSS grew by {growth_mb:.0f} MB during the build"
    assert len(cache) == 2000
    assert np.array_equal(cache.get("gen001999"), resize_uint8(fake_pixels(1999, 320), 64))


def test_real_nih_sample_caches_all_images(nih_sample_root, tmp_path):
    pytest.importorskip("cxrstudy.data.nih")
    from cxrstudy.data import dataset_class

    ds = dataset_class("nih")(root=nih_sample_root, image_size=32)
    cached = attach_cache(ds, cache_dir=tmp_path, progress=False)
    assert len(cached) == 618 and cached.cache.failures == {}
    first = cached.records.at[0, "image_id"]
    expected = resize_uint8(read_image_file(nih_sample_root / "images" / first), 32)
    assert np.array_equal(cached.cache.get(first), expected)


def _touch_later(path):
    """Move the file's modification time on, as an edit a second later would."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_an_image_changed_after_caching_is_read_again(folder, tmp_path):
    from PIL import Image

    ImageCache.build(FolderCXR(folder, image_size=32), cache_dir=tmp_path / "c", progress=False)
    edited = folder / "images" / "img0003.png"
    Image.fromarray(fake_pixels(9, 40)).save(edited)  # now shows image 9's pixels
    _touch_later(edited)
    again = FolderCXR(folder, image_size=32)
    with pytest.warns(UserWarning, match="1 of 12 images changed on disk"):
        cache = ImageCache.build(again, cache_dir=tmp_path / "c", progress=False)
    assert sum(again.reads.values()) == 1  # only the edited row is decoded again
    assert np.array_equal(cache.get("img0003.png"), resize_uint8(fake_pixels(9, 40), 32))
    quiet = FolderCXR(folder, image_size=32)
    ImageCache.build(quiet, cache_dir=tmp_path / "c", progress=False)  # now up to date
    assert sum(quiet.reads.values()) == 0


def test_a_repaired_image_is_no_longer_dropped_and_a_deleted_one_is(tmp_path):
    from PIL import Image

    folder = write_fake_folder(tmp_path / "f", n=8, missing=[2], corrupt=[5])
    with pytest.warns(UserWarning, match="dropping 2 of 8"):
        attach_cache(FolderCXR(folder, image_size=16), cache_dir=tmp_path / "c", progress=False)
    Image.fromarray(fake_pixels(2, 40)).save(folder / "images" / "img0002.png")  # appears
    Image.fromarray(fake_pixels(5, 40)).save(folder / "images" / "img0005.png")  # repaired
    _touch_later(folder / "images" / "img0005.png")
    (folder / "images" / "img0006.png").unlink()  # gone
    with pytest.warns(UserWarning) as caught:
        kept = attach_cache(FolderCXR(folder, image_size=16), cache_dir=tmp_path / "c",
                            progress=False)
    messages = [str(w.message) for w in caught]
    assert any("3 of 8 images changed on disk" in m for m in messages)
    assert any("dropping 1 of 8" in m and "img0006.png" in m for m in messages)
    assert set(kept.cache.failures) == {"img0006.png"}
    assert "img0005.png" in set(kept.records["image_id"])
    assert np.array_equal(kept.cache.get("img0005.png"), resize_uint8(fake_pixels(5, 40), 16))
