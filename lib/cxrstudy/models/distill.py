"""A DeiT-style distillation head for any timm classifier.

DeiT (Touvron et al., ICML 2021) trains a student with two classifiers: the class head learns
the labels, the distillation head learns the teacher's predictions. Models without a
distillation token (LeViT, EfficientViT, CNNs) put both heads on the same pooled features, as
timm's ``LevitDistilled`` does and as the MXA study (Rand & Ibrahim, arXiv 2504.02277) does
with EfficientViT:

    f      = pool(backbone(x))            (timm: forward_head(forward_features(x), pre_logits=True))
    z_cls  = head(f),  z_dist = head_dist(f)
    train:  (z_cls, z_dist)               → :class:`DistilledOutput`, one loss term per head
    eval:   (z_cls + z_dist) / 2          → "inference averages the two heads"

``head_dist`` has the class head's structure (for EfficientViT the BatchNorm + Linear
``NormLinear``, elsewhere the Linear classifier) with fresh weights, so the two heads start
apart. The wrapped model keeps ``cxr_config`` with ``distilled: True`` (also in its ``kwargs``)
so a checkpoint rebuilds it through ``create_model(..., distilled=True)``.
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from .heads import SecondHeadModel, class_head_name, fresh_copy

class DistilledOutput(NamedTuple):
    """Training-mode output of a distilled model: class-head and distillation-head logits [B, C]."""

    cls: torch.Tensor
    dist: torch.Tensor


def _output_width(head: nn.Module) -> int:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"the class head {type(head).__name__} has no Linear layer")
    return linears[-1].out_features


class DistilledClassifier(SecondHeadModel, attribute="head_dist", kind="a distillation head"):
    """``backbone`` plus a distillation head on its pooled features (see module docstring).

    State-dict keys: ``backbone.*`` (the original model's) and ``head_dist.*``.
    """

    new_head = staticmethod(fresh_copy)

    def sizes(self, backbone: nn.Module) -> tuple[int | None, int | None]:
        return _output_width(self.head_dist), getattr(backbone.get_classifier(), "in_features", None)

    def wrapped_config(self, config: dict | None) -> dict:
        """The backbone's config with ``distilled: True`` (also in its ``kwargs``)."""
        config = copy.deepcopy(dict(config or {}))
        config["kwargs"] = dict(config.get("kwargs") or {}, distilled=True)
        config["distilled"] = True
        return config

    def forward_heads(self, x: torch.Tensor) -> DistilledOutput:
        """Both heads' logits whatever the mode."""
        features = self.pooled_features(x)
        return DistilledOutput(self.head(features), self.head_dist(features))

    def forward(self, x: torch.Tensor):
        out = self.forward_heads(x)
        if self.training:
            return out
        return (out.cls + out.dist) / 2


def add_distillation_head(model: nn.Module) -> DistilledClassifier:
    """Wrap a timm classifier with a DeiT-style distillation head (see module docstring)."""
    return DistilledClassifier(model)


def is_distilled(model: nn.Module) -> bool:
    return isinstance(getattr(model, "module", model), DistilledClassifier)


__all__ = ["DistilledOutput", "DistilledClassifier", "add_distillation_head", "class_head_name",
           "is_distilled"]
