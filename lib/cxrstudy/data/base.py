"""The one dataset contract every adapter fills (torchxrayvision-style plain classes).

An adapter parses its release's files into three tables and knows how to decode one image:

- ``records``: one row per image; columns ``image_id``, ``patient_id`` (str), ``view``, ``sex``,
  ``age`` and optionally ``official_split`` ("train"/"val"/"test"; honoured by
  ``splits.assign_splits``), ``path`` and ``no_finding`` (the release's own "No finding"
  label, 1/0, where it has one apart from the classes: NIH, VinDr-CXR).
- ``labels``: float32 array [N, C] aligned with ``records``; 1 = present, 0 = absent,
  NaN = unknown (uncertain under the ``ignore`` policy, or not annotated). Unknowns are masked
  out of losses and metrics, never silently read as negatives.
- ``boxes``: DataFrame ``image_id, label, x, y, w, h, space_w, space_h``; coordinates live in a
  reference pixel space of ``space_w × space_h`` and are scaled to ``image_size`` on access.

Everything else (resizing, targets and masks, box scaling, subsets, cache use) lives here once.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

import warnings

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..paths import DataNotFoundError

RECORD_COLUMNS = ("image_id", "patient_id", "view", "sex", "age")
BOX_COLUMNS = ("image_id", "label", "x", "y", "w", "h", "space_w", "space_h")


class CorruptImageError(RuntimeError):
    """An image file that exists but cannot be decoded (named in the message)."""


class UnsafeImagePathError(ValueError):
    """A labels-file entry that would open a file outside its dataset folder."""


def _leaves_root(folder: Path, resolved_root: Path, entry: str) -> bool:
    """True when ``entry`` is absolute or, climbing with '..', resolves outside the root."""
    if not entry.startswith(("/", "\\")) and ".." not in entry:
        return False  # the common case, decided without touching the disk
    if os.path.isabs(entry) or entry.startswith("\\"):
        return True
    if ".." not in PurePosixPath(entry.replace("\\", "/")).parts:
        return False  # "a..b.png" is a plain name
    return not (folder / entry).resolve().is_relative_to(resolved_root)


def refuse_paths_outside(root, entries: Iterable[str], label_file, under: str = "") -> None:
    """Raise :class:`UnsafeImagePathError` naming the entries of ``label_file`` that would be
    opened outside ``root`` (absolute, or '..' leading out of it); entries are relative to
    ``root / under``.

    An image id like ``../../x.png`` otherwise becomes a path that is opened and trained on.
    Root and candidate are compared resolved, so a data root reached through a symlink keeps
    working; relative entries without '..' are never resolved (a root may hold symlinks).
    """
    root = Path(root)
    resolved_root = root.resolve()
    folder = root / under
    bad = [str(e) for e in entries if _leaves_root(folder, resolved_root, str(e))]
    if bad:
        raise UnsafeImagePathError(
            f"{label_file}: {len(bad)} image entries point outside the dataset folder {root} "
            f"(absolute, or climbing out with '..'), e.g. {bad[:3]}; refused")


def resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D uint8 image to ``size × size`` with area-averaging on downscale.

    The whole image is resized (no crop), so boxes scale per axis and nothing is cut away.
    """
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {image.shape}")
    if image.shape == (size, size):
        return np.ascontiguousarray(image, dtype=np.uint8)
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    shrinking = size < min(image.shape)
    method = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return np.array(pil.resize((size, size), method), dtype=np.uint8)  # writable for torch


def to_uint8_grayscale(image: np.ndarray) -> np.ndarray:
    """Bring a decoded image to 2-D uint8: drop colour/alpha, rescale 16-bit by its own range."""
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[..., :3].mean(axis=-1) if image.shape[-1] in (3, 4) else image[..., 0]
    if image.dtype == np.uint8:
        return image
    image = image.astype(np.float32)
    lo, hi = float(image.min()), float(image.max())
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip((image - lo) * scale, 0, 255).astype(np.uint8)


