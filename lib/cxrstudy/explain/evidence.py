"""Each method's own evidence of where it looks, beside the CAMs.

* MXA — the ROI box the last MXA block predicts (:func:`cxrstudy.methods.mxa.model.roi_boxes`);
  scored as the box's indicator map (IoU, coverage; a box has no peak, so no pointing game);
* GLoRI — the attention of the explained class's query over the patches;
* ViTs (MLCAK's students and teacher, the GLoRI backbones fine-tuned) — the head-averaged
  attention of the CLS token in the last block
  (:func:`cxrstudy.models.attention_maps.cls_attention`), class-agnostic;
* CAN — the mean of the two networks' cross-attention maps, class-agnostic.

Every map comes back at ``size`` px (bilinear), min–max scaled to [0, 1] per image.
:func:`disease_maps` (GLoRI, notebook 05) and :func:`cross_attention_maps` (CAN, 06) give the
same evidence with the images, titles and boxes a figure needs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.attention_maps import cls_attention, minmax_per_image


def _scaled(maps: torch.Tensor, size: int) -> np.ndarray:
    maps = maps.float()[:, None]
    maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return minmax_per_image(maps).numpy()


def uint8_images(batch: torch.Tensor) -> list[np.ndarray]:
    """Images [N, 1, H, W] in [0, 1] as uint8 arrays, for drawing."""
    return [(batch[k, 0].cpu().numpy() * 255).astype(np.uint8) for k in range(len(batch))]


def box_maps(boxes: np.ndarray, size: int) -> np.ndarray:
    """Normalised boxes [N, 4] (x1, y1, x2, y2) as indicator maps [N, size, size]."""
    centres = (np.arange(size) + 0.5) / size
    out = np.zeros((len(boxes), size, size), dtype=np.float32)
    for k, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, dtype=float)):
        rows = (centres >= y1) & (centres <= y2)
        cols = (centres >= x1) & (centres <= x2)
        out[k] = rows[:, None] & cols[None, :]
    return out


def evidence_kind(model: nn.Module) -> str | None:
    """"mxa", "glori", "can", "cls" (a timm ViT inside) or None."""
    from ..methods.can.model import CrossAttentionNetwork
    from ..methods.glori.model import GLoRI
    from ..methods.mxa.model import mxa_blocks

    inner = getattr(model, "backbone", model)
    if isinstance(model, GLoRI):
        return "glori"
    if isinstance(model, CrossAttentionNetwork):  # with its attention off it has no map to show
        return "can" if model.cross_attention else None
    if mxa_blocks(inner):
        return "mxa"
    try:
        from ..models.attention_maps import attention_modules, token_layout

        token_layout(model)
        attention_modules(model)
        return "cls"
    except TypeError:
        return None


LABELS = {"mxa": "MXA ROI box", "glori": "GLoRI attention", "can": "CAN cross-attention",
          "cls": "CLS attention"}


@torch.no_grad()
def own_evidence(model: nn.Module, images: torch.Tensor, classes: Sequence[int], size: int
                 ) -> dict | None:
    """``{"kind", "label", "maps" [N, size, size], "boxes" (MXA: [N, 4] normalised)}`` for
    the model's own evidence, or None when it has none."""
    kind = evidence_kind(model)
    if kind is None:
        return None
    model.eval()
    device = next(model.parameters()).device
    images = images.to(device)
    result = {"kind": kind, "label": LABELS[kind], "boxes": None}
    if kind == "mxa":
        from ..methods.mxa.model import roi_boxes

        last = list(roi_boxes(model, images).values())[-1]
        result.update(maps=box_maps(last, size), boxes=last)
    elif kind == "glori":
        model(images)
        maps = model.attention_maps().cpu()  # [N, C, h, w]
        result["maps"] = _scaled(maps[torch.arange(len(images)), torch.as_tensor(classes)], size)
    elif kind == "can":
        model(images)
        result["maps"] = _scaled(model.attention_maps().cpu().mean(dim=1), size)
    else:
        result["maps"] = _scaled(torch.from_numpy(cls_attention(model, images)), size)
    return result


@torch.no_grad()
def disease_maps(model: nn.Module, dataset, rows: Sequence[int]) -> dict:
    """GLoRI's attention map for one class per image: the class of the image's first box when
    it has one, else its highest-scoring class. Returns images (uint8), maps [N, h, w] in
    [0, 1], titles and boxes (that class's boxes only)."""
    model.eval()
    device = next(model.parameters()).device
    batch = torch.stack([dataset[i]["image"] for i in rows])
    probs = torch.sigmoid(model(batch.to(device))).cpu()
    maps = model.attention_maps().float().cpu()  # [N, C, h, w]
    classes = list(dataset.classes)
    chosen, boxes, titles = [], [], []
    for k, i in enumerate(rows):
        own = dataset.meta(i)["boxes"]
        labelled = [b for b in own if b["label"] in classes]
        c = classes.index(labelled[0]["label"]) if labelled else int(probs[k].argmax())
        chosen.append(c)
        boxes.append([b for b in own if b["label"] == classes[c]])
        titles.append(f"{classes[c]} (p={probs[k, c]:.2f})")
    picked = minmax_per_image(maps[torch.arange(len(rows)), torch.tensor(chosen)])
    return {"images": uint8_images(batch), "maps": picked.numpy(), "titles": titles,
            "boxes": boxes}


@torch.no_grad()
def cross_attention_maps(model: nn.Module, dataset, rows: Sequence[int]) -> dict:
    """Each network's attention a₁, a₂ on the given test rows: images (uint8), maps per network
    [N, h, w] in [0, 1] (not rescaled: the sigmoid's own scale), titles and boxes."""
    model.eval()
    device = next(model.parameters()).device
    batch = torch.stack([dataset[i]["image"] for i in rows])
    model(batch.to(device))
    maps = model.attention_maps().float().cpu().numpy()  # [N, 2, h, w]
    return {"images": uint8_images(batch),
            "maps": {"network 1 attention": maps[:, 0], "network 2 attention": maps[:, 1]},
            "titles": [dataset.meta(i)["image_id"] for i in rows],
            "boxes": [dataset.meta(i)["boxes"] for i in rows]}


__all__ = ["box_maps", "evidence_kind", "own_evidence", "LABELS", "uint8_images", "disease_maps",
           "cross_attention_maps"]
