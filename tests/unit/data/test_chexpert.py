"""CheXpert adapter: label policies against the raw packaged CSV, views, images."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrstudy.data import load_dataset
from cxrstudy.data.chexpert import CheXpertDataset, apply_label_policies
from cxrstudy.data.labels import CHEXPERT_CLASSES
from cxrstudy.data.splits import assign_splits
from cxrstudy.paths import DataNotFoundError, dataset_dir

XRV_DATA = Path(importlib.util.find_spec("torchxrayvision").submodule_search_locations[0]) / "data"
PACKAGED = XRV_DATA / "chexpert_train.csv.gz"
HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_CLASSES)


@pytest.fixture(scope="module")
def raw() -> pd.DataFrame:
    return pd.read_csv(PACKAGED)


@pytest.fixture(scope="module")
def frontal_raw(raw) -> pd.DataFrame:
    return raw[(raw["Frontal/Lateral"] == "Frontal") & raw["AP/PA"].isin(["AP", "PA"])]


@pytest.fixture(scope="module")
def default_policy() -> CheXpertDataset:
    return CheXpertDataset(csv_path=PACKAGED, labels_only=True)  # u_ones, blanks -> 0


@pytest.fixture(scope="module")
def ignore_policy() -> CheXpertDataset:
    return CheXpertDataset(csv_path=PACKAGED, labels_only=True, uncertainty="ignore",
                           blank="ignore")


def expected_counts(column: pd.Series, uncertainty: str, blank: str):
    """(positives, unknown, negatives) a policy must give, counted with pandas."""
    n_pos, n_unc = int((column == 1).sum()), int((column == -1).sum())
    n_neg, n_blank = int((column == 0).sum()), int(column.isna().sum())
    assert n_pos + n_unc + n_neg + n_blank == len(column)
    positives = n_pos + (n_unc if uncertainty == "u_ones" else 0)
    unknown = (n_unc if uncertainty == "ignore" else 0) + (n_blank if blank == "ignore" else 0)
    return positives, unknown, len(column) - positives - unknown


def assert_counts(labels: np.ndarray, frontal_raw: pd.DataFrame, uncertainty: str, blank: str):
    for c, name in enumerate(CHEXPERT_CLASSES):
        positives, unknown, negatives = expected_counts(frontal_raw[name], uncertainty, blank)
        got = labels[:, c]
        assert ((got == 1).sum(), np.isnan(got).sum(), (got == 0).sum()) \
            == (positives, unknown, negatives), name


def test_default_policy_counts_match_the_raw_csv(default_policy, frontal_raw):
    assert len(default_policy) == len(frontal_raw) == 191010
    assert_counts(default_policy.labels, frontal_raw, "u_ones", "zeros")
    # e.g. Atelectasis among frontal AP/PA images: 1 and -1 both become positive.
    column = frontal_raw["Atelectasis"]
    assert default_policy.labels[:, CHEXPERT_CLASSES.index("Atelectasis")].sum() \
        == (column == 1).sum() + (column == -1).sum()
    assert not np.isnan(default_policy.labels).any()


def test_ignore_policy_counts_match_the_raw_csv(ignore_policy, frontal_raw):
    assert_counts(ignore_policy.labels, frontal_raw, "ignore", "ignore")
    # Unknown cells are masked, never read as negatives.
    assert (ignore_policy.masks == ~np.isnan(ignore_policy.labels)).all()
    assert (ignore_policy.targets[np.isnan(ignore_policy.labels)] == 0).all()


@pytest.mark.parametrize("uncertainty, blank", [("u_zeros", "zeros"), ("u_ones", "ignore"),
                                                ("ignore", "zeros")])
def test_other_policies_on_the_raw_cells(frontal_raw, uncertainty, blank):
    raw_cells = frontal_raw[CHEXPERT_CLASSES].to_numpy(dtype=np.float64)
    labels = apply_label_policies(raw_cells, uncertainty, blank)
    assert_counts(labels, frontal_raw, uncertainty, blank)


def test_first_rows_by_hand(ignore_policy):
    ds = ignore_policy
    # CSV line 3: patient00002/study2 frontal AP: Cardiomegaly -1, Lung Opacity 1, Edema -1,
    # Consolidation -1, Atelectasis -1, Pleural Effusion -1, Fracture 1, the rest blank.
    row = ds.records.index[ds.records["image_id"]
                           == "train/patient00002/study2/view1_frontal.jpg"][0]
    labels = dict(zip(CHEXPERT_CLASSES, ds.labels[row]))
    assert labels["Lung Opacity"] == 1 and labels["Fracture"] == 1
    assert np.isnan(labels["Cardiomegaly"]) and np.isnan(labels["Pleural Effusion"])
    assert np.isnan(labels["No Finding"]) and np.isnan(labels["Support Devices"])
    assert ds.masks[row].sum() == 2
    record = ds.records.iloc[row]
    assert (record["patient_id"], record["sex"], record["age"], record["view"],
            record["official_split"]) == ("patient00002", "F", 87.0, "AP", "train")


def test_view_filters(raw):
    lateral = CheXpertDataset(csv_path=PACKAGED, labels_only=True, views=("lateral",))
    assert len(lateral) == (raw["Frontal/Lateral"] == "Lateral").sum()
    assert set(lateral.records["view"]) == {"Lateral"}
    pa = CheXpertDataset(csv_path=PACKAGED, labels_only=True, ap_pa=("PA",))
    assert len(pa) == ((raw["Frontal/Lateral"] == "Frontal") & (raw["AP/PA"] == "PA")).sum()
    assert set(pa.records["view"]) == {"PA"}
    with pytest.raises(ValueError, match="views"):
        CheXpertDataset(csv_path=PACKAGED, labels_only=True, views=("oblique",))


def test_both_views_and_patient_level_split(raw):
    both = CheXpertDataset(csv_path=PACKAGED, labels_only=True, views="both", ap_pa=None)
    assert len(both) == len(raw)
    assert set(both.records["view"]) == {"AP", "PA", "LL", "RL", "Lateral"}
    assert both.records["patient_id"].str.fullmatch(r"patient\d{5}").all()
    assignment = assign_splits(both, seed=0)
    table = pd.DataFrame({"p": both.records["patient_id"], "s": assignment})
    assert (table.groupby("p")["s"].nunique() == 1).all()


def test_all_views_keep_every_row_and_frontal_keeps_fewer(raw):
    """The MXA authors read the CSVs whole; views="all" does the same, views="frontal" does not."""
    every = CheXpertDataset(csv_path=PACKAGED, labels_only=True, views="all")
    assert len(every) == len(raw) == 223414
    assert (every.records["view"] == "Lateral").sum() == (raw["Frontal/Lateral"] == "Lateral").sum()
    assert {"LL", "RL"} <= set(every.records["view"])  # frontal rows without AP/PA kept too
    frontal = CheXpertDataset(csv_path=PACKAGED, labels_only=True, views="frontal")
    assert len(frontal) == 191010 < len(every)
    assert set(frontal.records["view"]) == {"AP", "PA"}
    explicit = CheXpertDataset(csv_path=PACKAGED, labels_only=True, views="all", ap_pa=("PA",))
    assert len(explicit) == ((raw["Frontal/Lateral"] == "Lateral") | (raw["AP/PA"] == "PA")).sum()


def test_the_real_valid_csv_is_234_images_with_all_views():
    """The authors' test set: every image of valid.csv (where the real release is present)."""
    try:
        folder = dataset_dir("chexpert")
    except DataNotFoundError:
        pytest.skip("CXRSTUDY_DATA_ROOT is not set")
    valid = folder / "valid.csv"
    if not valid.is_file():
        pytest.skip(f"{valid} is not here (CheXpert is not part of the shared data)")
    raw_valid = pd.read_csv(valid)
    every = CheXpertDataset(csv_path=valid, root=folder, labels_only=True, views="all")
    frontal = CheXpertDataset(csv_path=valid, root=folder, labels_only=True, views="frontal")
    assert len(every) == len(raw_valid) == 234
    assert len(frontal) == ((raw_valid["Frontal/Lateral"] == "Frontal")
                            & raw_valid["AP/PA"].isin(["AP", "PA"])).sum() < 234


