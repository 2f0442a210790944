"""VinDr-CXR adapter: radiologist aggregation on the packaged Kaggle file, PhysioNet layout."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrstudy.data import CorruptImageError, load_dataset
from cxrstudy.data.labels import VINDR_GLOBAL_CLASSES, VINDR_KAGGLE_CLASSES, VINDR_LOCAL_CLASSES
from cxrstudy.data.vindr import VinDrDataset
from cxrstudy.paths import DataNotFoundError

XRV_DATA = Path(importlib.util.find_spec("torchxrayvision").submodule_search_locations[0]) / "data"
PACKAGED = XRV_DATA / "vinbigdata-train.csv.gz"

# Hand-read from the packaged rows (readers R8, R9, R10 on each image):
#  9a5094b2...: Cardiomegaly by R8, R9, R10; Pleural effusion, Pleural thickening and
#               Aortic enlargement by R9 only.
#  0005e8e3...: Lung Opacity by R9, R10; Nodule/Mass and Consolidation by R8; Infiltration
#               by R10.
#  014e3dd7...: Aortic enlargement by R8, R10; Pleural thickening by R9.
#  50a41819...: "No finding" from all three.
BY_HAND = {
    "9a5094b2563a1ef3ff50dc5c7ff71345": (
        {"Cardiomegaly", "Pleural effusion", "Pleural thickening", "Aortic enlargement"},
        {"Cardiomegaly"}),
    "0005e8e3701dfb1dd93d53e2ff537b6e": (
        {"Lung Opacity", "Nodule/Mass", "Consolidation", "Infiltration"}, {"Lung Opacity"}),
    "014e3dd712dc90f61da7ce8747d8c4c0": (
        {"Aortic enlargement", "Pleural thickening"}, {"Aortic enlargement"}),
    "50a418190bc3fb1ef1633bf9678929b3": (set(), set()),
}


@pytest.fixture(scope="module")
def kaggle_any():
    return VinDrDataset(csv_path=PACKAGED, labels_only=True, aggregate="any")


@pytest.fixture(scope="module")
def kaggle_majority():
    return VinDrDataset(csv_path=PACKAGED, labels_only=True, aggregate="majority")


def positives(ds, image_id):
    row = int(np.nonzero(ds.records["image_id"].to_numpy() == image_id)[0][0])
    return {c for c, v in zip(ds.classes, ds.labels[row]) if v == 1}, row


def test_kaggle_file_shape(kaggle_any):
    assert len(kaggle_any) == 15000 and kaggle_any.classes == VINDR_KAGGLE_CLASSES
    assert (kaggle_any.records["patient_id"] == kaggle_any.records["image_id"]).all()
    assert (kaggle_any.records["n_readers"] == 3).all()
    assert "official_split" not in kaggle_any.records.columns


@pytest.mark.parametrize("image_id", sorted(BY_HAND))
def test_any_and_majority_by_hand(kaggle_any, kaggle_majority, image_id):
    expected_any, expected_majority = BY_HAND[image_id]
    assert positives(kaggle_any, image_id)[0] == expected_any
    assert positives(kaggle_majority, image_id)[0] == expected_majority


def test_boxes_follow_the_aggregated_labels(kaggle_any, kaggle_majority):
    image_id = "9a5094b2563a1ef3ff50dc5c7ff71345"
    any_boxes = kaggle_any.boxes[kaggle_any.boxes["image_id"] == image_id]
    majority_boxes = kaggle_majority.boxes[kaggle_majority.boxes["image_id"] == image_id]
    assert len(any_boxes) == 6
    assert list(majority_boxes["label"]) == ["Cardiomegaly"] * 3
    assert sorted(majority_boxes["rad_id"]) == ["R10", "R8", "R9"]
    # R10's box: x_min=691, y_min=1375, x_max=1653, y_max=1831.
    r10 = majority_boxes[majority_boxes["rad_id"] == "R10"].iloc[0]
    assert (r10["x"], r10["y"], r10["w"], r10["h"]) == (691, 1375, 962, 456)
    # No size table, no DICOM: the space is the largest coordinate of the image's boxes.
    assert (r10["space_w"], r10["space_h"], r10["space_exact"]) == (1875, 1992, False)


def test_kaggle_counts_against_pandas(kaggle_any):
    raw = pd.read_csv(PACKAGED)
    readers_per_class = raw.groupby("class_name")["image_id"].nunique()
    for c, name in enumerate(VINDR_KAGGLE_CLASSES):
        assert kaggle_any.labels[:, c].sum() == readers_per_class[name], name


def test_kaggle_has_no_global_labels():
    with pytest.raises(ValueError, match="PhysioNet"):
        VinDrDataset(csv_path=PACKAGED, labels_only=True, label_set="global")


# ---- a fabricated PhysioNet-style release ---------------------------------------------------
TRAIN_COLUMNS = ["image_id", "rad_id", *VINDR_LOCAL_CLASSES, "COPD", "Lung tumor", "Pneumonia",
                 "Tuberculosis", "Other diseases", "No finding"]


def label_row(image_id, rad_id, positive):
    return [image_id, rad_id] + [int(c in positive) for c in TRAIN_COLUMNS[2:]]


def physionet_root(tmp_path: Path) -> Path:
    root = tmp_path / "vindr-cxr"
    (root / "annotations").mkdir(parents=True)
    train = pd.DataFrame([
        label_row("aaa", "R1", {"Cardiomegaly", "Aortic enlargement", "Other diseases"}),
        label_row("aaa", "R2", {"Cardiomegaly", "Pneumonia"}),
        label_row("aaa", "R3", {"Pleural effusion", "Other diseases"}),
        label_row("bbb", "R1", {"No finding"}),
        label_row("bbb", "R4", {"No finding"}),
        label_row("bbb", "R5", {"Nodule/Mass", "Lung tumor"}),
    ], columns=TRAIN_COLUMNS)
    train.to_csv(root / "annotations" / "image_labels_train.csv", index=False)
    # The test file: one consensus row per image, no rad_id, "Other disease" spelling.
    test_columns = ["image_id"] + [c if c != "Other diseases" else "Other disease"
                                   for c in TRAIN_COLUMNS[2:]]
    test = pd.DataFrame([["ccc"] + [int(c in {"Tuberculosis", "Pleural thickening"})
                                    for c in TRAIN_COLUMNS[2:]]], columns=test_columns)
    test.to_csv(root / "annotations" / "image_labels_test.csv", index=False)
    boxes = pd.DataFrame([
        ["aaa", "R1", "Cardiomegaly", 100, 200, 300, 260],
        ["aaa", "R2", "Cardiomegaly", 110, 205, 310, 270],
        ["aaa", "R1", "Aortic enlargement", 150, 50, 200, 100],
        ["aaa", "R3", "Pleural effusion", 20, 300, 80, 380],
        ["bbb", "R1", "No finding", None, None, None, None],
        ["bbb", "R5", "Nodule/Mass", 40, 40, 60, 60],
    ], columns=["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"])
    boxes.to_csv(root / "annotations" / "annotations_train.csv", index=False)
    for split, image_id in (("train", "aaa"), ("train", "bbb"), ("test", "ccc")):
        (root / split).mkdir(exist_ok=True)
        Image.fromarray(np.full((50, 40), 90, dtype=np.uint8)).save(root / split / f"{image_id}.png")
    return root


def test_physionet_local_any_and_majority(tmp_path):
    root = physionet_root(tmp_path)
    any_ = VinDrDataset(root=root, image_size=20, label_set="local", aggregate="any")
    assert any_.layout == "physionet" and any_.classes == VINDR_LOCAL_CLASSES
    assert list(any_.records["image_id"]) == ["aaa", "bbb", "ccc"]
    assert list(any_.records["official_split"]) == ["train", "train", "test"]
    assert list(any_.records["n_readers"]) == [3, 3, 1]
    assert positives(any_, "aaa")[0] == {"Cardiomegaly", "Aortic enlargement",
                                         "Pleural effusion"}
    assert positives(any_, "bbb")[0] == {"Nodule/Mass"}
    assert positives(any_, "ccc")[0] == {"Pleural thickening"}
    majority = VinDrDataset(root=root, image_size=20, aggregate="majority")
    assert positives(majority, "aaa")[0] == {"Cardiomegaly"}     # 2 of 3
    assert positives(majority, "bbb")[0] == set()                # 1 of 3
    assert positives(majority, "ccc")[0] == {"Pleural thickening"}  # consensus row
    assert list(majority.boxes["label"]) == ["Cardiomegaly", "Cardiomegaly"]
    assert len(any_.boxes) == 5


def test_physionet_global_and_both(tmp_path):
    root = physionet_root(tmp_path)
    glob = VinDrDataset(root=root, image_size=20, label_set="global", aggregate="majority")
    assert glob.classes == VINDR_GLOBAL_CLASSES
    assert positives(glob, "aaa")[0] == {"Other diseases"}   # R1 and R3
    assert positives(glob, "bbb")[0] == {"No finding"}       # R1 and R4
    assert positives(glob, "ccc")[0] == {"Tuberculosis"}     # 'Other disease' column read
    assert len(glob.boxes) == 0                              # global labels have no boxes
    both = VinDrDataset(root=root, image_size=20, label_set="both", aggregate="any")
    assert both.num_classes == 28
    assert positives(both, "bbb")[0] == {"Nodule/Mass", "Lung tumor", "No finding"}


def test_physionet_images_boxes_and_sizes(tmp_path):
    root = physionet_root(tmp_path)
    ds = VinDrDataset(root=root, image_size=20, aggregate="majority")
    assert ds.read_image(0).shape == (50, 40)
    # Without a size table or DICOM the space is the largest coordinate: x 310, y 380.
    with pytest.warns(UserWarning, match="image_sizes.csv"):
        boxes = ds.boxes_for(0)
    assert boxes[0]["x"] == pytest.approx(100 * 20 / 310)
    # A size table makes the space exact.
    (root / "image_sizes.csv").write_text("image_id,width,height\naaa,400,500\n")
    ds = VinDrDataset(root=root, image_size=20, aggregate="majority")
    box = ds.boxes_for(0)[0]
    assert (box["x"], box["y"], box["w"], box["h"]) == pytest.approx((5, 8, 10, 2.4))
    assert ds.boxes["space_exact"].all()


def test_splits_use_the_official_test_set(tmp_path):
    root = physionet_root(tmp_path)
    test = load_dataset("vindr", root, split="test", image_size=16)
    assert list(test.records["image_id"]) == ["ccc"]


def test_dicom_needs_pydicom_or_is_reported_corrupt(tmp_path):
    root = physionet_root(tmp_path)
    (root / "train" / "aaa.png").unlink()
    (root / "train" / "aaa.dicom").write_bytes(b"\x00" * 200)
    ds = VinDrDataset(root=root, image_size=16)
    assert ds.records.at[0, "path"].endswith("aaa.dicom")
    if importlib.util.find_spec("pydicom") is None:
        with pytest.raises(ImportError, match="pip install pydicom"):
            ds.read_image(0)
    else:
        with pytest.raises(CorruptImageError, match="aaa.dicom"):
            ds.read_image(0)


def test_missing_images_and_bad_files(tmp_path):
    root = physionet_root(tmp_path)
    (root / "train" / "bbb.png").unlink()
    with pytest.warns(UserWarning, match="1 of 3 .*bbb"):
        ds = VinDrDataset(root=root, image_size=16)
    assert len(ds) == 3
    with pytest.raises(FileNotFoundError, match="bbb"):
        ds.read_image(1)
    with pytest.raises(DataNotFoundError, match="bbb"):
        VinDrDataset(root=root, image_size=16, strict=True)
    labels = root / "annotations" / "image_labels_train.csv"
    table = pd.read_csv(labels).rename(columns={"ILD": "Lung nodules"})
    table.to_csv(labels, index=False)
    with pytest.raises(ValueError, match="image_labels_train.csv.*Lung nodules"):
        VinDrDataset(root=root, labels_only=True)


def test_kaggle_layout_from_root_with_png_copies(tmp_path):
    root = tmp_path / "vindr-cxr"
    (root / "train").mkdir(parents=True)
    raw = pd.read_csv(PACKAGED)
    keep = raw[raw["image_id"].isin(list(BY_HAND))]
    keep.to_csv(root / "train.csv", index=False)
    for image_id in BY_HAND:
        Image.fromarray(np.zeros((30, 20), dtype=np.uint8)).save(root / "train" / f"{image_id}.png")
    ds = VinDrDataset(root=tmp_path, image_size=16, aggregate="majority")
    assert ds.layout == "kaggle" and len(ds) == 4
    assert positives(ds, "014e3dd712dc90f61da7ce8747d8c4c0")[0] == {"Aortic enlargement"}
    assert ds.read_image(0).shape == (30, 20)
    lines = (root / "train.csv").read_text().splitlines()
    lines[1] = lines[1].replace(lines[1].split(",")[1], "Lung nodules")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="train.csv line 2.*Lung nodules"):
        VinDrDataset(root=root, labels_only=True)
    shutil.rmtree(root)
    with pytest.raises(DataNotFoundError):
        VinDrDataset(root=root)
