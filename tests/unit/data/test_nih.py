"""NIH ChestX-ray14 adapter: the real sample, the full packaged label file, fabricated quirks."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrstudy.data import CorruptImageError, load_dataset
from cxrstudy.data.labels import NIH_CLASSES
from cxrstudy.data.nih import NIHDataset
from cxrstudy.data.check import check_dataset
from cxrstudy.data.splits import PatientLeakError, assign_splits
from cxrstudy.paths import DataNotFoundError

XRV_DATA = Path(importlib.util.find_spec("torchxrayvision").submodule_search_locations[0]) / "data"
HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
          "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")


def write_png(path: Path, size=(40, 30), value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), value, dtype=np.uint8)).save(path)


def fabricated_root(tmp_path: Path, rows: list[str], header: str = HEADER,
                    csv_name: str = "Data_Entry_2017_v2020.csv") -> Path:
    """A tiny NIH root: the given CSV rows and a PNG for each listed image."""
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    (root / csv_name).write_text("\n".join([header, *rows]) + "\n")
    for row in rows:
        write_png(root / "images" / row.split(",")[0])
    return root


def onehot(*names):
    return np.array([float(c in names) for c in NIH_CLASSES], dtype=np.float32)


# ---- the real sample ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample(nih_sample_root):
    return NIHDataset(root=nih_sample_root, image_size=64)


def row_of(ds, image_id):
    return int(np.nonzero(ds.records["image_id"].to_numpy() == image_id)[0][0])


def test_sample_counts(sample):
    assert len(sample) == 618
    assert sample.records["patient_id"].nunique() == 618
    assert len(sample.boxes) == 12
    assert set(sample.records["view"]) == {"PA", "AP"}


def test_sample_labels_match_the_raw_csv_by_hand(sample):
    # Rows copied from Data_Entry_2017_v2020.csv of the sample.
    assert (sample.labels[row_of(sample, "00000282_000.png")]
            == onehot("Consolidation", "Effusion", "Infiltration", "Nodule")).all()
    assert (sample.labels[row_of(sample, "00000353_000.png")] == onehot("Emphysema")).all()
    assert (sample.labels[row_of(sample, "00026911_000.png")]
            == onehot("Effusion", "Infiltration", "Mass")).all()
    record = sample.records.iloc[row_of(sample, "00000282_000.png")]
    assert (record["patient_id"], record["sex"], record["age"], record["view"]) \
        == ("282", "F", 65.0, "PA")
    assert (record["original_width"], record["original_height"]) == (2048, 2500)


def test_sample_no_finding_rows_are_all_zero(sample, nih_sample_root):
    raw = pd.read_csv(nih_sample_root / "Data_Entry_2017_v2020.csv", index_col=False)
    healthy = set(raw["Image Index"][raw["Finding Labels"] == "No Finding"])
    mask = sample.records["image_id"].isin(healthy).to_numpy()
    assert mask.sum() == 100
    assert (sample.labels[mask] == 0).all()
    assert (sample.labels[~mask].sum(axis=1) >= 1).all()


def test_sample_boxes_scale_into_the_image(sample):
    boxes = []
    for image_id in sample.boxes["image_id"].unique():
        boxes += sample.boxes_for(row_of(sample, image_id))
    assert len(boxes) == 12
    for box in boxes:
        assert box["x"] >= 0 and box["y"] >= 0
        assert box["x"] + box["w"] <= 64 and box["y"] + box["h"] <= 64
    # 00004296_000.png Atelectasis at x=731.428571428571 in 1024 space -> 45.714 at 64 px.
    atelectasis = sample.boxes_for(row_of(sample, "00004296_000.png"))[0]
    assert atelectasis["label"] == "Atelectasis"
    assert atelectasis["x"] == pytest.approx(731.428571428571 / 16)
    assert atelectasis["w"] == pytest.approx(119.195767195767 / 16)


def test_sample_infiltrate_box_is_labelled_infiltration(sample):
    i = row_of(sample, "00026911_000.png")
    assert [b["label"] for b in sample.boxes_for(i)] == ["Infiltration"]
    assert sample.labels[i, NIH_CLASSES.index("Infiltration")] == 1
    assert sample[i]["meta"]["boxes"][0]["label"] == "Infiltration"


def test_sample_image_read_at_file_size_then_resized(sample):
    assert sample.read_image(0).shape == (512, 512)
    item = sample[0]
    assert tuple(item["image"].shape) == (1, 64, 64)
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert item["mask"].sum() == 14


def test_sample_patient_level_splits_via_load_dataset(nih_sample_root):
    parts = {s: load_dataset("nih", nih_sample_root, split=s, image_size=32, seed=0)
             for s in ("train", "val", "test")}
    ids = {s: set(d.records["image_id"]) for s, d in parts.items()}
    patients = {s: set(d.records["patient_id"]) for s, d in parts.items()}
    assert sum(len(v) for v in ids.values()) == 618
    assert not patients["train"] & patients["test"] and not patients["train"] & patients["val"]
    assert not patients["val"] & patients["test"]
    assert len(patients["test"]) == round(0.2 * 618)


def test_corrupt_png_raises_naming_the_file(tmp_path, nih_sample_root):
    raw = (nih_sample_root / "Data_Entry_2017_v2020.csv").read_text().splitlines()
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(raw[:4]) + "\n")
    names = [line.split(",")[0] for line in raw[1:4]]
    for name in names:
        shutil.copy(nih_sample_root / "images" / name, root / "images" / name)
    broken = root / "images" / names[1]
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 20)
    ds = NIHDataset(root=root, image_size=32)
    assert ds.read_image(0).shape == (512, 512)
    with pytest.raises(CorruptImageError, match=names[1]):
        ds.read_image(row_of(ds, names[1]))
    with pytest.raises(CorruptImageError, match=names[1]):
        ds[row_of(ds, names[1])]


# ---- the full packaged label file ---------------------------------------------------------
@pytest.fixture(scope="module")
def packaged_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nih_full")
    shutil.copy(XRV_DATA / "Data_Entry_2017_v2020.csv.gz", root / "Data_Entry_2017_v2020.csv.gz")
    shutil.copy(XRV_DATA / "BBox_List_2017.csv.gz", root / "BBox_List_2017.csv.gz")
    return root


@pytest.fixture(scope="module")
def full_labels(packaged_root):
    return NIHDataset(root=packaged_root, labels_only=True, views=None)


def test_full_label_file_counts_match_pandas(full_labels):
    raw = pd.read_csv(XRV_DATA / "Data_Entry_2017_v2020.csv.gz", index_col=False)
    assert len(full_labels) == len(raw) == 112120
    assert full_labels.records["patient_id"].nunique() == 30805
    findings = raw["Finding Labels"].str.split("|").explode()
    counts = findings.value_counts()
    for c, name in enumerate(NIH_CLASSES):
        assert full_labels.labels[:, c].sum() == counts[name], name
    healthy = (raw["Finding Labels"] == "No Finding").to_numpy()
    assert (full_labels.labels[healthy] == 0).all()
    assert ((full_labels.labels.sum(axis=1) == 0) == healthy).all()
    # 984 boxes in 1024 space, 'Infiltrate' renamed
    assert len(full_labels.boxes) == 984
    assert "Infiltrate" not in set(full_labels.boxes["label"])
    assert (full_labels.boxes["label"] == "Infiltration").sum() == 123
    assert set(full_labels.boxes["space_w"]) == {1024}


def test_full_label_file_view_filter(packaged_root):
    pa = NIHDataset(root=packaged_root, labels_only=True, views=("PA",))
    assert len(pa) == 67310 and set(pa.records["view"]) == {"PA"}


def test_full_label_file_patient_level_split(full_labels):
    assignment = assign_splits(full_labels, seed=0)
    table = pd.DataFrame({"patient": full_labels.records["patient_id"], "split": assignment})
    assert (table.groupby("patient")["split"].nunique() == 1).all()
    assert set(assignment) == {"train", "val", "test"}
    other = assign_splits(full_labels, seed=1)
    assert (assignment == assign_splits(full_labels, seed=0)).all()
    assert (assignment != other).any()


def test_full_label_file_with_a_handful_of_fabricated_images(packaged_root, tmp_path):
    root = tmp_path / "nih"
    root.mkdir()
    for name in ("Data_Entry_2017_v2020.csv.gz", "BBox_List_2017.csv.gz"):
        (root / name).symlink_to(packaged_root / name)
    # Images in the release's images_NNN/images sub-folders, found by a recursive search.
    names = ["00000001_000.png", "00000001_001.png", "00000013_005.png", "00013118_008.png"]
    for k, name in enumerate(names):
        write_png(root / f"images_00{k % 2 + 1}" / "images" / name, size=(40 + k, 30))
    with pytest.warns(UserWarning, match="112116 of 112120 images listed are missing"):
        full = NIHDataset(root=root, image_size=16, views=None)
    assert len(full) == 112120   # missing files stay listed: data check and the cache name them
    rows = [row_of(full, name) for name in names]
    ds = full.subset(rows)
    assert (ds.labels[0] == onehot("Cardiomegaly")).all()
    assert (ds.labels[1] == onehot("Cardiomegaly", "Emphysema")).all()
    # Sizes come from the files, not from an assumed 1024.
    assert [ds.read_image(i).shape for i in range(4)] == [(30, 40), (30, 41), (30, 42), (30, 43)]
    absent = row_of(full, "00000002_000.png")
    with pytest.raises(FileNotFoundError, match="00000002_000.png"):
        full.read_image(absent)
    # 00013118_008.png has an Atelectasis box at x=225.084745762712 (1024 space).
    box = ds.boxes_for(3)
    assert box[0]["label"] == "Atelectasis"
    assert box[0]["x"] == pytest.approx(225.084745762712 * 16 / 1024)
    with pytest.raises(DataNotFoundError, match="missing"):
        NIHDataset(root=root, image_size=16, views=None, strict=True)


# ---- fabricated quirks ----------------------------------------------------------------------
def test_unknown_finding_raises_naming_the_row(tmp_path):
    root = fabricated_root(tmp_path, [
        "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143",
        "00000002_000.png,Cardiomegaly|Pneumonitis,0,2,80,M,PA,2500,2048,0.171,0.171",
    ])
    with pytest.raises(ValueError, match=r"line 3 \(image '00000002_000.png'\).*Pneumonitis"):
        NIHDataset(root=root)


def test_missing_columns_raise_naming_the_file(tmp_path):
    root = fabricated_root(tmp_path, ["00000001_000.png,Cardiomegaly,0,1,57,M"],
                           header="Image Index,Finding Labels,Follow-up #,Patient ID,"
                                  "Patient Age,Patient Gender")
    with pytest.raises(ValueError, match=r"Data_Entry_2017_v2020\.csv.*View Position"):
        NIHDataset(root=root)


def test_no_finding_with_a_finding_raises(tmp_path):
    root = fabricated_root(tmp_path, [
        "00000001_000.png,No Finding|Mass,0,1,57,M,PA,2682,2749,0.143,0.143"])
    with pytest.raises(ValueError, match="line 2.*No Finding"):
        NIHDataset(root=root)


def test_old_file_name_patient_sex_and_coded_ages(tmp_path):
    header = HEADER.replace("Patient Gender", "Patient Sex")
    root = fabricated_root(tmp_path, [
        "00000001_000.png,Infiltrate|Pleural_Thickening,0,1,058Y,F,AP,2682,2749,0.143,0.143",
        "00000002_000.png,No Finding,3,2,6M,M,PA,2682,2749,0.143,0.143",
    ], header=header, csv_name="Data_Entry_2017.csv")
    ds = NIHDataset(root=root, image_size=16)
    assert ds.label_file.name == "Data_Entry_2017.csv"
    assert (ds.labels[0] == onehot("Infiltration", "Pleural_Thickening")).all()
    assert list(ds.records["sex"]) == ["F", "M"]
    assert list(ds.records["age"]) == [58.0, 0.5]
    assert list(ds.records["follow_up"]) == [0, 3]


def test_missing_image_folder_raises(tmp_path):
    root = fabricated_root(tmp_path, ["00000001_000.png,Mass,0,1,57,M,PA,1,1,0.1,0.1"])
    shutil.rmtree(root / "images")
    with pytest.raises(DataNotFoundError, match="images"):
        NIHDataset(root=root)


def test_official_lists_become_the_split(tmp_path):
    rows = [f"000000{p:02d}_000.png,Mass,0,{p},50,M,PA,1,1,0.1,0.1" for p in range(1, 21)]
    root = fabricated_root(tmp_path, rows)
    names = [r.split(",")[0] for r in rows]
    (root / "test_list.txt").write_text("\n".join(names[:5]) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(names[5:]) + "\n")
    ds = NIHDataset(root=root, image_size=16)
    assert list(ds.records["official_split"]) == ["test"] * 5 + ["train"] * 15
    assignment = assign_splits(ds, seed=0, val_fraction=0.2)
    assert list(assignment[:5]) == ["test"] * 5
    assert (assignment[5:] == "val").sum() == 3 and (assignment[5:] == "train").sum() == 12
    (root / "test_list.txt").write_text("\n".join(names[:6]) + "\n")  # one image in both
    with pytest.raises(ValueError, match=names[5]):
        NIHDataset(root=root)


def test_official_lists_sharing_a_patient_fail_the_check_and_the_split(tmp_path):
    # Patient 3 has its first image in the test list and its follow-up in train_val_list.
    rows = [f"000000{p:02d}_000.png,Mass,0,{p},50,M,PA,1,1,0.1,0.1" for p in range(1, 9)]
    rows.append("00000003_001.png,Mass,1,3,50,M,PA,1,1,0.1,0.1")
    root = fabricated_root(tmp_path, rows)
    names = [r.split(",")[0] for r in rows]
    (root / "test_list.txt").write_text("\n".join(names[:3]) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(names[3:]) + "\n")
    report = check_dataset("nih", root, progress=False)
    assert not report.ok
    assert [p for p in report.problems if "patient leakage" in p] == [
        "the official split: 1 patients have images in more than one split (patient "
        "leakage): 3 (test/train)"]
    with pytest.raises(PatientLeakError, match=r"nih: the official split: 1 patients .* 3 "):
        load_dataset("nih", root=root, split="train", image_size=16)
    # The same release with the follow-up in the test list too is clean and trains.
    (root / "test_list.txt").write_text("\n".join(names[:3] + names[-1:]) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(names[3:-1]) + "\n")
    assert check_dataset("nih", root, progress=False).ok
    assert len(load_dataset("nih", root=root, split="test", image_size=16, val_fraction=0)) == 4


def test_strict_images_from_the_environment(tmp_path, monkeypatch):
    """CXRSTUDY_STRICT_IMAGES=1 (CI) makes load_dataset strict unless told otherwise."""
    from cxrstudy.data import load_dataset

    rows = [f"000000{p:02d}_000.png,Mass,0,{p},50,M,PA,1,1,0.1,0.1" for p in range(1, 11)]
    root = fabricated_root(tmp_path, rows)
    (root / "images" / "00000003_000.png").unlink()
    monkeypatch.setenv("CXRSTUDY_STRICT_IMAGES", "1")
    with pytest.raises(DataNotFoundError, match="missing"):
        load_dataset("nih", root, split="all", image_size=16)
    assert len(load_dataset("nih", root, split="all", image_size=16, strict=False)) == 10
    monkeypatch.setenv("CXRSTUDY_STRICT_IMAGES", "0")
    assert len(load_dataset("nih", root, split="all", image_size=16)) == 10


def test_prepare_data_records_the_images_it_drops(tmp_path, monkeypatch):
    import json

    from cxrstudy.experiment import open_study

    monkeypatch.setenv("CXRSTUDY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CXRSTUDY_STRICT_IMAGES", raising=False)
    rows = [f"000000{p:02d}_000.png,Mass,0,{p},50,M,PA,1,1,0.1,0.1" for p in range(1, 31)]
    root = fabricated_root(tmp_path, rows)
    (root / "images" / "00000007_000.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="dropping 1 of 30"):
        data, _ = open_study(tmp_path / "run", "nih", root, 16, progress=False)
    assert list(data.dropped_images) == ["00000007_000.png"]
    assert "cannot decode" in data.dropped_images["00000007_000.png"]
    assert sum(len(part) for part in (data.train, data.val, data.test)) == 29
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["dropped_images"] == data.dropped_images
