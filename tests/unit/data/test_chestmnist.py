"""ChestMNIST adapter on fabricated .npz files with the MedMNIST keys."""
from __future__ import annotations

import numpy as np
import pytest

from cxrstudy.data import load_dataset
from cxrstudy.data.chestmnist import (AVAILABLE_SIZES, ChestMNISTDataset, default_size,
                                      memmap_npz_member, npz_name)
from cxrstudy.data.labels import NIH_CLASSES
from cxrstudy.paths import DataNotFoundError

COUNTS = {"train": 7, "val": 3, "test": 5}


def fabricate(folder, size=28, compressed=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in COUNTS.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 14), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    (np.savez_compressed if compressed else np.savez)(folder / npz_name(size), **arrays)
    return arrays


def test_file_names_and_sizes_follow_medmnist(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # importing medmnist creates ~/.medmnist
    from medmnist.dataset import MedMNIST2D
    from medmnist.info import INFO

    info = INFO["chestmnist"]
    assert tuple(MedMNIST2D.available_sizes) == AVAILABLE_SIZES
    assert f"/{npz_name(28)}?" in info["url"]
    for size in AVAILABLE_SIZES[1:]:
        assert f"/{npz_name(size)}?" in info[f"url_{size}"]
    # MedMNIST's label names are the NIH findings in NIH_CLASSES order ("pleural" = thickening).
    names = [info["label"][str(i)] for i in range(14)]
    assert all(c.lower().startswith(n) for c, n in zip(NIH_CLASSES, names))
    assert (default_size(16), default_size(64), default_size(100), default_size(512)) \
        == (28, 64, 128, 224)


def test_reads_labels_images_and_official_split(tmp_path):
    arrays = fabricate(tmp_path / "medmnist")
    ds = ChestMNISTDataset(root=tmp_path, image_size=28)       # data root holding medmnist/
    assert len(ds) == 15 and ds.classes == NIH_CLASSES
    assert list(ds.records["official_split"]) == ["train"] * 7 + ["val"] * 3 + ["test"] * 5
    assert (ds.records["patient_id"] == ds.records["image_id"]).all()
    assert (ds.labels[7:10] == arrays["val_labels"]).all()
    assert (ds.read_image(8) == arrays["val_images"][1]).all()
    assert isinstance(memmap_npz_member(ds.path, "test_images"), np.memmap)
    item = ds[12]
    assert tuple(item["image"].shape) == (1, 28, 28)
    assert np.allclose(item["image"][0].numpy() * 255, arrays["test_images"][2])


def test_load_dataset_honours_the_official_val(tmp_path):
    fabricate(tmp_path / "medmnist")
    parts = {s: load_dataset("chestmnist", tmp_path, split=s, image_size=28)
             for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in parts.items()} == COUNTS
    assert list(parts["val"].records["image_id"]) == ["val_000000", "val_000001", "val_000002"]


def test_compressed_npz_and_resizing(tmp_path):
    arrays = fabricate(tmp_path, size=64, compressed=True)
    ds = ChestMNISTDataset(root=tmp_path, image_size=48)      # closest size >= 48 is 64
    assert ds.size == 64 and memmap_npz_member(ds.path, "train_images") is None
    assert (ds.read_image(0) == arrays["train_images"][0]).all()
    assert tuple(ds[0]["image"].shape) == (1, 48, 48)


def test_missing_file_names_the_file_and_the_download_command(tmp_path):
    fabricate(tmp_path, size=28)
    with pytest.raises(DataNotFoundError,
                       match=r"chestmnist_224\.npz.*sizes present there: \[28\].*"
                             r"cxrstudy data download chestmnist"):
        ChestMNISTDataset(root=tmp_path, image_size=224)


def test_wrong_keys_or_shapes_raise(tmp_path):
    np.savez(tmp_path / "chestmnist.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="missing arrays.*val_images"):
        ChestMNISTDataset(root=tmp_path, image_size=28)
    arrays = {f"{s}_{k}": (np.zeros((2, 28, 28), np.uint8) if k == "images"
                           else np.zeros((2, 13), np.uint8))
              for s in ("train", "val", "test") for k in ("images", "labels")}
    np.savez(tmp_path / "chestmnist.npz", **arrays)
    with pytest.raises(ValueError, match=r"train_labels has shape \(2, 13\)"):
        ChestMNISTDataset(root=tmp_path, image_size=28)


def test_dataset_pickles_for_worker_processes(tmp_path):
    """DataLoader workers started with spawn pickle the dataset; the lock must not travel."""
    import pickle

    fabricate(tmp_path / "medmnist")
    ds = ChestMNISTDataset(root=tmp_path, image_size=28)
    first = ds.read_image(0)
    clone = pickle.loads(pickle.dumps(ds))
    assert (clone.read_image(0) == first).all()
