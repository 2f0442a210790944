"""Miniature copies of NIH ChestX-ray14, CheXpert-v1.0-small and VinDr-CXR, in each release's
own on-disk layout, built from the real label files that ship in torchxrayvision's wheel.

What is real: image ids, patient ids, paths, column names and header quirks, views, uncertain
(-1) and blank CheXpert labels, NIH boxes, VinDr's per-radiologist rows and boxes — the lines
are copied from the bundled files, not rewritten. What is not: the pixels (a seeded phantom,
:mod:`cxrstudy.rehearsal.pixels`, at each release's file type and size class) and four files the
wheel does not carry, derived deterministically and marked as stand-ins in ``STAND_INS.md``:

- NIH ``train_val_list.txt`` / ``test_list.txt``: a patient-level split with every boxed image's
  patient in test (as in the official lists, where all 880 boxed images are test images) and
  about a fifth of the other patients;
- CheXpert ``valid.csv``: rows of patients kept out of train.csv, renamed into
  ``valid/patient64541…`` with their labels made 0/1 (the real file is expert-labelled, no -1,
  no blanks);
- VinDr ``image_labels_test.csv`` / ``annotations_test.csv``: Kaggle training images kept out of
  train, their three readers merged by majority into one row per image (the real test labels
  are a five-radiologist consensus); the five global labels other than "No finding" are not in
  the Kaggle file and are 0 throughout.

Every release folder also gets ``SYNTHETIC_PIXELS.txt``, which :func:`cxrstudy.data.load_dataset`
reads as "synthetic data", so every figure, table and report built on it says so.
"""
from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..data import SYNTHETIC_MARKER
from ..data.labels import (CHEXPERT_CLASSES, NIH_CLASSES, VINDR_GLOBAL_CLASSES,
                           VINDR_KAGGLE_CLASSES, VINDR_LOCAL_CLASSES, VINDR_NO_FINDING)
from ..paths import DATASET_DIRS
from .pixels import blocky_phantom, phantom_uint8, seed_for

STAND_INS = "STAND_INS.md"
NIH_ARCHIVE_SIZES = (4999,) + (10000,) * 10 + (7121,)  # images_001 … images_012, in id order
NIH_IMAGE_SIZE = 1024
CHEXPERT_SHORT_SIDE = 320
CHEXPERT_FIRST_VALID_PATIENT = 64541
VINDR_BIT_DEPTHS = (12, 14, 16)


def xrv_data_dir() -> Path:
    """The folder of label files inside the installed torchxrayvision wheel."""
    import torchxrayvision

    return Path(torchxrayvision.__file__).parent / "data"


def _lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", newline="") as handle:
        return handle.read().splitlines()


def _rank(values, salt: str) -> np.ndarray:
    """A seeded, stable order of ``values`` (by a hash of each value, not its position)."""
    keys = np.array([seed_for(str(v), salt) for v in values], dtype=np.uint64)
    return np.argsort(keys, kind="stable")


def _marker(folder: Path, release: str) -> None:
    (folder / SYNTHETIC_MARKER).write_text(
        f"Rehearsal copy of {release}: the label files are the release's own (from "
        "torchxrayvision's wheel), the pixels are synthetic phantoms written by "
        "cxrstudy.rehearsal. Numbers computed on this folder say nothing about the methods.\n")


