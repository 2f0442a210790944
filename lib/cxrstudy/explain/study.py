"""Notebook 07's one call: every trained model, every CAM method, the same items, scored.

For each model (rebuilt from its checkpoint) the items' images are read at the model's own
training size, each image explained for its item's class (matched to the model's outputs by
name, :func:`cxrstudy.data.labels.match_classes`), and every map resized (bilinear) to one
``display_size`` where it is scored against the boxes at that size and drawn.
"""
from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..data.labels import match_classes
from ..outputs import Outputs
from .cams import LABELS as CAM_LABELS
from .cams import METHODS, class_maps
from .discovery import TrainedModel
from .evidence import own_evidence, uint8_images
from .images import item_boxes, item_images
from .localization import localize
from .target_layers import cam_target


@dataclass
class Explanations:
    """What the notebook tabulates and draws."""

    items: pd.DataFrame                 # image_id, row, class, boxes, seen_by
    models: pd.DataFrame                # one row per model explained
    rows: pd.DataFrame                  # one row per (model, method, item): localize()'s numbers
    display_size: int
    images: list[np.ndarray]            # figure items' images, uint8 at display_size
    boxes: list[list[dict]]             # figure items' boxes (their class), display_size px
    titles: list[str]
    maps: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # method → model → maps
    evidence: dict[str, dict] = field(default_factory=dict)               # model → own evidence


def _resized(maps: np.ndarray, size: int) -> np.ndarray:
    if maps.shape[-1] == size and maps.shape[-2] == size:
        return maps
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    return F.interpolate(tensor, size=(size, size), mode="bilinear",
                         align_corners=False)[:, 0].clamp_(0, 1).numpy()


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(key, p) for p in patterns)