def fabricated_root(tmp_path: Path) -> Path:
    """train.csv with 3 rows (+1 lateral), valid.csv with 1, and their JPEGs."""
    root = tmp_path / "CheXpert-v1.0-small"
    empty = "," * (len(CHEXPERT_CLASSES) - 1)
    train = [
        "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,"
        "1.0" + "," * 13,
        "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,Male,50,Frontal,PA,"
        ",,-1.0,1.0" + "," * 10,
        "CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg,Male,50,Lateral,,"
        + empty,
        "CheXpert-v1.0-small/train/patient00003/study2/view1_frontal.jpg,Female,33,Frontal,AP,"
        + ",0,0,0,0,1.0" + "," * 8,
    ]
    valid = ["CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg,Male,73,"
             "Frontal,AP," + ",".join(["0.0"] * 10 + ["1.0"] + ["0.0"] * 3)]
    root.mkdir(parents=True)
    (root / "train.csv").write_text("\n".join([HEADER, *train]) + "\n")
    (root / "valid.csv").write_text("\n".join([HEADER, *valid]) + "\n")
    for k, line in enumerate(train + valid):
        rel = line.split(",")[0].removeprefix("CheXpert-v1.0-small/")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20 + k, 24), 50 * k, dtype=np.uint8)).save(root / rel)
    return root