def _pick_patients(patients: pd.Series, positives: pd.DataFrame, part: pd.Series,
                   n_images: int, per_class: int, salt: str,
                   must: pd.Series | None = None, test_cap: float = 0.3) -> set[str]:
    """Whole patients, about ``n_images`` images: first enough of each class in each part
    (``per_class`` images), then the ``must`` rows' patients, then others in a seeded order
    (test patients only while test holds under ``test_cap`` of ``n_images``)."""
    order = patients.drop_duplicates().to_numpy()
    order = order[_rank(order, salt)]
    by_patient = pd.Series(np.arange(len(patients)), index=patients.to_numpy()).groupby(level=0) \
        .apply(list).to_dict()
    chosen: list[str] = []
    taken: set[str] = set()

    def take(patient) -> None:
        if patient not in taken:
            taken.add(patient)
            chosen.append(patient)

    for column in positives.columns:
        for value in sorted(part.unique()):
            have = 0
            rows = np.flatnonzero(positives[column].to_numpy() & (part == value).to_numpy())
            candidates = pd.unique(patients.to_numpy()[rows])
            for patient in candidates[_rank(candidates, salt + column + value)]:
                if have >= per_class:
                    break
                take(patient)
                have += int(positives[column].to_numpy()[by_patient[patient]].sum())
    if must is not None:
        for patient in pd.unique(patients[must.to_numpy()]):
            take(patient)
    part_of = dict(zip(patients.to_numpy(), part.to_numpy()))
    count = sum(len(by_patient[p]) for p in chosen)
    in_test = sum(len(by_patient[p]) for p in chosen if part_of[p] == "test")
    for patient in order:
        if count >= n_images:
            break
        if patient in taken or (part_of[patient] == "test" and in_test >= test_cap * n_images):
            continue
        take(patient)
        count += len(by_patient[patient])
        in_test += len(by_patient[patient]) if part_of[patient] == "test" else 0
    return taken


# ---- NIH ChestX-ray14 ---------------------------------------------------------------------------
def nih_official_split(entries: pd.DataFrame, boxed: set[str]) -> pd.Series:
    """Stand-in for the official lists: "test" for the patients of boxed images and for about
    a fifth of the others (by a hash of the patient id), "train" otherwise."""
    patients = entries["Patient ID"].astype(str)
    boxed_patients = set(patients[entries["Image Index"].isin(boxed)])
    test = patients.map(lambda p: p in boxed_patients or seed_for(p, "nih-test") % 100 < 20)
    return pd.Series(np.where(test, "test", "train"), index=entries.index)


def nih_archive(image_ids: list[str]) -> dict[str, str]:
    """Image id → ``images_NNN`` folder, filling the twelve archives in id order."""
    folders = {}
    bounds = np.cumsum(NIH_ARCHIVE_SIZES)
    for position, image_id in enumerate(sorted(image_ids)):
        number = int(np.searchsorted(bounds, position, side="right")) + 1
        folders[image_id] = f"images_{min(number, len(bounds)):03d}"
    return folders


def write_nih(data_root, n_images: int = 120, per_class: int = 4, n_boxed: int = 8,
              n_rgba: int = 2, progress: Callable[[str], None] = print) -> Path:
    """ChestX-ray14 under ``data_root/nih``: the label and box files filtered to the chosen
    patients, the full-release split lists, ``images_NNN/images/<id>.png`` at 1024 px."""
    from PIL import Image

    source = xrv_data_dir()
    entry_lines = _lines(source / "Data_Entry_2017_v2020.csv.gz")
    box_lines = _lines(source / "BBox_List_2017.csv.gz")
    entries = pd.read_csv(io.StringIO("\n".join(entry_lines)), index_col=False,
                          dtype={"Image Index": str, "Patient ID": str})
    boxes = pd.read_csv(io.StringIO("\n".join(box_lines)), index_col=False, usecols=[0, 1])
    boxed = set(boxes.iloc[:, 0])
    part = nih_official_split(entries, boxed)
    findings = entries["Finding Labels"].str.split("|")
    positives = pd.DataFrame({c: findings.map(lambda f, c=c: c in f) for c in NIH_CLASSES})
    follow_ups = entries.groupby("Patient ID")["Image Index"].transform("size")
    eligible = (follow_ups <= 4).to_numpy()
    boxed_rows = entries["Image Index"].isin(boxed).to_numpy() & eligible
    boxed_pick = np.flatnonzero(boxed_rows)
    boxed_pick = boxed_pick[_rank(entries["Image Index"].to_numpy()[boxed_pick], "nih-box")]
    must = pd.Series(False, index=entries.index)
    must.iloc[boxed_pick[:n_boxed]] = True
    patients = _pick_patients(entries["Patient ID"][eligible], positives[eligible],
                              part[eligible], n_images, per_class, "nih",
                              must=must[eligible])
    keep = entries["Patient ID"].isin(patients).to_numpy()
    chosen = entries["Image Index"][keep].tolist()

    folder = Path(data_root) / DATASET_DIRS["nih"]
    folder.mkdir(parents=True, exist_ok=True)
    kept_lines = [entry_lines[0]] + [line for line, k in zip(entry_lines[1:], keep) if k]
    (folder / "Data_Entry_2017_v2020.csv").write_text("\n".join(kept_lines) + "\n")
    chosen_set = set(chosen)
    box_kept = [box_lines[0]] + [line for line in box_lines[1:]
                                 if line.split(",", 1)[0] in chosen_set]
    (folder / "BBox_List_2017.csv").write_text("\n".join(box_kept) + "\n")
    for name, value in (("train_val_list.txt", "train"), ("test_list.txt", "test")):
        ids = entries["Image Index"][part == value]
        (folder / name).write_text("\n".join(ids) + "\n")
    archives = nih_archive(entries["Image Index"].tolist())
    rgba = set(sorted(chosen, key=lambda i: seed_for(i, "rgba"))[:n_rgba])
    for position, image_id in enumerate(sorted(chosen)):
        target = folder / archives[image_id] / "images" / image_id
        target.parent.mkdir(parents=True, exist_ok=True)
        pixels = phantom_uint8(NIH_IMAGE_SIZE, NIH_IMAGE_SIZE, image_id, block=4)
        image = Image.fromarray(pixels, mode="L")
        if image_id in rgba:  # the release has a few RGBA PNGs among its greyscale ones
            image = image.convert("RGBA")
        image.save(target, compress_level=1)
        if progress and (position + 1) % 100 == 0:
            progress(f"  nih: {position + 1}/{len(chosen)} images")
    _marker(folder, "NIH ChestX-ray14")
    return folder


