"""VinDr-CXR (Nguyen et al., Sci Data 2022): PhysioNet release and Kaggle challenge layouts.

PhysioNet layout (``cxrstudy.paths.dataset_dir("vindr", root)``)::

    annotations/image_labels_train.csv  # image_id, rad_id, 0/1 per local and global label;
                                         # one row per image per radiologist (3 per image)
    annotations/image_labels_test.csv   # one consensus row per image (5 radiologists)
    annotations/annotations_{train,test}.csv  # image_id, rad_id, class_name, x_min..y_max
    train/<image_id>.dicom  test/<image_id>.dicom

Kaggle layout: ``train.csv`` (image_id, class_name, class_id, rad_id, x_min, y_min, x_max,
y_max: one row per box, or one "No finding" row per radiologist) and ``train/*.dicom``;
this is the format of torchxrayvision's packaged ``vinbigdata-train.csv.gz`` (pass it as
``csv_path``). The Kaggle release has only the 14 local classes (VINDR_KAGGLE_CLASSES).

Labels: ``label_set`` picks the local, global or both label groups (PhysioNet); radiologists
are combined per image by ``aggregate``: ``"any"`` (positive if at least one radiologist
marked it) or ``"majority"`` (positive if more than half of the image's radiologists did:
2 of 3 in train). Blank cells in the label CSV count as "not marked". Boxes are kept for a
class only where the aggregated image label is positive (so under ``"majority"`` a lone
reader's box is dropped); every kept radiologist's box is listed (column ``rad_id``).

Box space: a box is in the pixel space of the original DICOM. The sizes come, in order, from
a size table at the root (``image_sizes.csv`` with image_id,width,height, or Kaggle-style
``train_meta.csv``/``test_meta.csv`` with image_id,dim0,dim1 = rows,columns), else from the
DICOM header, read lazily the first time an image's boxes are asked for (needs pydicom),
else from the largest box coordinate seen for that image. That last fallback is a lower
bound (boxes come out stretched), so it is flagged (``space_exact`` False) and warned about.
PNG copies are not trusted for the size: they are often resized.

Images: ``<image_id>.png`` copies are preferred when present (no pydicom needed, and many
users convert once); otherwise ``<image_id>.dicom``/``.dcm``, decoded with pydicom, which is
imported only then. VinDr-CXR has no patient ids: ``patient_id`` is the image id, so a
patient with two images could straddle splits (the release does not let us know).
"""
from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..paths import DataNotFoundError, dataset_dir
from .base import (BOX_COLUMNS, CXRDataset, CorruptImageError, read_image_file,
                   refuse_paths_outside, report_missing_images, to_uint8_grayscale)
from .labels import (VINDR_GLOBAL_CLASSES, VINDR_KAGGLE_CLASSES, VINDR_LOCAL_CLASSES,
                     VINDR_NO_FINDING, canonical)

LABEL_SETS = ("local", "global", "both")
AGGREGATES = ("any", "majority")
IMAGE_SUFFIXES = (".png", ".dicom", ".dcm")  # order = preference
_BOX_COORDS = ["x_min", "y_min", "x_max", "y_max"]
_KNOWN = {canonical(c): c for c in
          [*VINDR_LOCAL_CLASSES, *VINDR_GLOBAL_CLASSES, *VINDR_KAGGLE_CLASSES]}


def _column(table: pd.DataFrame, name: str, path: Path, required: bool = True):
    """The column called ``name`` ignoring case (rad_id vs rad_ID), or None / an error."""
    for column in table.columns:
        if column.strip().lower() == name:
            return column
    if required:
        raise ValueError(f"{path}: missing required column {name!r}; found {list(table.columns)}")
    return None


def _aggregate(votes: np.ndarray, readers: np.ndarray, how: str) -> np.ndarray:
    """Per-image votes [N, C] and reader counts [N] -> 0/1 labels."""
    if how == "any":
        return (votes >= 1).astype(np.float32)
    return (2 * votes > readers[:, None]).astype(np.float32)


