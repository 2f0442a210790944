"""Which images are explained, for which class, and the same images at every model's size.

An *item* is one (image, class) pair: each class with a box on a boxed image, so an image with
boxes of two findings is explained twice. Which images may be used depends on what the models
saw: each source notebook's ``splits.csv`` says the split of every image it loaded; an image a
notebook never loaded (another subsample, another dataset) was never seen by its models.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .discovery import seen_splits

TRAINING_SPLITS = ("train", "val")


def split_status(image_ids: Sequence[str], results_root: Path, notebooks: Sequence[str]
                 ) -> pd.DataFrame:
    """image_id × notebook → that notebook's split of the image, or "unused"."""
    table = pd.DataFrame(index=pd.Index([str(i) for i in image_ids], name="image_id"))
    for notebook in notebooks:
        table[notebook] = seen_splits(results_root, notebook).reindex(table.index).fillna("unused")
    return table


def select_items(dataset, results_root: Path, notebooks: Sequence[str],
                 splits: Sequence[str] = ("test",), max_images: int | None = None,
                 fallback_images: int = 0) -> pd.DataFrame:
    """Items (image_id, row, class, boxes, seen_by) to explain, boxed images first.

    A boxed image is used when every source notebook put it in one of ``splits`` or never
    loaded it; ``seen_by`` names the notebooks that trained or validated on it (only possible
    when ``splits`` includes train or val). Without any usable box, ``fallback_images`` images
    of the test split with a positive label are explained for their first positive class
    (``boxes`` 0: shown in figures, absent from localization).
    """
    unknown = set(splits) - {"train", "val", "test"}
    if unknown or not splits:
        raise ValueError(f"splits must be a non-empty subset of train, val, test; got {list(splits)}")
    ids = dataset.records["image_id"].astype(str).to_numpy()
    boxes = dataset.boxes[dataset.boxes["image_id"].astype(str).isin(ids)] if len(dataset.boxes) \
        else pd.DataFrame(columns=["image_id", "label"])
    status = split_status(ids, results_root, notebooks)
    allowed = set(splits) | {"unused"}
    usable = status.isin(allowed).all(axis=1) if len(notebooks) else pd.Series(True, index=status.index)
    seen = status.apply(lambda row: ", ".join(n for n in status.columns if row[n] in TRAINING_SPLITS),
                        axis=1) if len(notebooks) else pd.Series("", index=status.index)
    row_of = {image_id: k for k, image_id in enumerate(ids)}
    items = []
    boxed_ids = [i for i in dict.fromkeys(boxes["image_id"].astype(str)) if usable.get(i, False)]
    if max_images is not None:
        boxed_ids = boxed_ids[:int(max_images)]
    for image_id in boxed_ids:
        own = boxes[boxes["image_id"].astype(str) == image_id]
        for label, group in own.groupby("label", sort=True):
            items.append({"image_id": image_id, "row": row_of[image_id], "class": label,
                          "boxes": len(group), "seen_by": seen[image_id]})
    if not items and fallback_images > 0:
        test_like = [i for i in ids if usable[i] and
                     (not len(notebooks) or (status.loc[i] == "test").any())]
        for image_id in test_like:
            labels = dataset.labels[row_of[image_id]]
            positive = np.flatnonzero(labels == 1)
            if len(positive):
                items.append({"image_id": image_id, "row": row_of[image_id],
                              "class": dataset.classes[int(positive[0])], "boxes": 0,
                              "seen_by": seen[image_id]})
            if len(items) >= fallback_images:
                break
    return pd.DataFrame(items, columns=["image_id", "row", "class", "boxes", "seen_by"])


def at_size(dataset, size: int):
    """A view of ``dataset`` whose images and boxes come at ``size`` px (one parse of the
    release, any resolution: images are resized from the source file as training did)."""
    if getattr(dataset, "cache", None) is not None:
        raise ValueError("at_size needs a dataset without an image cache (the cache holds one size)")
    view = dataset.subset(np.arange(len(dataset)))
    view.image_size = int(size)
    return view


def item_images(dataset, items: pd.DataFrame, size: int) -> torch.Tensor:
    """[n_items, 1, size, size] float images in [0, 1], one per item (repeated images are read
    once)."""
    view = at_size(dataset, size)
    cache: dict[int, torch.Tensor] = {}
    out = []
    for row in items["row"]:
        if int(row) not in cache:
            cache[int(row)] = view[int(row)]["image"]
        out.append(cache[int(row)])
    return torch.stack(out) if out else torch.zeros(0, 1, size, size)


def item_boxes(dataset, items: pd.DataFrame, size: int) -> list[list[dict]]:
    """Each item's boxes of its own class, in ``size``-pixel units."""
    view = at_size(dataset, size)
    return [[b for b in view.boxes_for(int(row)) if b["label"] == label]
            for row, label in zip(items["row"], items["class"])]


__all__ = ["split_status", "select_items", "at_size", "item_images", "item_boxes",
           "TRAINING_SPLITS"]
