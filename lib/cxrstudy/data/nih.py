"""NIH ChestX-ray14 (Wang et al., CVPR 2017) in the release's own layout.

Root layout (``cxrstudy.paths.dataset_dir("nih", root)``)::

    Data_Entry_2017_v2020.csv   # or Data_Entry_2017.csv (either may be .csv.gz)
    BBox_List_2017.csv          # optional: 984 boxes in the release's 1024x1024 pixel space
    train_val_list.txt          # optional official split -> records["official_split"]
    test_list.txt
    images/*.png                # or images_001/images/*.png ... images_012/images/*.png

The label file is parsed here with pandas rather than through
``torchxrayvision.datasets.NIH_Dataset``: xrv matches findings by substring (so a typo or an
unknown finding passes silently), needs a flat image folder, and costs seconds to import. Its
one layout trick is reused: the box file's data rows carry more fields than its header, so
only the first six fields of each row are read.

Release quirks handled: the header splits ``OriginalImage[Width,Height]`` and
``OriginalImagePixelSpacing[x,y]`` over two columns each (renamed ``original_width``,
``original_height``, ``pixel_spacing_x``, ``pixel_spacing_y``); ``Patient Gender`` became
``Patient Sex`` in some copies; the box file says ``Infiltrate`` for ``Infiltration``; ``No
Finding`` is its own value and means all 14 labels are 0; box coordinates live in 1024x1024
space whatever the pixel size of the PNG on disk (the size is always read from the file).
"""
from __future__ import annotations

import csv
import gzip
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..paths import DataNotFoundError, dataset_dir
from .base import BOX_COLUMNS, CXRDataset, refuse_paths_outside, report_missing_images
from .labels import NIH_CLASSES, NIH_NO_FINDING, canonical

LABEL_FILE_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
BOX_FILE_NAME = "BBox_List_2017.csv"
BOX_SPACE = 1024  # the release's box coordinates are in 1024x1024 pixels
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

_SPLIT_HEADER_COLUMNS = {
    "OriginalImage[Width": "original_width",
    "Height]": "original_height",
    "OriginalImagePixelSpacing[x": "pixel_spacing_x",
    "y]": "pixel_spacing_y",
}
_REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "Patient Age",
                     "View Position")
_CLASS_BY_KEY = {canonical(c): c for c in NIH_CLASSES}
_MAX_PLAUSIBLE_AGE = 120


def _open_text(path: Path):
    return gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="")


def _find_label_file(root: Path, csv_name: str) -> Path:
    """The requested label file, else the release's other name (plain or gzipped)."""
    names = [csv_name] + [n for n in LABEL_FILE_NAMES if n != csv_name]
    for name in names:
        for candidate in (root / name, root / (name + ".gz")):
            if candidate.is_file():
                return candidate
    raise DataNotFoundError(f"NIH label file {root / csv_name} not found (also looked for "
                            f"{', '.join(n for n in names[1:])} and .gz copies)")


def _parse_age(values: pd.Series, path: Path) -> pd.Series:
    """Ages in years. Handles '058Y'-style strings; implausible ages (> 120) become NaN."""
    numeric = pd.to_numeric(values, errors="coerce")
    text = values.astype(str).str.strip().str.upper()
    coded = text.str.extract(r"^(\d+)\s*([YMD])$")
    per_year = coded[1].map({"Y": 1.0, "M": 12.0, "D": 365.0})
    numeric = numeric.fillna(pd.to_numeric(coded[0], errors="coerce") / per_year)
    implausible = numeric > _MAX_PLAUSIBLE_AGE
    if implausible.any():
        warnings.warn(f"{path}: {int(implausible.sum())} ages above {_MAX_PLAUSIBLE_AGE} "
                      "years set to unknown", stacklevel=3)
        numeric = numeric.mask(implausible)
    return numeric.astype(float)


def read_label_file(path: Path) -> pd.DataFrame:
    """Read Data_Entry_2017*.csv with normalised column names, checking required columns."""
    table = pd.read_csv(path, index_col=False, dtype={"Image Index": str})
    table = table.rename(columns=_SPLIT_HEADER_COLUMNS)
    if "Patient Gender" not in table.columns and "Patient Sex" in table.columns:
        table = table.rename(columns={"Patient Sex": "Patient Gender"})
    missing = [c for c in _REQUIRED_COLUMNS if c not in table.columns]
    if "Patient Gender" not in table.columns:
        missing.append("Patient Gender (or Patient Sex)")
    if missing:
        raise ValueError(f"{path}: missing required columns {missing}; found "
                         f"{list(table.columns)}")
    return table