def read_physionet_labels(path: Path, classes: list[str], aggregate: str):
    """image_labels_*.csv -> (image ids, labels [N, C], readers per image)."""
    table = pd.read_csv(path, index_col=False)
    id_col = _column(table, "image_id", path)
    rad_col = _column(table, "rad_id", path, required=False)
    by_key = {}
    for column in table.columns:
        if column in (id_col, rad_col):
            continue
        key = canonical(column)
        if key not in _KNOWN:
            raise ValueError(f"{path}: unknown label column {column!r}")
        by_key[key] = column
    missing = [c for c in classes if canonical(c) not in by_key]
    if missing:
        raise ValueError(f"{path}: missing label columns {missing}")
    columns = [by_key[canonical(c)] for c in classes]
    values = table[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    raw_blank = table[columns].isna().to_numpy()
    bad = ~(np.isin(values, (0.0, 1.0)) | raw_blank)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise ValueError(f"{path} line {row + 2}: value {table.at[row, columns[col]]!r} in "
                         f"{columns[col]!r} is not 0 or 1")
    marks = pd.DataFrame(np.nan_to_num(values, nan=0.0), columns=classes)
    marks["image_id"] = table[id_col].astype(str).str.strip().to_numpy()
    grouped = marks.groupby("image_id", sort=False)
    votes = grouped[classes].sum().to_numpy()
    readers = grouped.size().to_numpy()
    return grouped.size().index.to_numpy(dtype=object), _aggregate(votes, readers, aggregate), \
        readers


def no_finding_rule(no_finding_votes: np.ndarray, readers: np.ndarray, how: str) -> np.ndarray:
    """The image's own "No finding" (float32 0/1) under the findings' reader rule: a reader who
    did not mark "No finding" votes *abnormal*, and the image is abnormal by ``how`` of those
    votes ("any": one reader is enough, so "No finding" needs all of them; "majority": more
    than half)."""
    abnormal = _aggregate((np.asarray(readers) - np.asarray(no_finding_votes))[:, None],
                          np.asarray(readers), how)[:, 0]
    return (1.0 - abnormal).astype(np.float32)


def physionet_no_finding(path: Path, ids: np.ndarray, aggregate: str) -> np.ndarray:
    """image_labels_*.csv -> the "No finding" label of each of ``ids`` (see
    :func:`no_finding_rule`)."""
    table = pd.read_csv(path, index_col=False)
    id_col = _column(table, "image_id", path)
    column = next((c for c in table.columns if canonical(c) == canonical(VINDR_NO_FINDING)),
                  None)
    if column is None:
        raise ValueError(f"{path}: missing label column {VINDR_NO_FINDING!r}")
    marks = pd.DataFrame({"image_id": table[id_col].astype(str).str.strip(),
                          "mark": pd.to_numeric(table[column], errors="coerce").fillna(0.0)})
    grouped = marks.groupby("image_id", sort=False)["mark"]
    votes = grouped.sum().reindex(ids).to_numpy()
    readers = grouped.size().reindex(ids).to_numpy()
    return no_finding_rule(votes, readers, aggregate)


def read_box_rows(path: Path, kaggle: bool = False) -> pd.DataFrame:
    """Annotation rows: image_id, rad_id, class (canonical VinDr name), coordinates.

    Names outside the VinDr label lists raise naming the line. Rows without coordinates
    ("No finding", image-level marks) keep NaN coordinates; half-filled coordinates raise.
    """
    table = pd.read_csv(path, index_col=False)
    id_col = _column(table, "image_id", path)
    rad_col = _column(table, "rad_id", path, required=kaggle)
    name_col = _column(table, "class_name", path)
    coord_cols = [_column(table, c, path) for c in _BOX_COORDS]
    keys = table[name_col].astype(str).map(canonical)
    unknown = ~keys.isin(_KNOWN) & (keys != canonical(VINDR_NO_FINDING))
    if unknown.any():
        row = int(np.argmax(unknown.to_numpy()))
        raise ValueError(f"{path} line {row + 2}: unknown class name {table.at[row, name_col]!r}")
    coords = table[coord_cols].apply(pd.to_numeric, errors="coerce")
    partial = coords.isna().any(axis=1) & coords.notna().any(axis=1)
    if partial.any():
        row = int(np.argmax(partial.to_numpy()))
        raise ValueError(f"{path} line {row + 2}: incomplete box coordinates "
                         f"{table.loc[row, coord_cols].tolist()}")
    out = pd.DataFrame({
        "image_id": table[id_col].astype(str).str.strip(),
        "rad_id": table[rad_col].astype(str).str.strip() if rad_col else "consensus",
        "class": keys.map(_KNOWN).fillna(VINDR_NO_FINDING),
    })
    out[_BOX_COORDS] = coords.to_numpy()
    if ((out["x_max"] < out["x_min"]) | (out["y_max"] < out["y_min"])).any():
        row = int(np.argmax(((out["x_max"] < out["x_min"]) | (out["y_max"] < out["y_min"]))))
        raise ValueError(f"{path} line {row + 2}: box has max < min")
    return out


def kaggle_labels(rows: pd.DataFrame, aggregate: str):
    """Kaggle rows -> (image ids, labels [N, 14], readers): a vote = a reader with that class."""
    image_ids = pd.unique(rows["image_id"])
    readers = rows.groupby("image_id")["rad_id"].nunique().reindex(image_ids).to_numpy()
    findings = rows[rows["class"].isin(VINDR_KAGGLE_CLASSES)]
    votes = (findings.groupby(["image_id", "class"])["rad_id"].nunique()
             .unstack(fill_value=0)
             .reindex(index=image_ids, columns=VINDR_KAGGLE_CLASSES, fill_value=0)
             .to_numpy())
    return np.asarray(image_ids, dtype=object), _aggregate(votes, readers, aggregate), readers


def kaggle_no_finding(rows: pd.DataFrame, image_ids: np.ndarray, readers: np.ndarray,
                      aggregate: str) -> np.ndarray:
    """Kaggle rows -> the "No finding" label of each image (a vote = a reader's "No finding"
    row; see :func:`no_finding_rule`)."""
    normal = rows[rows["class"] == VINDR_NO_FINDING]
    votes = (normal.groupby("image_id")["rad_id"].nunique()
             .reindex(image_ids, fill_value=0).to_numpy())
    return no_finding_rule(votes, readers, aggregate)


def read_size_table(root: Path) -> dict[str, tuple[float, float]]:
    """image_id -> (width, height) of the original image, from a size table if one exists."""
    sizes: dict[str, tuple[float, float]] = {}
    for name in ("image_sizes.csv", "train_meta.csv", "test_meta.csv"):
        path = root / name
        if not path.is_file():
            continue
        table = pd.read_csv(path, index_col=False)
        id_col = _column(table, "image_id", path)
        if {"width", "height"} <= set(table.columns):
            width, height = table["width"], table["height"]
        elif {"dim0", "dim1"} <= set(table.columns):
            width, height = table["dim1"], table["dim0"]  # dim0 = rows = height
        else:
            raise ValueError(f"{path}: expected columns width,height or dim0,dim1")
        sizes.update(zip(table[id_col].astype(str), zip(width.astype(float),
                                                        height.astype(float))))
    return sizes


def index_images(folders: list[Path]) -> dict[str, Path]:
    """image_id -> file, preferring a PNG copy over the DICOM."""
    rank = {suffix: i for i, suffix in enumerate(IMAGE_SUFFIXES)}
    best: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                stem, suffix = os.path.splitext(entry.name)
                suffix = suffix.lower()
                if suffix not in rank or not entry.is_file():
                    continue
                if stem not in best or rank[suffix] < rank[best[stem].suffix.lower()]:
                    best[stem] = Path(entry.path)
    return best


def read_dicom(path) -> np.ndarray:
    """Decode a VinDr DICOM to uint8 (modality + VOI LUT, MONOCHROME1 inverted)."""
    try:
        import pydicom
    except ImportError:
        raise ImportError(f"reading the DICOM {path} needs pydicom, which is not installed: "
                          "pip install pydicom (or save PNG copies as <image_id>.png next to "
                          "the DICOMs)") from None
    try:
        try:
            from pydicom.pixels import apply_modality_lut, apply_voi_lut
        except ImportError:  # pydicom < 3
            from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
        dicom = pydicom.dcmread(path)
        pixels = apply_voi_lut(apply_modality_lut(dicom.pixel_array, dicom), dicom)
        pixels = np.asarray(pixels, dtype=np.float32)
        if str(getattr(dicom, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            pixels = pixels.max() + pixels.min() - pixels
    except Exception as exc:
        raise CorruptImageError(f"cannot decode DICOM {path}: {exc}") from exc
    return to_uint8_grayscale(pixels)


def dicom_size(path) -> tuple[float, float] | None:
    """(width, height) from a DICOM header, or None when pydicom or the header is unavailable."""
    try:
        import pydicom

        header = pydicom.dcmread(path, stop_before_pixels=True)
        return float(header.Columns), float(header.Rows)
    except Exception:
        return None


class VinDrDataset(CXRDataset):
    """VinDr-CXR: local/global labels from 3 (train) or 5 (test, consensus) radiologists.

    ``csv_path`` reads a Kaggle-format file instead of the root's annotation files (its
    images are looked up under ``root``/train, default the CSV's folder).
    ``labels_only=True`` parses labels and boxes without images (``read_image`` raises).
    Missing image files: an error with ``strict=True``, else a warning (rows stay listed).
    """

    name = "vindr"

    def __init__(self, root=None, image_size: int = 224, strict: bool = False,
                 label_set: str = "local", aggregate: str = "any", csv_path=None,
                 labels_only: bool = False):
        super().__init__(image_size=image_size, strict=strict)
        if label_set not in LABEL_SETS:
            raise ValueError(f"label_set must be one of {LABEL_SETS}, got {label_set!r}")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        self.label_set, self.aggregate, self.labels_only = label_set, aggregate, labels_only
        if csv_path is not None:
            kaggle_file = Path(csv_path).expanduser()
            self.root = Path(root).expanduser() if root is not None else kaggle_file.parent
        else:
            self.root = dataset_dir("vindr", root)
            if not self.root.is_dir():
                raise DataNotFoundError(f"VinDr-CXR folder {self.root} does not exist")
            kaggle_file = next((self.root / n for n in ("train.csv", "train.csv.gz")
                                if (self.root / n).is_file()), None)
        physionet = self.root / "annotations" / "image_labels_train.csv"
        if csv_path is None and physionet.is_file():
            self.layout = "physionet"
            ids, labels, readers, official, rows, no_finding = self._parse_physionet(label_set,
                                                                                   aggregate)
        elif kaggle_file is not None:
            self.layout = "kaggle"
            if label_set != "local":
                raise ValueError("the Kaggle VinDr layout has only the 14 local classes; "
                                 f"label_set={label_set!r} needs the PhysioNet release")
            if not kaggle_file.is_file():
                raise DataNotFoundError(f"VinDr label file {kaggle_file} not found")
            self.classes = list(VINDR_KAGGLE_CLASSES)
            rows = read_box_rows(kaggle_file, kaggle=True)
            ids, labels, readers = kaggle_labels(rows, aggregate)
            no_finding = kaggle_no_finding(rows, ids, readers, aggregate)
            official = None
        else:
            raise DataNotFoundError(f"no VinDr labels under {self.root}: expected "
                                    f"{physionet} (PhysioNet) or train.csv (Kaggle)")

        records = pd.DataFrame({"image_id": ids, "patient_id": ids, "view": "PA",
                                "sex": None, "age": np.nan, "n_readers": readers,
                                # the release's "No finding" (1/0) under ``aggregate``
                                "no_finding": no_finding})
        if official is not None:
            records["official_split"] = official
        if labels_only:
            records["path"] = None
        else:
            label_file = (physionet.parent / "image_labels_{train,test}.csv"
                          if self.layout == "physionet" else kaggle_file)
            folder = records.get("official_split", pd.Series("train", index=records.index))
            refuse_paths_outside(self.root, [f"{split}/{image_id}.dicom" for split, image_id
                                             in zip(folder, records["image_id"])], label_file)
            index = index_images([self.root / "train", self.root / "test"])
            paths = records["image_id"].map(index)
            found = paths.notna().to_numpy()
            report_missing_images(found, records["image_id"], strict,
                                  f"{self.root / 'train'} and {self.root / 'test'}")
            records["path"] = [str(p) if isinstance(p, Path)
                               else str(self.root / split / f"{image_id}.dicom")
                               for p, split, image_id in zip(paths, folder, records["image_id"])]
        self.records = records
        self.labels = labels
        self.boxes = self._boxes(rows)
        self._header_sizes: dict[str, tuple[float, float] | None] = {}
        self._warned_inexact = False
        self.validate()

    # ---- parsing --------------------------------------------------------------------------
    def _parse_physionet(self, label_set: str, aggregate: str):
        self.classes = {"local": list(VINDR_LOCAL_CLASSES),
                        "global": list(VINDR_GLOBAL_CLASSES),
                        "both": [*VINDR_LOCAL_CLASSES, *VINDR_GLOBAL_CLASSES]}[label_set]
        parts, box_rows = [], []
        for split in ("train", "test"):
            label_file = self.root / "annotations" / f"image_labels_{split}.csv"
            if not label_file.is_file():
                continue
            ids, labels, readers = read_physionet_labels(label_file, self.classes, aggregate)
            parts.append((ids, labels, readers, np.full(len(ids), split, dtype=object),
                          physionet_no_finding(label_file, ids, aggregate)))
            box_file = self.root / "annotations" / f"annotations_{split}.csv"
            if box_file.is_file():
                box_rows.append(read_box_rows(box_file))
        ids = np.concatenate([p[0] for p in parts])
        if len(set(ids)) != len(ids):
            dup = pd.Series(ids)[pd.Series(ids).duplicated()].iloc[0]
            raise ValueError(f"VinDr image {dup!r} is in both the train and test label files")
        rows = pd.concat(box_rows, ignore_index=True) if box_rows else None
        return (ids, np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts]),
                rows, np.concatenate([p[4] for p in parts]))

    def _boxes(self, rows: pd.DataFrame | None) -> pd.DataFrame:
        """Box rows of classes in ``self.classes`` whose aggregated image label is positive."""
        if rows is None:
            return pd.DataFrame(columns=[*BOX_COLUMNS, "rad_id", "space_exact"])
        with_box = rows.dropna(subset=_BOX_COORDS)
        largest = with_box.groupby("image_id")[["x_max", "y_max"]].max()
        boxes = with_box[with_box["class"].isin(self.classes)
                         & with_box["image_id"].isin(self.records["image_id"])]
        positive = pd.DataFrame(self.labels, columns=self.classes,
                                index=self.records["image_id"]).stack()
        positive = positive[positive == 1].index
        boxes = boxes[pd.MultiIndex.from_arrays([boxes["image_id"], boxes["class"]])
                      .isin(positive)]
        sizes = read_size_table(self.root)
        exact = boxes["image_id"].isin(sizes)
        space = boxes["image_id"].map(sizes)
        fallback = largest.reindex(boxes["image_id"])
        out = pd.DataFrame({
            "image_id": boxes["image_id"].to_numpy(),
            "label": boxes["class"].to_numpy(),
            "x": boxes["x_min"].to_numpy(), "y": boxes["y_min"].to_numpy(),
            "w": (boxes["x_max"] - boxes["x_min"]).to_numpy(),
            "h": (boxes["y_max"] - boxes["y_min"]).to_numpy(),
            "space_w": np.where(exact, [s[0] if isinstance(s, tuple) else np.nan for s in space],
                                fallback["x_max"].to_numpy()),
            "space_h": np.where(exact, [s[1] if isinstance(s, tuple) else np.nan for s in space],
                                fallback["y_max"].to_numpy()),
            "rad_id": boxes["rad_id"].to_numpy(),
            "space_exact": exact.to_numpy(),
        })
        return out.reset_index(drop=True)

    # ---- images and boxes -----------------------------------------------------------------
    def read_image(self, i: int) -> np.ndarray:
        path = self.records.at[i, "path"]
        if not isinstance(path, str):
            raise DataNotFoundError(f"vindr: image {self.records.at[i, 'image_id']} has no "
                                    "file (dataset built with labels_only=True)")
        if not os.path.isfile(path):
            raise FileNotFoundError(errno.ENOENT, "VinDr image not found", path)
        if path.lower().endswith((".dicom", ".dcm")):
            return read_dicom(path)
        return read_image_file(path)

    def boxes_for(self, i: int) -> list[dict]:
        """Boxes scaled to ``image_size``; an inexact space is refined from the DICOM header."""
        if len(self.boxes) == 0:
            return []
        image_id = self.records.at[i, "image_id"]
        rows = self.boxes[self.boxes["image_id"] == image_id]
        if len(rows) == 0:
            return []
        space_w, space_h = float(rows["space_w"].iloc[0]), float(rows["space_h"].iloc[0])
        if not bool(rows["space_exact"].iloc[0]):
            size = self._header_size(i)
            if size is not None:
                space_w, space_h = size
            elif not self._warned_inexact:
                self._warned_inexact = True
                warnings.warn("VinDr box space unknown (no size table, no readable DICOM "
                              "header): scaling by the largest box coordinate of each image, "
                              "which stretches boxes; add image_sizes.csv "
                              "(image_id,width,height) to the root", stacklevel=2)
        sx, sy = self.image_size / space_w, self.image_size / space_h
        return [{"label": r.label, "x": r.x * sx, "y": r.y * sy, "w": r.w * sx, "h": r.h * sy}
                for r in rows.itertuples(index=False)]

    def _header_size(self, i: int):
        image_id = self.records.at[i, "image_id"]
        if image_id not in self._header_sizes:
            path = self.records.at[i, "path"]
            dicom = None
            if isinstance(path, str):
                stem = os.path.splitext(path)[0]
                dicom = next((stem + s for s in (".dicom", ".dcm") if os.path.isfile(stem + s)),
                             None)
            self._header_sizes[image_id] = dicom_size(dicom) if dicom else None
        return self._header_sizes[image_id]

    def cache_key(self) -> str:
        return f"vindr:{self.root.resolve()}"


__all__ = ["VinDrDataset", "read_physionet_labels", "read_box_rows", "kaggle_labels",
           "no_finding_rule", "physionet_no_finding", "kaggle_no_finding",
           "read_dicom", "LABEL_SETS", "AGGREGATES"]
