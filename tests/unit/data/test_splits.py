"""Patient-level splits: no leakage, determinism, official splits, saving/loading."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from cxrstudy.data.splits import (PatientLeakError, align_splits, assign_splits, load_splits,
                                   require_disjoint_patients, save_splits, shared_patients)


def fake_dataset(patients, official=None):
    """A stand-in with only what assign_splits reads: records with image/patient ids."""
    records = pd.DataFrame({"image_id": [f"img{i}" for i in range(len(patients))],
                            "patient_id": [str(p) for p in patients]})
    if official is not None:
        records["official_split"] = official
    return SimpleNamespace(name="fake", records=records)


def patients_per_split(dataset, assignment):
    return {s: set(dataset.records["patient_id"][assignment == s]) for s in ("train", "val", "test")}


def test_no_patient_in_two_splits_and_fractions_by_patient():
    rng = np.random.default_rng(1)
    patients = rng.integers(0, 200, size=1000)  # 1000 images of (at most) 200 patients
    ds = fake_dataset(patients)
    assignment = assign_splits(ds, seed=0, val_fraction=0.1, test_fraction=0.2)
    groups = patients_per_split(ds, assignment)
    assert not groups["train"] & groups["val"]
    assert not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    n = len(np.unique(patients))
    assert len(groups["test"]) == round(0.2 * n) and len(groups["val"]) == round(0.1 * n)
    assert set(assignment) == {"train", "val", "test"}


def test_deterministic_per_seed_and_different_across_seeds():
    ds = fake_dataset(np.arange(300) // 3)
    a = assign_splits(ds, seed=7)
    assert (a == assign_splits(ds, seed=7)).all()
    assert (a != assign_splits(ds, seed=8)).any()


def test_split_does_not_depend_on_row_order():
    patients = np.arange(120) // 2
    ds = fake_dataset(patients)
    order = np.random.default_rng(0).permutation(len(patients))
    shuffled = fake_dataset(patients[order])
    a, b = assign_splits(ds, seed=3), assign_splits(shuffled, seed=3)
    by_patient_a = dict(zip(ds.records["patient_id"], a))
    by_patient_b = dict(zip(shuffled.records["patient_id"], b))
    assert by_patient_a == by_patient_b


def test_three_patients_give_three_non_empty_splits_two_raise():
    a = assign_splits(fake_dataset(["p1", "p1", "p2", "p3"]), seed=0)
    assert sorted(set(a)) == ["test", "train", "val"]
    with pytest.raises(ValueError, match="at least 3 patients"):
        assign_splits(fake_dataset(["p1", "p2", "p2"]), seed=0)


def test_zero_fraction_leaves_that_split_empty():
    a = assign_splits(fake_dataset(range(50)), seed=0, val_fraction=0.0, test_fraction=0.2)
    assert "val" not in set(a) and (a == "test").sum() == 10


def test_bad_fractions_raise():
    with pytest.raises(ValueError, match="leave patients"):
        assign_splits(fake_dataset(range(10)), val_fraction=0.5, test_fraction=0.5)


def test_official_split_kept_and_val_carved_from_train_patients():
    patients = np.repeat(np.arange(40), 2)           # 40 patients, 2 images each
    official = np.where(patients < 10, "test", "train")
    ds = fake_dataset(patients, official)
    a = assign_splits(ds, seed=0, val_fraction=0.1, test_fraction=0.5)
    assert ((a == "test") == (official == "test")).all()   # test_fraction unused
    groups = patients_per_split(ds, a)
    assert len(groups["val"]) == 3                          # round(0.1 * 30 training patients)
    assert not groups["val"] & groups["train"]


def test_official_val_is_honoured():
    official = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    a = assign_splits(fake_dataset(range(10), official), seed=5)
    assert list(a) == official


def test_unknown_official_value_raises():
    with pytest.raises(ValueError, match="valid"):
        assign_splits(fake_dataset(range(4), ["train", "valid", "test", "train"]))


def test_save_and_load_round_trip_without_overwriting(tmp_path):
    ds = fake_dataset(np.arange(30) // 2)
    a = assign_splits(ds, seed=0)
    path = save_splits(ds, a, tmp_path / "splits" / "nih_seed0.csv")
    table = load_splits(path)
    assert list(table.columns) == ["image_id", "patient_id", "split"]
    assert (table["split"].to_numpy() == a).all()
    assert (align_splits(ds, table) == a).all()
    with pytest.raises(FileExistsError):
        save_splits(ds, a, path)
    save_splits(ds, np.full(len(a), "train"), path, overwrite=True)
    assert set(load_splits(path)["split"]) == {"train"}


def test_load_rejects_bad_split_names(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("image_id,patient_id,split\na,1,train\nb,2,holdout\n")
    with pytest.raises(ValueError, match="line 3"):
        load_splits(path)


def test_align_names_images_without_a_split():
    ds = fake_dataset([1, 2, 3])
    table = pd.DataFrame({"image_id": ["img0", "img1"], "patient_id": ["1", "2"],
                          "split": ["train", "test"]})
    with pytest.raises(KeyError, match="img2"):
        align_splits(ds, table)


def test_subsample_keeps_whole_patients_and_the_split_ratio():
    from cxrstudy.data import load_dataset
    from cxrstudy.data.splits import subsample_patients

    ds = load_dataset("synthetic", split="all", image_size=32, n_images=400, n_patients=150, seed=1)
    assignment = ds.split_assignment
    keep = subsample_patients(ds, 200, seed=0, assignment=assignment)
    patients = ds.records["patient_id"].to_numpy()
    kept_patients = set(patients[keep])
    # whole patients: every image of a kept patient is kept
    assert set(np.flatnonzero(np.isin(patients, list(kept_patients)))) == set(keep)
    share = {s: (assignment[keep] == s).mean() for s in ("train", "val", "test")}
    full = {s: (assignment == s).mean() for s in ("train", "val", "test")}
    for split in share:  # the ratio survives (the bug this guards: test and val taken first)
        assert abs(share[split] - full[split]) < 0.06, (split, share, full)
    assert 180 <= len(keep) <= 230
    assert np.array_equal(keep, subsample_patients(ds, 200, seed=0, assignment=assignment))
    assert not np.array_equal(keep, subsample_patients(ds, 200, seed=1, assignment=assignment))


def test_subsample_dataset_keeps_each_rows_split():
    from cxrstudy.data import load_dataset
    from cxrstudy.data.splits import subsample_dataset, subsample_patients

    ds = load_dataset("synthetic", split="all", image_size=32, n_images=120, n_patients=60, seed=2)
    assert subsample_dataset(ds, None, seed=0) is ds and subsample_dataset(ds, 500, seed=0) is ds
    small = subsample_dataset(ds, 40, seed=3)
    keep = subsample_patients(ds, 40, 3, ds.split_assignment)
    assert list(small.records["image_id"]) == list(ds.records["image_id"].iloc[keep])
    # the subset's split of each row is the row's split in the full dataset
    full_split = dict(zip(ds.records["image_id"], ds.split_assignment))
    assert list(small.split_assignment) == [full_split[i] for i in small.records["image_id"]]


def test_official_split_sharing_a_patient_is_refused_naming_it():
    # Patient 7 has one image in the official training list and one in the test list.
    patients = [1, 2, 3, 7, 4, 5, 7, 6]
    official = ["train"] * 4 + ["test"] * 4
    with pytest.raises(PatientLeakError, match=r"1 patients .*7 \(test/train\)"):
        assign_splits(fake_dataset(patients, official), seed=0)
    with pytest.raises(PatientLeakError, match="official"):
        assign_splits(fake_dataset(patients, official), seed=0, val_fraction=0)


def test_leak_message_counts_all_and_names_a_few():
    patients = [f"p{k}" for k in range(8)] * 2
    assignment = ["train"] * 8 + ["test"] * 8
    assert sorted(shared_patients(patients, assignment)) == [f"p{k}" for k in range(8)]
    with pytest.raises(PatientLeakError, match=r"8 patients .*p4 \(test/train\) and 3 more"):
        require_disjoint_patients(patients, assignment, "somewhere")
    require_disjoint_patients(["a", "a", "b"], ["train", "train", "test"], "fine")


def test_a_loaded_split_table_that_leaks_is_refused():
    ds = fake_dataset([1, 1, 2])
    table = pd.DataFrame({"image_id": ["img0", "img1", "img2"], "patient_id": ["1", "1", "2"],
                          "split": ["train", "test", "test"]})
    with pytest.raises(PatientLeakError, match=r"1 \(test/train\)"):
        align_splits(ds, table)