# ---- CheXpert-v1.0-small ------------------------------------------------------------------------
def _chexpert_table(lines: list[str]) -> pd.DataFrame:
    table = pd.read_csv(io.StringIO("\n".join(lines)), index_col=False, dtype={"Path": str})
    table["patient"] = table["Path"].str.extract(r"/(patient\d+)/")[0]
    return table


def chexpert_valid_rows(table: pd.DataFrame, lines: list[str], exclude: set[str],
                        n_patients: int) -> list[str]:
    """Stand-in valid.csv rows: whole patients outside ``exclude``, first study only, moved to
    ``valid/patient64541…`` with their labels made expert-like (1 and -1 → 1.0, else 0.0)."""
    rows = []
    candidates = pd.unique(table["patient"][~table["patient"].isin(exclude)])
    candidates = candidates[_rank(candidates, "chexpert-valid")][:n_patients]
    number = {p: CHEXPERT_FIRST_VALID_PATIENT + i for i, p in enumerate(sorted(candidates))}
    for index in np.flatnonzero(table["patient"].isin(number).to_numpy()):
        row = table.iloc[index]
        study = row["Path"].split("/")[3]
        if study != "study1":
            continue
        fields = next(csv.reader([lines[index + 1]]))
        fields[0] = row["Path"].replace("/train/", "/valid/").replace(
            row["patient"], f"patient{number[row['patient']]:05d}")
        start = 5  # Path, Sex, Age, Frontal/Lateral, AP/PA, then the 14 observations
        fields[start:] = ["1.0" if v in ("1.0", "-1.0") else "0.0" for v in fields[start:]]
        rows.append(",".join(fields))
    return rows