def test_fabricated_images_are_read(tmp_path):
    root = fabricated_root(tmp_path)
    ds = CheXpertDataset(root=tmp_path, image_size=16)   # data root holding the folder
    assert ds.root == root
    assert list(ds.records["image_id"]) == [
        "train/patient00001/study1/view1_frontal.jpg",
        "train/patient00002/study1/view1_frontal.jpg",
        "train/patient00003/study2/view1_frontal.jpg",
        "valid/patient64541/study1/view1_frontal.jpg"]
    assert list(ds.records["official_split"]) == ["train", "train", "train", "test"]
    assert ds.read_image(1).shape == (21, 24) and int(ds.read_image(1)[0, 0]) == 50
    assert ds.read_image(3).shape == (24, 24)
    assert tuple(ds[2]["image"].shape) == (1, 16, 16)
    # patient00002 frontal: Cardiomegaly -1 -> 1 (U-Ones), Lung Opacity 1, rest blank -> 0
    assert list(np.nonzero(ds.labels[1])[0]) == [CHEXPERT_CLASSES.index("Cardiomegaly"),
                                                 CHEXPERT_CLASSES.index("Lung Opacity")]
    assert ds.labels[3, CHEXPERT_CLASSES.index("Pleural Effusion")] == 1
    test_part = load_dataset("chexpert", tmp_path, split="test", image_size=16)
    assert list(test_part.records["patient_id"]) == ["patient64541"]


def test_missing_image_is_reported_or_raises_when_strict(tmp_path):
    root = fabricated_root(tmp_path)
    (root / "train/patient00003/study2/view1_frontal.jpg").unlink()
    with pytest.warns(UserWarning, match="1 of 4 .*patient00003"):
        ds = CheXpertDataset(root=root, image_size=16)
    assert len(ds) == 4
    with pytest.raises(FileNotFoundError, match="patient00003"):
        ds.read_image(2)
    with pytest.raises(DataNotFoundError, match="patient00003"):
        CheXpertDataset(root=root, image_size=16, strict=True)


def test_bad_values_and_columns_raise_naming_the_file(tmp_path):
    root = fabricated_root(tmp_path)
    lines = (root / "train.csv").read_text().splitlines()
    lines[2] = lines[2].replace("-1.0", "2.0")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train\.csv line 3.*Cardiomegaly"):
        CheXpertDataset(root=root)
    (root / "train.csv").write_text("Path,Sex,Age\nx,Male,3\n")
    with pytest.raises(ValueError, match=r"train\.csv.*Frontal/Lateral"):
        CheXpertDataset(root=root)


def test_unknown_policy_raises():
    with pytest.raises(ValueError, match="uncertainty"):
        CheXpertDataset(csv_path=PACKAGED, labels_only=True, uncertainty="u_maybe")
