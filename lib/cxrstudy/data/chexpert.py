"""CheXpert (Irvin et al., AAAI 2019), the CheXpert-v1.0-small layout.

Root layout (``cxrstudy.paths.dataset_dir("chexpert", root)``)::

    train.csv  valid.csv        # Path,Sex,Age,Frontal/Lateral,AP/PA,<14 observations>
    train/patient00001/study1/view1_frontal.jpg ...
    valid/patient64541/...

CSV paths start with ``CheXpert-v1.0-small/`` (or ``CheXpert-v1.0/``), which is stripped.

Each observation cell is 1 (positive), 0 (negative), -1 (uncertain) or blank (not mentioned
in the report). The labels are parsed here from the raw columns, not through
``torchxrayvision.datasets.CheX_Dataset``, because xrv folds blank and uncertain into one NaN
and drops "No Finding", so neither policy below could be applied afterwards:

- ``uncertainty``: ``"u_ones"`` (-1 -> 1), ``"u_zeros"`` (-1 -> 0), ``"ignore"`` (-1 -> NaN,
  masked out of losses and metrics). These are the U-Ones/U-Zeros/U-Ignore policies of the
  CheXpert paper.
- ``blank``: ``"zeros"`` (blank -> 0; a finding the report does not mention is taken as
  absent) or ``"ignore"`` (blank -> NaN).

The MXA paper trains with U-Ones and blanks as 0, the defaults here.
valid.csv (expert-labelled, 0/1 only) becomes ``official_split = "test"``.

Views: ``views="frontal"`` (the default) keeps the frontal AP and PA images; ``views="all"``
keeps every row of the CSVs, lateral views and the few frontal "LL"/"RL" included, as a loader
that reads the CSVs whole does (the MXA authors': their test set is all 234 images of
valid.csv, 202 of them frontal).
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..paths import DataNotFoundError, dataset_dir
from .base import BOX_COLUMNS, CXRDataset, refuse_paths_outside, report_missing_images
from .labels import CHEXPERT_CLASSES

UNCERTAINTY_POLICIES = {"u_ones": 1.0, "u_zeros": 0.0, "ignore": np.nan}
BLANK_POLICIES = {"zeros": 0.0, "ignore": np.nan}
VIEW_GROUPS = ("frontal", "lateral")
FRONTAL_AP_PA = ("AP", "PA")  # what views="frontal" keeps by default
_REQUIRED_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
_OFFICIAL_SPLIT = {"train": "train", "valid": "test", "test": "test"}
# "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg": the prefix is stripped.
_PATH_PATTERN = re.compile(r"^\s*(?:CheXpert-v1\.0(?:-small)?/)?(?P<relative>(?P<top>"
                           + "|".join(_OFFICIAL_SPLIT)
                           + r")/(?P<patient>patient\d+)/(?P<study>study\d+)/[^/]+?)\s*$")


def _clean(values: pd.Series) -> pd.Series:
    """Strip a low-cardinality text column through its unique values (fast on 200k rows)."""
    uniques = values.dropna().unique()
    return values.map({v: str(v).strip() for v in uniques})


def _normalise_views(views) -> set[str]:
    if views is None or views == "both" or views == "all":
        return set(VIEW_GROUPS)
    wanted = {views} if isinstance(views, str) else set(views)
    wanted = {str(v).lower() for v in wanted}
    if "both" in wanted or "all" in wanted:
        return set(VIEW_GROUPS)
    unknown = wanted - set(VIEW_GROUPS)
    if unknown or not wanted:
        raise ValueError(f"views must be a subset of {VIEW_GROUPS} (or 'all'), got {views!r}")
    return wanted


def read_chexpert_csv(path: Path) -> pd.DataFrame:
    """One CheXpert CSV, checking its columns (error names the file)."""
    if not path.is_file():
        raise DataNotFoundError(f"CheXpert label file {path} not found")
    table = pd.read_csv(path, index_col=False, dtype={"Path": str})
    missing = [c for c in (*_REQUIRED_COLUMNS, *CHEXPERT_CLASSES) if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing required columns {missing}")
    table["source_file"] = str(path)
    table["source_line"] = np.arange(len(table)) + 2  # header is line 1
    return table


def apply_label_policies(raw: np.ndarray, uncertainty: str, blank: str,
                         where=lambda row, col: f"row {row}") -> np.ndarray:
    """Raw cells (1, 0, -1, NaN) -> float32 labels under the two policies.

    ``where(row, column)`` names a cell for the error raised on any other value.
    """
    raw = np.asarray(raw, dtype=np.float64)
    valid = np.isnan(raw) | np.isin(raw, (1.0, 0.0, -1.0))
    if not valid.all():
        row, col = map(int, np.argwhere(~valid)[0])
        raise ValueError(f"{where(row, col)}: value {raw[row, col]!r} in "
                         f"{CHEXPERT_CLASSES[col]!r} is not 1, 0, -1 or blank")
    labels = raw.copy()
    labels[raw == -1.0] = UNCERTAINTY_POLICIES[uncertainty]
    labels[np.isnan(raw)] = BLANK_POLICIES[blank]
    return labels.astype(np.float32)


def _existing_files(image_root: Path, top_folders: Sequence[str]) -> set[str]:
    """Relative paths (posix) of all files under the given top folders, walked once."""
    found: set[str] = set()
    for top in top_folders:
        folder = image_root / top
        if not folder.is_dir():
            continue
        for dirpath, _, filenames in os.walk(folder):
            rel = Path(dirpath).relative_to(image_root).as_posix()
            found.update(f"{rel}/{name}" for name in filenames)
    return found


class CheXpertDataset(CXRDataset):
    """CheXpert-v1.0-small: 14 observations (CHEXPERT_CLASSES, "No Finding" included).

    ``views``: ``"frontal"`` (or ``("frontal",)``), ``("lateral",)``, or ``"all"`` (also
    ``"both"``). ``ap_pa`` keeps frontal images of these AP/PA values (None = all frontal,
    including the few "LL"/"RL"); ``"auto"`` (the default) is ``("AP", "PA")`` when only frontal
    views are kept and None otherwise, so ``views="all"`` keeps every image.
    ``csv_path`` reads that one CSV (train.csv format) instead of root's train.csv+valid.csv;
    its images are looked up under ``root`` (default: the CSV's folder).
    ``labels_only=True`` parses labels without looking for images (``read_image`` raises).
    Missing image files: an error with ``strict=True``, else a warning (rows stay listed).
    Patient ids come from the path (``patient00001``).
    """

    name = "chexpert"
    classes = list(CHEXPERT_CLASSES)

    def __init__(self, root=None, image_size: int = 224, strict: bool = False,
                 uncertainty: str = "u_ones", blank: str = "zeros",
                 views: Sequence[str] | str | None = ("frontal",),
                 ap_pa: Sequence[str] | str | None = "auto",
                 csv_path=None, labels_only: bool = False):
        super().__init__(image_size=image_size, strict=strict)
        if uncertainty not in UNCERTAINTY_POLICIES:
            raise ValueError(f"uncertainty must be one of {list(UNCERTAINTY_POLICIES)}, "
                             f"got {uncertainty!r}")
        if blank not in BLANK_POLICIES:
            raise ValueError(f"blank must be one of {list(BLANK_POLICIES)}, got {blank!r}")
        self.uncertainty, self.blank = uncertainty, blank
        self.labels_only = bool(labels_only)
        view_groups = _normalise_views(views)
        if isinstance(ap_pa, str) and ap_pa == "auto":
            ap_pa = FRONTAL_AP_PA if view_groups == {"frontal"} else None

        if csv_path is not None:
            csv_files = [Path(csv_path).expanduser()]
            self.root = Path(root).expanduser() if root is not None else csv_files[0].parent
        else:
            self.root = dataset_dir("chexpert", root)
            if not self.root.is_dir():
                raise DataNotFoundError(f"CheXpert folder {self.root} does not exist")
            csv_files = [self.root / "train.csv"]
            if (self.root / "valid.csv").is_file():
                csv_files.append(self.root / "valid.csv")
            else:
                warnings.warn(f"{self.root / 'valid.csv'} not found: no official test split",
                              stacklevel=2)
        table = pd.concat([read_chexpert_csv(p) for p in csv_files], ignore_index=True)

        def where(row: int, col: int | None = None) -> str:
            return f"{table.at[row, 'source_file']} line {table.at[row, 'source_line']}"

        matches = [_PATH_PATTERN.match(str(path)) for path in table["Path"].tolist()]
        parts = pd.DataFrame([m.group("relative", "top", "patient", "study") if m else
                              (None,) * 4 for m in matches],
                             columns=["relative", "top", "patient", "study"])
        unparsed = parts["relative"].isna()
        if unparsed.any():
            row = int(np.argmax(unparsed.to_numpy()))
            raise ValueError(f"{where(row)}: path {table.at[row, 'Path']!r} is not "
                             f"<{'|'.join(_OFFICIAL_SPLIT)}>/patientNNNNN/studyN/<file>")
        relative, patient, top = parts["relative"], parts["patient"], parts["top"]
        official = top.map(_OFFICIAL_SPLIT)
        frontal_lateral = _clean(table["Frontal/Lateral"]).str.lower()
        bad_fl = ~frontal_lateral.isin(VIEW_GROUPS)
        if bad_fl.any():
            row = int(np.argmax(bad_fl.to_numpy()))
            raise ValueError(f"{where(row)}: Frontal/Lateral is "
                             f"{table.at[row, 'Frontal/Lateral']!r}")
        ap_pa_values = _clean(table["AP/PA"]).str.upper()
        view = np.where(frontal_lateral == "lateral", "Lateral",
                        ap_pa_values.fillna("Frontal").to_numpy(dtype=object))

        labels = apply_label_policies(table[list(CHEXPERT_CLASSES)].to_numpy(dtype=np.float64),
                                      uncertainty, blank, where)
        sex = _clean(table["Sex"]).map({"Male": "M", "Female": "F"})
        records = pd.DataFrame({
            "image_id": relative.to_numpy(),
            "patient_id": patient.to_numpy(),
            "view": view,
            "sex": sex.to_numpy(),
            "age": pd.to_numeric(table["Age"], errors="coerce").to_numpy(dtype=float),
            "official_split": official.to_numpy(),
            "study": parts["study"].to_numpy(),
        })

        keep = frontal_lateral.isin(view_groups).to_numpy(dtype=bool, copy=True)
        if ap_pa is not None:
            wanted = {ap_pa.upper()} if isinstance(ap_pa, str) else {v.upper() for v in ap_pa}
            keep &= (frontal_lateral == "lateral").to_numpy() | ap_pa_values.isin(wanted) \
                .fillna(False).to_numpy(dtype=bool)
        if not keep.any():
            raise ValueError(f"CheXpert: no image left after views={views!r}, ap_pa={ap_pa!r}")
        if self.labels_only:
            records["path"] = None
        else:
            refuse_paths_outside(self.root, records["image_id"],
                                 " and ".join(str(p) for p in csv_files))
            existing = _existing_files(self.root, sorted(top.unique()))
            found = records["image_id"].isin(existing).to_numpy()
            report_missing_images(found[keep], records["image_id"][keep], self.strict,
                                  str(self.root))
            records["path"] = [str(self.root / rel) for rel in records["image_id"]]
        self.records = records[keep].reset_index(drop=True)
        self.labels = labels[keep]
        self.boxes = pd.DataFrame(columns=list(BOX_COLUMNS))
        self.validate()


__all__ = ["CheXpertDataset", "apply_label_policies", "read_chexpert_csv", "FRONTAL_AP_PA",
           "UNCERTAINTY_POLICIES", "BLANK_POLICIES"]