def write_chexpert(data_root, n_images: int = 120, per_class: int = 4, n_valid_patients: int = 30,
                   progress: Callable[[str], None] = print) -> Path:
    """CheXpert-v1.0-small under ``data_root/CheXpert-v1.0-small``: train.csv (the chosen
    patients' rows), a stand-in valid.csv, ``train|valid/patientNNNNN/studyN/viewN_*.jpg``."""
    from PIL import Image

    lines = _lines(xrv_data_dir() / "chexpert_train.csv.gz")
    table = _chexpert_table(lines)
    studies = table.groupby("patient")["Path"].transform("size")
    eligible = (studies <= 3).to_numpy()
    values = table[list(CHEXPERT_CLASSES)]
    positives = (values == 1.0) | (values == -1.0)
    lateral = (table["Frontal/Lateral"] == "Lateral").rename("lateral")
    positives = pd.concat([positives, lateral], axis=1)
    part = pd.Series("train", index=table.index)
    patients = _pick_patients(table["patient"][eligible], positives[eligible], part[eligible],
                              n_images, per_class, "chexpert")
    keep = table["patient"].isin(patients).to_numpy()

    folder = Path(data_root) / DATASET_DIRS["chexpert"]
    folder.mkdir(parents=True, exist_ok=True)
    train_lines = [lines[0]] + [line for line, k in zip(lines[1:], keep) if k]
    (folder / "train.csv").write_text("\n".join(train_lines) + "\n")
    valid_lines = chexpert_valid_rows(table, lines, set(patients), n_valid_patients)
    (folder / "valid.csv").write_text("\n".join([lines[0]] + valid_lines) + "\n")
    paths = [line.split(",", 1)[0] for line in train_lines[1:] + valid_lines]
    for position, path in enumerate(paths):
        relative = path.split("/", 1)[1]  # drop "CheXpert-v1.0-small/"
        long_side = CHEXPERT_SHORT_SIDE + seed_for(relative, "size") % 110
        lateral_view = "lateral" in relative
        height, width = ((CHEXPERT_SHORT_SIDE, long_side) if lateral_view
                         else (long_side, CHEXPERT_SHORT_SIDE))
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(phantom_uint8(height, width, relative), mode="L").save(target,
                                                                                quality=90)
        if progress and (position + 1) % 100 == 0:
            progress(f"  chexpert: {position + 1}/{len(paths)} images")
    _marker(folder, "CheXpert-v1.0-small")
    return folder


# ---- VinDr-CXR (PhysioNet layout) ---------------------------------------------------------------
VINDR_LABEL_COLUMNS = [*VINDR_LOCAL_CLASSES, *VINDR_GLOBAL_CLASSES]