def explain_models(trained: Sequence[TrainedModel], dataset, items: pd.DataFrame, *,
                   methods: Sequence[str] = ("gradcam", "gradcam++", "eigencam", "scorecam"),
                   score_cam_models: Sequence[str] = ("*",), display_size: int = 224,
                   threshold: float = 0.5, tolerance: float = 0.0, n_figure_items: int = 4,
                   batch_size: int = 16, score_cam_batch_size: int = 64,
                   evidence: bool = True, device: str | None = None,
                   log=None) -> Explanations:
    """Explain ``items`` of ``dataset`` (no image cache) with every model in ``trained``."""
    from ..train.checkpoint import load_model_from_checkpoint

    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown CAM methods {bad}; choose from {', '.join(METHODS)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    items = items.reset_index(drop=True)
    display_boxes = item_boxes(dataset, items, display_size)
    shown = list(range(min(int(n_figure_items), len(items))))
    display = item_images(dataset, items.iloc[shown], display_size)
    result = Explanations(
        items=items, models=pd.DataFrame(), rows=pd.DataFrame(), display_size=int(display_size),
        images=uint8_images(display),
        boxes=[display_boxes[k] for k in shown],
        titles=[f"{items.at[k, 'image_id']}\n{items.at[k, 'class']}" for k in shown])
    model_rows, rows = [], []

    def score(key, method, kind, maps, keep, hit_defined=True):
        for j, k in enumerate(keep):
            found = localize(maps[j], display_boxes[k], items.at[k, "class"], threshold, tolerance)
            if not hit_defined:
                found["hit"] = np.nan
            rows.append(dict(model=key, method=method, kind=kind, image_id=items.at[k, "image_id"],
                             **{"class": items.at[k, "class"]}, seen_by=items.at[k, "seen_by"],
                             **found))

    for entry in trained:
        start = time.perf_counter()
        model, meta = load_model_from_checkpoint(entry.checkpoint)
        model.to(device).eval()
        config = meta["model_config"]
        size, in_chans = int(config["image_size"]), int(config["in_chans"])
        model_classes = list(meta["class_names"] or [])
        pairs, _, _ = match_classes(sorted(set(items["class"])), model_classes)
        index = {ours: model_classes.index(theirs) for ours, theirs in pairs}
        keep = [k for k in range(len(items)) if items.at[k, "class"] in index]
        target = cam_target(model, size)
        images = item_images(dataset, items.iloc[keep], size).expand(-1, in_chans, -1, -1)
        classes = [index[items.at[k, "class"]] for k in keep]
        ran = []
        for method in methods:
            if method == "scorecam" and not _matches(entry.key, score_cam_models):
                continue
            maps = _resized(class_maps(model, images, classes, method, target, batch_size,
                                       score_cam_batch_size), display_size)
            score(entry.key, CAM_LABELS[method], "CAM", maps, keep)
            result.maps.setdefault(CAM_LABELS[method], {})[entry.key] = _figure_maps(
                maps, keep, shown, display_size)
            ran.append(CAM_LABELS[method])
        if evidence and keep:
            own = own_evidence(model, images, classes, display_size)
            if own is not None:
                score(entry.key, own["label"], "own", own["maps"], keep,
                      hit_defined=own["kind"] != "mxa")
                own["maps"] = _figure_maps(own["maps"], keep, shown, display_size)
                if own["boxes"] is not None:
                    own["boxes"] = _figure_maps(own["boxes"], keep, shown, None)
                result.evidence[entry.key] = own
                ran.append(own["label"])
        model_rows.append({"model": entry.key, "notebook": entry.notebook, "tag": entry.tag,
                           "architecture": config["name"], "image size": size,
                           "checkpoint": entry.checkpoint.name, "target layer": target.description,
                           "items": len(keep), "items without a matching class": len(items) - len(keep),
                           "methods": ", ".join(ran), "seconds": round(time.perf_counter() - start, 2)})
        if log is not None:
            log(f"{entry.key}: {len(keep)} items, {', '.join(ran)} in {model_rows[-1]['seconds']} s")
        del model
    result.models = pd.DataFrame(model_rows)
    result.rows = pd.DataFrame(rows)
    return result


def _figure_maps(values: np.ndarray, keep: Sequence[int], shown: Sequence[int], size):
    """The figure items' entries of per-kept-item ``values``; NaN (or a blank map) where the
    model had no output for an item's class."""
    position = {k: j for j, k in enumerate(keep)}
    blank = np.zeros(values.shape[1:], dtype=np.float32) if size is not None else \
        np.full(values.shape[1:], np.nan)
    return np.stack([values[position[k]] if k in position else blank for k in shown]) \
        if shown else np.zeros((0, *values.shape[1:]), dtype=np.float32)


def evidence_panels(result: Explanations, kind: str, method: str = "Grad-CAM"
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """For the models whose own evidence is ``kind``: rows of maps (each model's ``method`` CAM
    and, except MXA, its own map) and MXA's predicted boxes, for
    :func:`cxrstudy.plots.maps_with_predicted_boxes`."""
    maps, predicted = {}, {}
    for key, own in result.evidence.items():
        if own["kind"] != kind:
            continue
        if key in result.maps.get(method, {}):
            maps[f"{key}\n{method}"] = result.maps[method][key]
        if own["boxes"] is not None:
            predicted[f"{key}: predicted ROI box"] = own["boxes"]
        else:
            maps[f"{key}\n{own['label']}"] = own["maps"]
    return maps, predicted


def items_sentence(items: pd.DataFrame, dataset, splits: Sequence[str], name: str | None = None
                   ) -> str:
    """How many boxes and images the localization numbers rest on, and from which splits."""
    boxed = items[items["boxes"] > 0]
    all_boxes = int(dataset.boxes["image_id"].astype(str).isin(
        dataset.records["image_id"].astype(str)).sum()) if len(dataset.boxes) else 0
    text = (f"The localization numbers rest on {int(boxed['boxes'].sum())} boxes on "
            f"{boxed['image_id'].nunique()} images ({len(boxed)} image–class items) of the "
            f"{all_boxes} boxes among the {len(dataset)} images of {name or dataset.name}: "
            f"images every source notebook put in its {'/'.join(splits)} split or never loaded.")
    seen = boxed[boxed["seen_by"] != ""]
    if len(seen):
        text += (f" {seen['image_id'].nunique()} of these images were seen in training or "
                 f"validation (by {', '.join(sorted(set(', '.join(seen['seen_by']).split(', '))))}): "
                 f"their maps may be fitted, not generalised.")
    if boxed.empty:
        text += " Without boxes there is nothing to score: the figures show maps only."
    return text


def localization_metrics(result: Explanations, table: pd.DataFrame) -> dict:
    """What ``metrics.json`` records: the models, methods, counts and the per (model, method,
    class) numbers of :func:`~cxrstudy.explain.localization.summarize`."""
    boxed = result.items[result.items["boxes"] > 0]
    return {"models_explained": list(result.models["model"]) if len(result.models) else [],
            "methods": sorted(set(result.rows["method"])) if len(result.rows) else [],
            "n_boxes": int(boxed["boxes"].sum()), "n_boxed_images": int(boxed["image_id"].nunique()),
            "n_items": int(len(result.items)),
            "n_boxed_images_seen_in_training": int(boxed.loc[boxed["seen_by"] != "", "image_id"].nunique()),
            "display_size": result.display_size,
            "localization": table.to_dict(orient="records")}



def _evidence_label(result: Explanations, kind: str) -> str:
    return next((own["label"] for own in result.evidence.values() if own["kind"] == kind), kind)


def save_figures(out: Outputs, result: Explanations, methods: Sequence[str]) -> list[str]:
    """Save one figure per CAM method (every model on the same images, true boxes in red) and
    one per kind of own evidence (Grad-CAM beside it); returns the figure names written."""
    from .. import plots

    written = []
    for method in methods:
        label = CAM_LABELS[method]
        if label in result.maps:
            name = "cams_" + method.replace("+", "p")
            out.save_figure(plots.map_overlays(result.images, result.maps[label], result.titles,
                                               boxes=result.boxes),
                            name, caption=f"{label} of every model on the same images, annotated boxes drawn")
            written.append(name)
    for kind in sorted({own["kind"] for own in result.evidence.values()}):
        maps, predicted = evidence_panels(result, kind)
        out.save_figure(plots.maps_with_predicted_boxes(result.images, maps, result.titles,
                                                        result.boxes, predicted),
                        f"evidence_{kind}", caption=f"Grad-CAM beside the models' own evidence "
                        f"({_evidence_label(result, kind)}) on the same images, annotated boxes drawn")
        written.append(f"evidence_{kind}")
    return written


__all__ = ["Explanations", "explain_models", "evidence_panels", "items_sentence",
           "localization_metrics", "save_figures"]
