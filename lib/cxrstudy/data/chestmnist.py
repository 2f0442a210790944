"""ChestMNIST (MedMNIST v2, Yang et al., Sci Data 2023): NIH ChestX-ray14 resized to 28-224 px.

Files, named as the ``medmnist`` package names them (``{flag}{size_flag}.npz`` with
``size_flag`` empty for 28 and ``_<size>`` otherwise)::

    <root>/chestmnist.npz  chestmnist_64.npz  chestmnist_128.npz  chestmnist_224.npz

each holding ``{train,val,test}_images`` (uint8 [N, S, S]) and ``{train,val,test}_labels``
(0/1 [N, 14], the NIH findings in NIH_CLASSES order). The convention is written out here
rather than imported: importing ``medmnist`` loads its whole stack and creates
``~/.medmnist`` as a side effect; the tests check it against ``medmnist.INFO``.

The official train/val/test split becomes ``official_split``. MedMNIST derives it from the
NIH patient-level split, but the files carry no patient ids, so ``patient_id`` is the image
id (one "patient" per row): re-splitting by patient is not possible with this release.

Image arrays are memory-mapped straight out of the .npz when stored uncompressed (as
MedMNIST ships them), so the 224-px file (≈5.6 GB of pixels) is never loaded whole;
compressed archives are loaded on first use.
"""
from __future__ import annotations

import struct
import threading
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from ..paths import DataNotFoundError, dataset_dir
from .base import BOX_COLUMNS, CXRDataset
from .labels import NIH_CLASSES

FLAG = "chestmnist"
AVAILABLE_SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
DOWNLOAD_COMMAND = "cxrstudy data download chestmnist"


def npz_name(size: int) -> str:
    """File name MedMNIST uses for ``size``: chestmnist.npz (28) or chestmnist_<size>.npz."""
    if size not in AVAILABLE_SIZES:
        raise ValueError(f"ChestMNIST comes in sizes {AVAILABLE_SIZES}, not {size}")
    return f"{FLAG}.npz" if size == 28 else f"{FLAG}_{size}.npz"


def default_size(image_size: int) -> int:
    """The smallest available size ≥ ``image_size`` (224 when asking for more)."""
    return next((s for s in AVAILABLE_SIZES if s >= image_size), AVAILABLE_SIZES[-1])


def _read_npy_header(handle):
    """(shape, fortran_order, dtype) of the .npy stream at the handle's position."""
    version = np.lib.format.read_magic(handle)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    return read_header(handle)


def npz_member_shape(path: Path, key: str) -> tuple[int, ...]:
    """Shape of array ``key`` in a .npz, read from its header without loading the data."""
    with zipfile.ZipFile(path) as archive, archive.open(key + ".npy") as stream:
        return tuple(_read_npy_header(stream)[0])


def memmap_npz_member(path: Path, key: str):
    """``np.memmap`` of array ``key`` inside an uncompressed .npz, or None if compressed."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(key + ".npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local_header = handle.read(30)
        name_length, extra_length = struct.unpack("<HH", local_header[26:30])
        handle.seek(info.header_offset + 30 + name_length + extra_length)
        shape, fortran_order, dtype = _read_npy_header(handle)
        offset = handle.tell()
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset,
                     order="F" if fortran_order else "C")


class ChestMNISTDataset(CXRDataset):
    """ChestMNIST at one of 28/64/128/224 px (``size``; default: closest ≥ ``image_size``)."""

    name = "chestmnist"
    classes = list(NIH_CLASSES)

    def __init__(self, root=None, image_size: int = 224, strict: bool = False,
                 size: int | None = None):
        super().__init__(image_size=image_size, strict=strict)
        self.size = default_size(self.image_size) if size is None else int(size)
        self.root = dataset_dir("chestmnist", root)
        self.path = self.root / npz_name(self.size)
        if not self.path.is_file():
            present = [s for s in AVAILABLE_SIZES if (self.root / npz_name(s)).is_file()]
            hint = f"; sizes present there: {present}" if present else ""
            raise DataNotFoundError(f"ChestMNIST file {self.path} not found{hint}. Run "
                                    f"`{DOWNLOAD_COMMAND}` (or pass size=...)")
        try:
            archive = np.load(self.path)
        except Exception as exc:
            raise ValueError(f"{self.path} is not a readable .npz file: {exc}") from exc
        with archive:
            keys = set(archive.files)
            missing = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")
                       if f"{s}_{kind}" not in keys]
            if missing:
                raise ValueError(f"{self.path}: missing arrays {missing}; found {sorted(keys)}")
            label_parts = [np.asarray(archive[f"{s}_labels"]) for s in SPLITS]
        records, labels = [], []
        for split, part in zip(SPLITS, label_parts):
            if part.ndim != 2 or part.shape[1] != len(NIH_CLASSES):
                raise ValueError(f"{self.path}: {split}_labels has shape {part.shape}, expected "
                                 f"[N, {len(NIH_CLASSES)}]")
            if not np.isin(part, (0, 1)).all():
                raise ValueError(f"{self.path}: {split}_labels holds values other than 0/1")
            ids = [f"{split}_{row:06d}" for row in range(len(part))]
            records.append(pd.DataFrame({"image_id": ids, "patient_id": ids,
                                         "official_split": split, "row": np.arange(len(part))}))
            labels.append(part.astype(np.float32))
        self.records = pd.concat(records, ignore_index=True)
        self.records["view"] = None
        self.records["sex"] = None
        self.records["age"] = np.nan
        self.labels = np.concatenate(labels)
        self.boxes = pd.DataFrame(columns=list(BOX_COLUMNS))
        self._arrays: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        for split, part in zip(SPLITS, label_parts):
            shape = npz_member_shape(self.path, f"{split}_images")
            if len(shape) not in (3, 4) or shape[:3] != (len(part), self.size, self.size):
                raise ValueError(f"{self.path}: {split}_images has shape {shape}, expected "
                                 f"[{len(part)}, {self.size}, {self.size}]")
        self.validate()

    def __getstate__(self):
        """Pickle without the lock and the memory maps (workers reopen them lazily)."""
        state = self.__dict__.copy()
        state["_lock"], state["_arrays"] = None, {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _images(self, split: str) -> np.ndarray:
        # The cache and the data check decode with threads: load each split once, not per thread.
        with self._lock:
            if split not in self._arrays:
                array = memmap_npz_member(self.path, f"{split}_images")
                if array is None:
                    with np.load(self.path) as archive:
                        array = archive[f"{split}_images"]
                self._arrays[split] = array
            return self._arrays[split]

    def read_image(self, i: int) -> np.ndarray:
        image = np.asarray(self._images(self.records.at[i, "official_split"])
                           [int(self.records.at[i, "row"])])
        if image.ndim == 3:  # [S, S, 1] or RGB
            image = image[..., 0] if image.shape[-1] == 1 else image.mean(axis=-1)
        return np.array(image, dtype=np.uint8)

    def cache_key(self) -> str:
        return f"chestmnist:{self.path.resolve()}"


__all__ = ["ChestMNISTDataset", "npz_name", "default_size", "memmap_npz_member",
           "npz_member_shape",
           "AVAILABLE_SIZES", "DOWNLOAD_COMMAND"]