def read_image_file(path) -> np.ndarray:
    """Decode a PNG/JPEG file to 2-D uint8, raising :class:`CorruptImageError` naming the file."""
    try:
        with Image.open(path) as pil:
            pil.load()
            if pil.mode in ("I;16", "I;16B", "I;16L", "I"):
                return to_uint8_grayscale(np.asarray(pil))
            return np.asarray(pil.convert("L"), dtype=np.uint8)
    except FileNotFoundError:
        raise
    except Exception as exc:  # PIL raises several unrelated types for broken files
        raise CorruptImageError(f"cannot decode image {path}: {exc}") from exc


def report_missing_images(found: np.ndarray, ids: pd.Series, strict: bool, where: str) -> None:
    """Images listed but absent on disk: an error when ``strict`` (or when none is there),
    else a warning. The rows stay, so ``cxrstudy data check`` names each file and the image
    cache (``cache=True``) leaves them out; reading one raises FileNotFoundError."""
    missing = int((~found).sum())
    if missing == 0:
        return
    examples = ids[~found].iloc[:3].tolist()
    message = f"{missing} of {len(found)} images listed are missing under {where} (e.g. {examples})"
    if strict or missing == len(found):
        raise DataNotFoundError(message)
    warnings.warn(message + "; reading them will fail (cache=True leaves them out, "
                  "strict=True makes this an error, `cxrstudy data check` lists them)",
                  stacklevel=3)


