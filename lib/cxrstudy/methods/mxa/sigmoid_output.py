"""A classifier whose ``forward`` ends in a sigmoid: the MXA authors' baseline, bug included.

Why it exists: the public code of the MXA study (Rand & Ibrahim, arXiv 2504.02277) builds its
multi-label EfficientViT with ``torch.sigmoid`` at the end of ``forward`` whenever the output is a
single tensor, and trains it with ``BCEWithLogitsLoss``, which applies its own sigmoid. The loss
therefore sees ``s = σ(z)`` as if it were a logit:

    ℓ(z, y) = −y log σ(σ(z)) − (1 − y) log(1 − σ(σ(z))),     σ(z) ∈ (0, 1),

so the probability the loss scores lives in (σ(0), σ(1)) = (0.5, 0.731) and can never reach a
label. Per known (image, class) entry the loss is bounded below by

    positive:  −log σ(1)       = log(1 + e⁻¹) ≈ 0.3133   (approached as z → +∞)
    negative:  −log(1 − σ(0))  = log 2        ≈ 0.6931   (approached as z → −∞)

and its gradient vanishes as z saturates. The authors' logged training loss sits just above this
floor (≈ 0.687) and most classes end with constant test scores (AUC exactly 0.5): the paper's
0.66 baseline. :class:`SigmoidOutput` reproduces that model on purpose so the study can show it;
nothing else should use it.

A tuple of heads (a distilled model in training mode) passes through untouched, as in the
authors' code: their KD students were trained on logits and did not suffer the bug.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from ...models.registry import register_model

GENERIC_NAME = "sigmoid_output"

#: Smallest BCE-with-logits loss of a positive label when the "logit" is a probability s ∈ (0, 1).
POSITIVE_FLOOR = math.log1p(math.exp(-1.0))  # −log σ(1)
#: Smallest loss of a negative label under the same double sigmoid.
NEGATIVE_FLOOR = math.log(2.0)  # −log(1 − σ(0))


class SigmoidOutput(nn.Module):
    """``backbone`` with ``torch.sigmoid`` applied to its tensor output (module docstring).

    State-dict keys: ``backbone.*``. ``cxr_config`` names ``sigmoid_output`` with the backbone's
    registry name in ``kwargs["backbone"]``, so a checkpoint rebuilds the same wrapper.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        if isinstance(backbone, SigmoidOutput):
            raise ValueError("the model already ends in a sigmoid")
        self.backbone = backbone
        config = copy.deepcopy(dict(getattr(backbone, "cxr_config", {}) or {}))
        if config.get("name"):
            config["kwargs"] = dict(backbone=config["name"], **dict(config.get("kwargs") or {}))
            config["name"] = GENERIC_NAME
        self.cxr_config = config

    def get_classifier(self) -> nn.Module:
        return self.backbone.get_classifier()

    def forward(self, x: torch.Tensor):
        out = self.backbone(x)
        return torch.sigmoid(out) if isinstance(out, torch.Tensor) else out

    def no_weight_decay(self) -> set[str]:
        own = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else ()
        return {f"backbone.{name}" for name in own}


def double_sigmoid_loss_floor(targets, mask=None) -> float:
    """The lowest mean BCE-with-logits a :class:`SigmoidOutput` model can reach on ``targets``.

    The mean over known entries of ``POSITIVE_FLOOR`` (label 1) and ``NEGATIVE_FLOOR`` (label 0);
    soft labels y ∈ [0, 1] get the floor of their own cross-entropy, min over s ∈ [0, 1].
    It is the floor of an epoch's training loss whenever every label is known (the loss is then
    a mean over all entries of the epoch, whatever the batching).
    """
    y = np.asarray(targets, dtype=np.float64)
    known = np.ones_like(y, dtype=bool) if mask is None else np.asarray(mask) > 0
    if not known.any():
        raise ValueError("no known label: the loss floor is undefined")
    y = y[known]
    # ℓ(s) = −y log σ(s) − (1 − y) log σ(−s) is convex in s with its minimum at σ(s) = y, so on
    # s ∈ [0, 1] it is lowest at s = clip(logit(y), 0, 1).
    s = np.clip(np.log(np.clip(y, 1e-12, 1)) - np.log(np.clip(1 - y, 1e-12, 1)), 0.0, 1.0)
    floor = y * np.logaddexp(0.0, -s) + (1 - y) * np.logaddexp(0.0, s)
    return float(floor.mean())


@register_model(GENERIC_NAME)
def build_sigmoid_output(num_classes, in_chans, image_size, pretrained=False, *, backbone: str,
                         **kwargs) -> SigmoidOutput:
    """``backbone`` (any name :func:`~cxrstudy.models.create_model` knows) ending in a sigmoid."""
    from ...models.factory import create_model

    if backbone == GENERIC_NAME:
        raise ValueError("the backbone of sigmoid_output cannot be sigmoid_output")
    inner = create_model(backbone, num_classes, in_chans=in_chans, image_size=image_size,
                         pretrained=pretrained, **kwargs)
    return SigmoidOutput(inner)


__all__ = ["SigmoidOutput", "build_sigmoid_output", "double_sigmoid_loss_floor",
           "POSITIVE_FLOOR", "NEGATIVE_FLOOR"]
