"""Does a saliency map point at the radiologists' box? Four numbers per (map, class).

A map s ≥ 0 on an H×W grid; pixel (r, c) covers [c, c+1) × [r, r+1) in the boxes' pixel units
(boxes are dicts ``x, y, w, h, label`` scaled to the map's size), so it is *in* a box when its
centre (c + ½, r + ½) is. B is the union of the class's boxes, as a pixel set.

* Pointing game (Zhang et al. 2018): a hit when the map's peak — argmax s, the first in row
  order on ties — lies in a box of the class (within ``tolerance`` pixels of one).
* IoU at a threshold t: M_t = {p : s_p ≥ t · max s};  IoU = |M_t ∩ B| / |M_t ∪ B|.
* Box coverage: |M_t ∩ B| / |B|, the share of the box the thresholded map covers.
* Mass inside (the energy-based pointing game of Score-CAM, Wang et al. 2020):
  Σ_{p∈B} s_p / Σ_p s_p, the share of the map's mass that falls in the box.
* Chance: |B| / (H·W), what a peak placed uniformly at random hits, and the mass inside of a
  uniform map — the level each number is read against.

A flat map (max s = min s; grad-cam returns zeros for a constant map) points nowhere: a miss,
IoU, coverage and mass 0. A class with no box has nothing to point at: its numbers are NaN and
it has no row in the summaries.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd


def class_boxes(boxes: Sequence[Mapping], label: str | None) -> list[Mapping]:
    return [b for b in boxes if label is None or b["label"] == label]


def box_mask(boxes: Sequence[Mapping], shape: tuple[int, int]) -> np.ndarray:
    """Boolean [H, W]: pixels whose centre lies inside any of ``boxes``."""
    height, width = int(shape[0]), int(shape[1])
    cy = np.arange(height)[:, None] + 0.5
    cx = np.arange(width)[None, :] + 0.5
    mask = np.zeros((height, width), dtype=bool)
    for b in boxes:
        mask |= ((cx >= b["x"]) & (cx <= b["x"] + b["w"]) &
                 (cy >= b["y"]) & (cy <= b["y"] + b["h"]))
    return mask


def peak(saliency: np.ndarray) -> tuple[int, int] | None:
    """(row, col) of the map's maximum (first in row order), None for a flat map."""
    saliency = np.asarray(saliency, dtype=float)
    if saliency.size == 0 or not np.isfinite(saliency).all():
        raise ValueError("the map is empty or holds NaN/inf")
    if saliency.max() == saliency.min():
        return None
    r, c = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
    return int(r), int(c)


def point_in_boxes(row: int, col: int, boxes: Sequence[Mapping], tolerance: float = 0.0) -> bool:
    """Whether pixel (row, col)'s centre lies within ``tolerance`` pixels of any box."""
    x, y = col + 0.5, row + 0.5
    for b in boxes:
        dx = max(b["x"] - x, 0.0, x - (b["x"] + b["w"]))
        dy = max(b["y"] - y, 0.0, y - (b["y"] + b["h"]))
        if np.hypot(dx, dy) <= tolerance:
            return True
    return False


def localize(saliency: np.ndarray, boxes: Sequence[Mapping], label: str | None = None,
             threshold: float = 0.5, tolerance: float = 0.0) -> dict:
    """The module's numbers for one map against the boxes of ``label`` (all boxes when None)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    saliency = np.asarray(saliency, dtype=float)
    if saliency.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {saliency.shape}")
    if (saliency < 0).any():
        raise ValueError("saliency maps must be non-negative (grad-cam's are in [0, 1])")
    own = class_boxes(boxes, label)
    mask = box_mask(own, saliency.shape)
    result = {"boxes": len(own), "box pixels": int(mask.sum()),
              "chance": float(mask.mean()) if own else np.nan}
    if not own:
        return dict(result, hit=np.nan, iou=np.nan, coverage=np.nan, mass_inside=np.nan)
    top = peak(saliency)
    if top is None:
        return dict(result, hit=0.0, iou=0.0, coverage=0.0, mass_inside=0.0)
    hot = saliency >= threshold * saliency.max()
    inter = float((hot & mask).sum())
    union = float((hot | mask).sum())
    return dict(result, hit=float(point_in_boxes(*top, own, tolerance)),
                iou=inter / union if union else 0.0,
                coverage=inter / mask.sum() if mask.sum() else 0.0,
                mass_inside=float(saliency[mask].sum() / saliency.sum()))


METRIC_COLUMNS = ("hit", "iou", "coverage", "mass_inside", "chance")


def summarize(rows: pd.DataFrame, by: Sequence[str] = ("model", "method", "class")
              ) -> pd.DataFrame:
    """Per group: images, boxes, pointing-game hits and hit rate, mean IoU, coverage, mass
    inside and chance. ``rows`` has one row per (map, class) from :func:`localize`; rows of a
    class without boxes are left out."""
    rows = rows[rows["boxes"] > 0] if "boxes" in rows.columns else rows.iloc[:0]
    if rows.empty:
        return pd.DataFrame(columns=[*by, "images", "boxes", "hits", "hit rate", "mean IoU",
                                     "mean coverage", "mean mass inside", "chance"])
    grouped = rows.groupby(list(by), sort=False)
    table = grouped.agg(images=("image_id", "nunique"), boxes=("boxes", "sum"),
                        hits=("hit", "sum"), **{"hit rate": ("hit", "mean"),
                                                "mean IoU": ("iou", "mean"),
                                                "mean coverage": ("coverage", "mean"),
                                                "mean mass inside": ("mass_inside", "mean"),
                                                "chance": ("chance", "mean")})
    table["hits"] = table["hits"].where(table["hit rate"].notna()).astype("Int64")  # no peak: none
    return table.reset_index()


__all__ = ["class_boxes", "box_mask", "peak", "point_in_boxes", "localize", "summarize",
           "METRIC_COLUMNS"]