def _vindr_marks(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (image, reader) with 0/1 per PhysioNet label from the Kaggle box rows."""
    marks = (rows.assign(mark=1)
             .pivot_table(index=["image_id", "rad_id"], columns="class_name", values="mark",
                          aggfunc="max", fill_value=0))
    marks = marks.reindex(columns=VINDR_LABEL_COLUMNS, fill_value=0).astype(int)
    return marks.reset_index()


def write_vindr(data_root, n_images: int = 100, per_class: int = 2, test_share: int = 25,
                progress: Callable[[str], None] = print) -> Path:
    """VinDr-CXR (PhysioNet) under ``data_root/vindr-cxr``: ``annotations/`` label and box files
    and ``train|test/<image_id>.dicom`` (MONOCHROME1 and 2, 12/14/16 bits stored)."""
    raw = pd.read_csv(xrv_data_dir() / "vinbigdata-train.csv.gz", index_col=False)
    images = raw["image_id"].drop_duplicates().reset_index(drop=True)
    part = images.map(lambda i: "test" if seed_for(i, "vindr-test") % 100 < test_share
                      else "train")
    part.index = images.to_numpy()
    marks = _vindr_marks(raw)
    per_image = marks.groupby("image_id")[list(VINDR_KAGGLE_CLASSES)].max()
    per_image = per_image.reindex(images.to_numpy())
    positives = per_image.astype(bool).reset_index(drop=True)
    chosen = _pick_patients(images, positives, part.reset_index(drop=True), n_images, per_class,
                            "vindr")
    chosen = sorted(chosen)

    folder = Path(data_root) / DATASET_DIRS["vindr"]
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    train_ids = [i for i in chosen if part[i] == "train"]
    test_ids = [i for i in chosen if part[i] == "test"]
    train = marks[marks["image_id"].isin(train_ids)].rename(columns={"rad_id": "rad_ID"})
    train.to_csv(folder / "annotations" / "image_labels_train.csv", index=False)
    box_columns = ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"]
    raw[raw["image_id"].isin(train_ids)][box_columns].to_csv(
        folder / "annotations" / "annotations_train.csv", index=False)
    test_marks = marks[marks["image_id"].isin(test_ids)]
    votes = test_marks.groupby("image_id")[VINDR_LOCAL_CLASSES].sum()
    readers = test_marks.groupby("image_id").size()
    consensus = (votes.gt(readers / 2, axis=0)).astype(int)
    for name in VINDR_GLOBAL_CLASSES:
        consensus[name] = 0
    consensus[VINDR_NO_FINDING] = (consensus[VINDR_LOCAL_CLASSES].sum(axis=1) == 0).astype(int)
    consensus = consensus.rename(columns={"Other diseases": "Other disease"})  # the test spelling
    consensus.reset_index().to_csv(folder / "annotations" / "image_labels_test.csv", index=False)
    test_boxes = raw[raw["image_id"].isin(test_ids) & raw["x_min"].notna()]
    positive = consensus[VINDR_LOCAL_CLASSES].stack()
    positive = set(positive[positive == 1].index)
    test_boxes = test_boxes[[(i, c) in positive for i, c in zip(test_boxes["image_id"],
                                                                 test_boxes["class_name"])]]
    test_boxes = test_boxes.groupby(["image_id", "class_name"]).head(1)  # one box per finding
    test_boxes[box_columns].to_csv(folder / "annotations" / "annotations_test.csv", index=False)

    extent = raw.groupby("image_id")[["x_max", "y_max"]].max()
    for position, image_id in enumerate(chosen):
        x_max, y_max = extent.loc[image_id].fillna(0.0)
        seed = seed_for(image_id, "vindr-dicom")
        width = max(2000 + seed % 1100, int(np.ceil(x_max)) + 1)
        height = max(2200 + (seed >> 12) % 1100, int(np.ceil(y_max)) + 1)
        target = folder / part[image_id] / f"{image_id}.dicom"
        target.parent.mkdir(parents=True, exist_ok=True)
        write_dicom(target, image_id, height, width,
                    bits=VINDR_BIT_DEPTHS[(seed >> 24) % len(VINDR_BIT_DEPTHS)],
                    monochrome1=(seed >> 32) % 3 == 0, with_window=(seed >> 40) % 2 == 0)
        if progress and (position + 1) % 50 == 0:
            progress(f"  vindr: {position + 1}/{len(chosen)} DICOMs")
    _marker(folder, "VinDr-CXR")
    return folder


def write_dicom(path: Path, image_id: str, height: int, width: int, bits: int = 12,
                monochrome1: bool = False, with_window: bool = False, block: int = 4) -> None:
    """One greyscale DICOM (deflated explicit VR little endian) with ``bits`` stored bits;
    MONOCHROME1 stores the inverted phantom, as such a scanner would. The phantom is drawn at
    1/``block`` resolution and repeated, which keeps generation and the files small."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    small = blocky_phantom(height, width, image_id, levels=1 << min(bits, 12), block=block)
    top = (1 << bits) - 1
    values = (1.0 - small) if monochrome1 else small
    pixels = np.round(values * top).astype(np.uint16)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray, presentation
    uid = pydicom.uid.generate_uid(entropy_srcs=[image_id])
    meta.MediaStorageSOPInstanceUID = uid
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, uid
    ds.Modality = "DX"
    ds.PatientID = image_id
    ds.Rows, ds.Columns = int(height), int(width)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, int(bits), int(bits) - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    if with_window:
        ds.WindowCenter, ds.WindowWidth = top // 2, top
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_stand_in_note(data_root) -> Path:
    """``STAND_INS.md`` at the data root: which files are derived, and how (module docstring)."""
    path = Path(data_root) / STAND_INS
    path.write_text("# Rehearsal data: what is real and what is a stand-in\n\n"
                    + (__doc__ or "").split("\n\n", 1)[1])
    return path


__all__ = ["write_nih", "write_chexpert", "write_vindr", "write_dicom", "write_stand_in_note",
           "nih_official_split", "nih_archive", "chexpert_valid_rows", "xrv_data_dir",
           "SYNTHETIC_MARKER", "STAND_INS"]
