"""Each method's own evidence of where it looks, beside the CAMs.

* MXA — the ROI box the last MXA block predicts (:func:`cxrstudy.models.mxa.roi_boxes`);
  scored as the box's indicator map (IoU, coverage; a box has no peak, so no pointing game);
* GLoRI — the attention of the explained class's query over the patches;
* ViTs (MLCAK's students and teacher, the GLoRI backbones fine-tuned) — the head-averaged
  attention of the CLS token in the last block
  (:func:`cxrstudy.studies.low_resolution.cls_attention`), class-agnostic;
* CAN — the mean of the two networks' cross-attention maps, class-agnostic.

Every map comes back at ``size`` px (bilinear), min–max scaled to [0, 1] per image.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _scaled(maps: torch.Tensor, size: int) -> np.ndarray:
    maps = maps.float()[:, None]
    maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    low = maps.flatten(1).min(dim=1).values[:, None, None]
    high = maps.flatten(1).max(dim=1).values[:, None, None]
    return ((maps - low) / (high - low).clamp_min(1e-12)).numpy()


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
    from ..models.can import CrossAttentionNetwork
    from ..models.glori import GLoRI
    from ..models.mxa import mxa_blocks

    inner = getattr(model, "backbone", model)
    if isinstance(model, GLoRI):
        return "glori"
    if isinstance(model, CrossAttentionNetwork):
        return "can"
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
        from ..models.mxa import roi_boxes

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
        from ..studies.low_resolution import cls_attention

        result["maps"] = _scaled(torch.from_numpy(cls_attention(model, images)), size)
    return result


__all__ = ["box_maps", "evidence_kind", "own_evidence", "LABELS"]