def parse_findings(findings: pd.Series, path: Path) -> np.ndarray:
    """'|'-separated findings -> float32 [N, 14] over NIH_CLASSES; 'No Finding' -> all zeros.

    An empty cell, an unknown finding, or 'No Finding' next to a finding raises, naming the
    CSV line (header = line 1) and image.
    """
    def where(row: int) -> str:
        return f"{path} line {row + 2} (image {image_ids.iloc[row]!r})"

    image_ids = findings.index.to_series()
    empty = findings.isna() | (findings.astype(str).str.strip() == "")
    if empty.any():
        raise ValueError(f"{where(int(np.argmax(empty.to_numpy())))}: empty 'Finding Labels'")
    onehot = findings.astype(str).str.replace(r"\s*\|\s*", "|", regex=True).str.strip() \
        .str.get_dummies(sep="|")
    labels = np.zeros((len(findings), len(NIH_CLASSES)), dtype=np.float32)
    no_finding = np.zeros(len(findings), dtype=bool)
    for column in onehot.columns:
        hits = onehot[column].to_numpy().astype(bool)
        key = canonical(column)
        if key == canonical(NIH_NO_FINDING):
            no_finding |= hits
        elif key in _CLASS_BY_KEY:
            labels[hits, NIH_CLASSES.index(_CLASS_BY_KEY[key])] = 1.0
        else:
            raise ValueError(f"{where(int(np.argmax(hits)))}: unknown finding {column!r}; "
                             f"known: {NIH_CLASSES + [NIH_NO_FINDING]}")
    clash = no_finding & (labels.sum(axis=1) > 0)
    if clash.any():
        raise ValueError(f"{where(int(np.argmax(clash)))}: 'No Finding' listed together with "
                         "findings")
    return labels


def parse_no_finding(findings: pd.Series) -> np.ndarray:
    """The release's own "No Finding" label per row, float32 [N]: 1 where the cell says
    'No Finding' (which :func:`parse_findings` allows only alone), else 0."""
    tokens = findings.fillna("").astype(str).reset_index(drop=True).str.split("|").explode()
    tokens = tokens.str.strip()
    keys = {t: canonical(t) for t in tokens.unique() if t}
    hits = tokens.map(keys).eq(canonical(NIH_NO_FINDING))
    return hits.groupby(level=0).any().to_numpy(dtype=np.float32)


def read_box_file(path: Path) -> pd.DataFrame:
    """BBox_List_2017.csv -> boxes table (1024-px space), 'Infiltrate' -> 'Infiltration'."""
    rows = []
    with _open_text(path) as handle:
        reader = csv.reader(handle)
        next(reader, None)  # header: "Image Index,Finding Label,Bbox [x,y,w,h],,,"
        for line_no, fields in enumerate(reader, start=2):
            if not fields or not any(f.strip() for f in fields):
                continue
            if len(fields) < 6:
                raise ValueError(f"{path} line {line_no}: expected image, label, x, y, w, h; "
                                 f"got {fields}")
            image_id, label = fields[0].strip(), fields[1].strip()
            key = canonical(label)
            if key not in _CLASS_BY_KEY:
                raise ValueError(f"{path} line {line_no}: unknown box label {label!r}")
            try:
                x, y, w, h = (float(v) for v in fields[2:6])
            except ValueError:
                raise ValueError(f"{path} line {line_no}: box coordinates {fields[2:6]} are not "
                                 "numbers") from None
            rows.append((image_id, _CLASS_BY_KEY[key], x, y, w, h, BOX_SPACE, BOX_SPACE))
    return pd.DataFrame(rows, columns=list(BOX_COLUMNS))


def read_official_split(root: Path, image_ids: pd.Series) -> pd.Series | None:
    """'train'/'test' from train_val_list.txt/test_list.txt, or None when neither exists.

    With one list only, images not in it belong to the other part. With both, an image in
    neither or in both is an error (the lists do not belong to this label file).
    """
    lists = {}
    for part, name in (("train", "train_val_list.txt"), ("test", "test_list.txt")):
        path = root / name
        if path.is_file():
            lists[part] = {line.strip() for line in path.read_text().splitlines() if line.strip()}
    if not lists:
        return None
    in_test = image_ids.isin(lists["test"]) if "test" in lists else ~image_ids.isin(lists["train"])
    if len(lists) == 2:
        in_train = image_ids.isin(lists["train"])
        for bad, what in ((in_train & in_test, "both"), (~in_train & ~in_test, "neither")):
            if bad.any():
                raise ValueError(f"{root}: image {image_ids[bad].iloc[0]!r} is in {what} of "
                                 "train_val_list.txt and test_list.txt")
    return pd.Series(np.where(in_test, "test", "train"), index=image_ids.index)


def index_images(root: Path) -> dict[str, Path]:
    """File name -> path over images/ and images_NNN/ (searched recursively, once)."""
    folders = [root / "images"] if (root / "images").is_dir() else []
    folders += sorted(p for p in root.glob("images_*") if p.is_dir())
    if not folders:
        raise DataNotFoundError(f"NIH image folder {root / 'images'} does not exist (nor any "
                                f"images_001..images_012 folder under {root})")
    index: dict[str, Path] = {}
    duplicates = []
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(IMAGE_SUFFIXES):
                    if name in index:
                        duplicates.append(name)
                        continue
                    index[name] = Path(dirpath) / name
    if duplicates:
        warnings.warn(f"{len(duplicates)} NIH image names occur in more than one folder under "
                      f"{root} (e.g. {duplicates[0]}); using the first in sorted order",
                      stacklevel=3)
    return index