class CXRDataset(torch.utils.data.Dataset):
    """Base class: a multi-label chest X-ray dataset at one square ``image_size``.

    Items are dicts: ``image`` float32 [1, S, S] in [0, 1]; ``target`` float32 [C] (unknown → 0);
    ``mask`` float32 [C] (1 = label known); ``index`` int; ``meta`` dict with ``image_id``,
    ``patient_id``, ``view``, ``sex``, ``age`` and ``boxes`` (list of dicts in S-pixel units).
    """

    name: str = "base"
    classes: list[str]
    records: pd.DataFrame
    labels: np.ndarray
    boxes: pd.DataFrame
    synthetic: bool = False

    def __init__(self, image_size: int = 224, strict: bool = False):
        if int(image_size) < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
        self.image_size = int(image_size)
        self.strict = bool(strict)
        self.cache = None  # an ImageCache once attached; then items never touch image files
        self.split_name = "all"

    # ---- what adapters implement -------------------------------------------------------
    def read_image(self, i: int) -> np.ndarray:
        """Decode the image of ``records`` row ``i`` at its source resolution as 2-D uint8.

        The default reads the file in the ``path`` column; adapters whose pixels live elsewhere
        (arrays, DICOM, procedural) override it. Always go through ``self.records`` row ``i``:
        subsets reorder rows, so never keep positions from construction.
        """
        if "path" not in self.records.columns:
            raise NotImplementedError(f"{self.name}: no 'path' column and no read_image override")
        path = self.records.at[i, "path"]
        if not isinstance(path, str):
            raise DataNotFoundError(f"{self.name}: image {self.records.at[i, 'image_id']} has no "
                                    "file (dataset built with labels_only=True)")
        return read_image_file(path)

    def cache_key(self) -> str:
        """What identifies this dataset's pixels besides the image ids: its name and root folder."""
        root = getattr(self, "root", None)
        return f"{self.name}:{root.resolve()}" if root is not None else self.name

    # ---- shared behaviour -----------------------------------------------------------------
    def validate(self) -> None:
        """Check the parsed tables line up; adapters call this at the end of ``__init__``."""
        missing = [c for c in RECORD_COLUMNS if c not in self.records.columns]
        if missing:
            raise ValueError(f"{self.name}: records lack columns {missing}")
        if self.labels.shape != (len(self.records), len(self.classes)):
            raise ValueError(
                f"{self.name}: labels shape {self.labels.shape} does not match "
                f"{len(self.records)} records × {len(self.classes)} classes"
            )
        if not hasattr(self, "boxes") or self.boxes is None:
            self.boxes = pd.DataFrame(columns=list(BOX_COLUMNS))
        self.records = self.records.reset_index(drop=True)
        self.records["patient_id"] = self.records["patient_id"].astype(str)
        self.labels = np.asarray(self.labels, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def targets(self) -> np.ndarray:
        """Multi-hot targets [N, C] with unknown labels set to 0 (see :attr:`masks`)."""
        return np.nan_to_num(self.labels, nan=0.0).astype(np.float32)

    @property
    def masks(self) -> np.ndarray:
        """1 where the label is known, 0 where it is uncertain/missing and must be ignored."""
        return (~np.isnan(self.labels)).astype(np.float32)

    @property
    def patient_ids(self) -> np.ndarray:
        return self.records["patient_id"].to_numpy()

    def load_resized(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 [S, S]: from the cache when attached, else decoded and resized."""
        if self.cache is not None:
            return self.cache.get(self.records.at[i, "image_id"])
        return resize_uint8(self.read_image(i), self.image_size)

    def boxes_for(self, i: int, size: int | None = None) -> list[dict[str, Any]]:
        """Boxes of image ``i`` scaled to ``size`` pixels per axis (default ``image_size``; another
        size places them on the image resized to it, as in a resolution strip)."""
        if len(self.boxes) == 0:
            return []
        size = self.image_size if size is None else size
        rows = self.boxes[self.boxes["image_id"] == self.records.at[i, "image_id"]]
        out = []
        for row in rows.itertuples(index=False):
            sx = size / float(row.space_w)
            sy = size / float(row.space_h)
            out.append({"label": row.label, "x": row.x * sx, "y": row.y * sy,
                        "w": row.w * sx, "h": row.h * sy})
        return out

    def meta(self, i: int) -> dict[str, Any]:
        rec = self.records.iloc[i]
        age = rec["age"]
        return {
            "image_id": str(rec["image_id"]),
            "patient_id": str(rec["patient_id"]),
            "view": None if pd.isna(rec["view"]) else str(rec["view"]),
            "sex": None if pd.isna(rec["sex"]) else str(rec["sex"]),
            "age": None if pd.isna(age) else float(age),
            "boxes": self.boxes_for(i),
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        image = torch.from_numpy(self.load_resized(i)).float().div_(255.0).unsqueeze(0)
        label = self.labels[i]
        return {
            "image": image,
            "target": torch.from_numpy(np.nan_to_num(label, nan=0.0)),
            "mask": torch.from_numpy((~np.isnan(label)).astype(np.float32)),
            "index": i,
            "meta": self.meta(i),
        }

    def subset(self, indices: Sequence[int], split_name: str | None = None) -> "CXRDataset":
        """A view of these rows sharing the parsed tables' logic (labels, boxes, cache)."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == 0:
            raise ValueError(f"{self.name}: the requested subset/split is empty")
        view = self.__class__.__new__(self.__class__)
        view.__dict__.update(self.__dict__)
        view.records = self.records.iloc[indices].reset_index(drop=True)
        view.labels = self.labels[indices]
        view._source_index = getattr(self, "_source_index", np.arange(len(self.records)))[indices]
        if split_name is not None:
            view.split_name = split_name
        return view

    def source_index(self, i: int) -> int:
        """Row of image ``i`` in the adapter's full table (adapters read files by this)."""
        return int(getattr(self, "_source_index", np.arange(len(self.records)))[i])

    def describe(self) -> pd.DataFrame:
        """Per-class positives, negatives, unknowns and prevalence among known labels."""
        pos = np.nansum(self.labels == 1, axis=0)
        neg = np.nansum(self.labels == 0, axis=0)
        unk = np.isnan(self.labels).sum(axis=0)
        known = pos + neg
        prev = np.divide(pos, known, out=np.zeros(len(pos), dtype=float), where=known > 0)
        return pd.DataFrame({"class": self.classes, "positives": pos, "negatives": neg,
                             "unknown": unk, "prevalence": prev})

    def __repr__(self) -> str:
        synthetic = " SYNTHETIC" if self.synthetic else ""
        return (f"{self.__class__.__name__}(name={self.name!r}, split={self.split_name!r}, "
                f"images={len(self)}, patients={self.records['patient_id'].nunique()}, "
                f"classes={self.num_classes}, image_size={self.image_size}{synthetic})")


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; keep ``meta`` as a list (boxes differ in count per image)."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "target": torch.stack([it["target"] for it in items]),
        "mask": torch.stack([it["mask"] for it in items]),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "meta": [it["meta"] for it in items],
    }
