"""Small fabricated datasets for mechanics tests (cache, loader, check).

Two flavours, both real :class:`CXRDataset` subclasses:

- :class:`FolderCXR` reads PNGs and a ``labels.csv`` written by :func:`write_fake_folder`, so
  missing and corrupt files are genuine files on disk.
- :class:`GeneratedCXR` draws each image from its id in memory (no files), for large counts.

:func:`labelled_batches` gives trainer tests ready-made batches (image, target, mask, index);
:func:`save_best_checkpoint` writes a model as a completed run's ``best.pt``.

Every image is recognisable: its pixels are a function of its row in the fabricated release, so a
test can tell which image landed in which cache row.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrstudy.data.base import CXRDataset, read_image_file

FAKE_CLASSES = ["Alpha", "Beta", "Gamma"]

#: the repository root (tests live in layer folders below tests/, at different depths)
REPO = Path(__file__).resolve().parents[1]


def write_notebook(folder, name, params_source, depends_on=None):
    """A minimal study notebook ``<folder>/<name>.ipynb``: a title, the ``parameters`` cell with
    ``params_source``, one code cell; ``depends_on`` goes into its cxrstudy metadata."""
    cells = [
        {"cell_type": "markdown", "metadata": {}, "source": ["# title"]},
        {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": params_source,
         "outputs": [], "execution_count": None},
        {"cell_type": "code", "metadata": {}, "source": "x = 1", "outputs": [], "execution_count": None},
    ]
    meta = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    if depends_on:
        meta["cxrstudy"] = {"depends_on": depends_on}
    (folder / f"{name}.ipynb").write_text(json.dumps(
        {"cells": cells, "metadata": meta, "nbformat": 4, "nbformat_minor": 5}))


def labelled_batches(n: int, size: int, n_classes: int, seed: int = 0, batch: int = 4) -> list[dict]:
    """``n`` one-channel batches as the loader yields them: random images and targets (seeded),
    every label known except the second class of each batch's first image (mask 0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n):
        mask = torch.ones(batch, n_classes)
        mask[0, 1] = 0.0
        out.append({"image": torch.rand(batch, 1, size, size, generator=g),
                    "target": (torch.rand(batch, n_classes, generator=g) > 0.5).float(),
                    "mask": mask, "index": torch.arange(b * batch, (b + 1) * batch)})
    return out


def save_best_checkpoint(path, model, class_names=("A", "B")) -> Path:
    """``model`` saved as a completed run's ``best.pt`` (weights, its ``cxr_config``, class
    names), as the trainer writes it: what the checkpoint loaders read back."""
    from cxrstudy.train import save_checkpoint

    save_checkpoint({"kind": "best", "epoch": 1, "model": model.state_dict(), "ema": None,
                     "model_config": model.cxr_config, "class_names": list(class_names)}, path)
    return Path(path)


def fake_pixels(number: int, size: int) -> np.ndarray:
    """A uint8 image unique to ``number``: a diagonal ramp plus an offset of ``number``."""
    ramp = np.add.outer(np.arange(size), np.arange(size)) * (200.0 / max(2 * size - 2, 1))
    return ((ramp.astype(np.int64) + 7 * number) % 256).astype(np.uint8)


def fake_labels(n: int) -> np.ndarray:
    """Labels [n, 3] with a fixed pattern: Alpha on even rows, Beta on every third, Gamma unknown
    on every fifth row and positive on rows ending in 1."""
    labels = np.zeros((n, len(FAKE_CLASSES)), dtype=np.float32)
    rows = np.arange(n)
    labels[:, 0] = rows % 2 == 0
    labels[:, 1] = rows % 3 == 0
    labels[:, 2] = rows % 10 == 1
    labels[rows % 5 == 0, 2] = np.nan
    return labels


def write_fake_folder(root: Path, n: int = 12, size: int = 40, missing=(), corrupt=()) -> Path:
    """Write ``n`` PNGs plus ``labels.csv`` under ``root``; rows in ``missing`` get no file and
    rows in ``corrupt`` get a file of garbage bytes. Two images per patient."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    ids = [f"img{i:04d}.png" for i in range(n)]
    for i, image_id in enumerate(ids):
        path = root / "images" / image_id
        if i in missing:
            continue
        if i in corrupt:
            path.write_bytes(b"this is not a png file")
            continue
        Image.fromarray(fake_pixels(i, size)).save(path)
    labels = fake_labels(n)
    table = pd.DataFrame({
        "image_id": ids,
        "patient_id": [f"p{i // 2}" for i in range(n)],
        "view": ["PA" if i % 3 else "AP" for i in range(n)],
        "sex": ["F" if i % 2 else "M" for i in range(n)],
        "age": [30 + i for i in range(n)],
    })
    for c, name in enumerate(FAKE_CLASSES):
        table[name] = labels[:, c]
    table.to_csv(root / "labels.csv", index=False)
    return root


class FolderCXR(CXRDataset):
    """Adapter for the layout :func:`write_fake_folder` writes; counts its image reads."""

    name = "fakefolder"
    classes = FAKE_CLASSES

    def __init__(self, root, image_size: int = 32, strict: bool = False):
        super().__init__(image_size=image_size, strict=strict)
        self.root = Path(root)
        table = pd.read_csv(self.root / "labels.csv")
        missing = [c for c in ("image_id", "patient_id", *FAKE_CLASSES) if c not in table.columns]
        if missing:
            raise ValueError(f"{self.root / 'labels.csv'}: missing columns {missing}")
        self.records = table[["image_id", "patient_id", "view", "sex", "age"]].copy()
        self.records["path"] = [str(self.root / "images" / i) for i in table["image_id"]]
        self.labels = table[FAKE_CLASSES].to_numpy(dtype=np.float32)
        self.reads = collections.Counter()  # shared with subsets (shallow __dict__ copy)
        self.validate()

    def read_image(self, i: int) -> np.ndarray:
        self.reads[self.records.at[i, "image_id"]] += 1
        return read_image_file(self.records.at[i, "path"])  # a file per row, as the real adapters

    def cache_key(self) -> str:
        return f"{self.name}:{self.root.resolve()}"


class GeneratedCXR(CXRDataset):
    """``n`` images of ``source_size`` px made from their ids in memory (no files at all)."""

    name = "generated"
    classes = FAKE_CLASSES

    def __init__(self, n: int = 64, image_size: int = 32, source_size: int = 48,
                 strict: bool = False, tag: str = "a"):
        super().__init__(image_size=image_size, strict=strict)
        self.source_size = source_size
        self.tag = tag
        self.records = pd.DataFrame({
            "image_id": [f"gen{i:06d}" for i in range(n)],
            "patient_id": [f"p{i // 3}" for i in range(n)],
            "view": "PA", "sex": "F", "age": 50.0,
        })
        self.labels = fake_labels(n)
        self.reads = collections.Counter()
        self.validate()

    def read_image(self, i: int) -> np.ndarray:
        image_id = self.records.at[i, "image_id"]
        self.reads[image_id] += 1
        return fake_pixels(int(image_id[3:]), self.source_size)

    def cache_key(self) -> str:
        return f"{self.name}:{self.tag}:{self.source_size}"