class NIHDataset(CXRDataset):
    """ChestX-ray14: 14 text-mined findings (NIH_CLASSES), boxes for 880 images.

    ``views`` keeps these View Positions (None = all). ``labels_only=True`` parses the label
    and box files without needing images (e.g. to study the full release's label statistics);
    its ``read_image`` then raises. Images listed but absent on disk raise at construction
    with ``strict=True``; otherwise a warning counts them and they stay listed (see
    :func:`report_missing_images`).
    """

    name = "nih"
    classes = list(NIH_CLASSES)

    def __init__(self, root=None, image_size: int = 224, strict: bool = False,
                 views: Sequence[str] | None = ("PA", "AP"),
                 csv_name: str = "Data_Entry_2017_v2020.csv", labels_only: bool = False):
        super().__init__(image_size=image_size, strict=strict)
        self.root = dataset_dir("nih", root)
        if not self.root.is_dir():
            raise DataNotFoundError(f"NIH folder {self.root} does not exist")
        self.labels_only = bool(labels_only)
        self.label_file = _find_label_file(self.root, csv_name)
        table = read_label_file(self.label_file)
        table.index = pd.Index(table["Image Index"].astype(str).str.strip(), name=None)
        labels = parse_findings(table["Finding Labels"], self.label_file)
        no_patient = table["Patient ID"].isna().to_numpy()
        if no_patient.any():
            row = int(np.argmax(no_patient))
            raise ValueError(f"{self.label_file} line {row + 2} (image {table.index[row]!r}): "
                             "empty 'Patient ID'")

        records = pd.DataFrame({
            "image_id": table.index.to_numpy(),
            "patient_id": table["Patient ID"].astype(str).str.strip().to_numpy(),
            "view": table["View Position"].astype(str).str.strip().str.upper().to_numpy(),
            "sex": table["Patient Gender"].astype(str).str.strip().str.upper()
                   .where(lambda s: s.isin(["M", "F"])).to_numpy(),
            "age": _parse_age(table["Patient Age"], self.label_file).to_numpy(),
            "follow_up": pd.to_numeric(table.get("Follow-up #"), errors="coerce").to_numpy()
                         if "Follow-up #" in table.columns else np.nan,
            # the release's "No Finding" (1/0), e.g. for a normal-vs-abnormal task
            "no_finding": parse_no_finding(table["Finding Labels"]),
        })
        for column in _SPLIT_HEADER_COLUMNS.values():
            if column in table.columns:
                records[column] = pd.to_numeric(table[column], errors="coerce").to_numpy()
        if records["image_id"].duplicated().any():
            dup = records["image_id"][records["image_id"].duplicated()].iloc[0]
            raise ValueError(f"{self.label_file}: image {dup!r} is listed more than once")
        official = read_official_split(self.root, records["image_id"])
        if official is not None:
            records["official_split"] = official.to_numpy()

        keep = np.ones(len(records), dtype=bool)
        if views is not None:
            wanted = [views] if isinstance(views, str) else list(views)
            if "*" not in wanted:
                keep &= records["view"].isin([v.upper() for v in wanted]).to_numpy()
                if not keep.any():
                    raise ValueError(f"{self.label_file}: no image has a view in {wanted}; "
                                     f"views present: {sorted(records['view'].unique())}")
        if self.labels_only:
            records["path"] = None
        else:
            refuse_paths_outside(self.root, records["image_id"], self.label_file, under="images")
            index = index_images(self.root)
            paths = records["image_id"].map(index)
            found = paths.notna().to_numpy()
            report_missing_images(found[keep], records["image_id"][keep], self.strict,
                                  f"the image folders of {self.root}")
            expected = self.root / "images"  # where a missing file is reported as absent
            records["path"] = [str(p) if isinstance(p, Path) else str(expected / image_id)
                               for p, image_id in zip(paths, records["image_id"])]

        self.records = records[keep].reset_index(drop=True)
        self.labels = labels[keep]
        box_file = self.root / BOX_FILE_NAME
        if not box_file.is_file() and (self.root / (BOX_FILE_NAME + ".gz")).is_file():
            box_file = self.root / (BOX_FILE_NAME + ".gz")
        if box_file.is_file():
            boxes = read_box_file(box_file)
            self.boxes = boxes[boxes["image_id"].isin(self.records["image_id"])] \
                .reset_index(drop=True)
        else:
            self.boxes = pd.DataFrame(columns=list(BOX_COLUMNS))
        self.validate()


__all__ = ["NIHDataset", "read_label_file", "parse_findings", "parse_no_finding", "read_box_file",
           "read_official_split", "index_images", "report_missing_images"]
