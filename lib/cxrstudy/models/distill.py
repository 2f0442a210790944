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

# Modules that may sit between the pooled features and the classifier inside one head module
# (EfficientViT's NormLinear: BatchNorm1d → Dropout → Linear).
_HEAD_PARTS = (nn.BatchNorm1d, nn.LayerNorm, nn.Dropout, nn.Identity, nn.Flatten)


class DistilledOutput(NamedTuple):
    """Training-mode output of a distilled model: class-head and distillation-head logits [B, C]."""

    cls: torch.Tensor
    dist: torch.Tensor


def _qualified_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(model).__name__}.get_classifier() returned a module that is not "
                     f"one of the model's own submodules")


def class_head_name(model: nn.Module) -> str:
    """Name of the module that maps the pooled features to the class logits.

    Usually ``get_classifier()`` itself (resnet ``fc``, densenet ``classifier``, ViT ``head``).
    When the classifier is the last part of a Sequential that only normalises or drops out
    before it (EfficientViT's ``head`` = BatchNorm1d + Dropout + ``head.linear``), the whole
    Sequential is the head: ``forward_head(pre_logits=True)`` stops before the BatchNorm.
    """
    for method in ("forward_features", "forward_head", "get_classifier"):
        if not callable(getattr(model, method, None)):
            raise TypeError(f"{type(model).__name__} has no {method}(); a distillation head "
                            f"needs a timm-style classifier (forward_features, "
                            f"forward_head(x, pre_logits=True), get_classifier)")
    classifier = model.get_classifier()
    if not isinstance(classifier, nn.Module) or isinstance(classifier, nn.Identity):
        raise ValueError(f"{type(model).__name__} has no classifier (num_classes=0?); build it "
                         f"with the number of classes before adding a distillation head")
    name = _qualified_name(model, classifier)
    if "." in name:
        parent_name = name.rsplit(".", 1)[0]
        parent = model.get_submodule(parent_name)
        children = list(parent.children())
        if (isinstance(parent, nn.Sequential) and children and children[-1] is classifier
                and all(isinstance(c, _HEAD_PARTS) for c in children[:-1])):
            return parent_name
    return name


def _fresh_copy(head: nn.Module) -> nn.Module:
    """Same structure, new weights: Linear as in DeiT (truncated normal, std 0.02, zero bias),
    norms reset to identity statistics."""
    new = copy.deepcopy(head)
    for module in new.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.reset_parameters()
        elif module is not new and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return new


def _output_width(head: nn.Module) -> int:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"the class head {type(head).__name__} has no Linear layer")
    return linears[-1].out_features


class DistilledClassifier(nn.Module):
    """``backbone`` plus a distillation head on its pooled features (see module docstring).

    State-dict keys: ``backbone.*`` (the original model's) and ``head_dist.*``.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        if isinstance(backbone, DistilledClassifier):
            raise ValueError("the model already has a distillation head")
        self.head_name = class_head_name(backbone)
        self.backbone = backbone
        self.head_dist = _fresh_copy(backbone.get_submodule(self.head_name))
        self.num_classes = _output_width(self.head_dist)
        self.num_features = getattr(backbone.get_classifier(), "in_features", None)
        config = copy.deepcopy(dict(getattr(backbone, "cxr_config", {}) or {}))
        config["kwargs"] = dict(config.get("kwargs") or {}, distilled=True)
        config["distilled"] = True
        self.cxr_config = config

    @property
    def head(self) -> nn.Module:
        """The class head (a submodule of the backbone)."""
        return self.backbone.get_submodule(self.head_name)

    def get_classifier(self) -> nn.Module:
        return self.backbone.get_classifier()

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, num_features]: what both heads read."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward_heads(self, x: torch.Tensor) -> DistilledOutput:
        """Both heads' logits whatever the mode."""
        features = self.pooled_features(x)
        return DistilledOutput(self.head(features), self.head_dist(features))

    def forward(self, x: torch.Tensor):
        out = self.forward_heads(x)
        if self.training:
            return out
        return (out.cls + out.dist) / 2

    def no_weight_decay(self) -> set[str]:
        """The backbone's exemptions (position embeddings, attention biases), renamed."""
        own = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else ()
        return {f"backbone.{name}" for name in own}


def add_distillation_head(model: nn.Module) -> DistilledClassifier:
    """Wrap a timm classifier with a DeiT-style distillation head (see module docstring)."""
    return DistilledClassifier(model)


def is_distilled(model: nn.Module) -> bool:
    return isinstance(getattr(model, "module", model), DistilledClassifier)


__all__ = ["DistilledOutput", "DistilledClassifier", "add_distillation_head", "class_head_name",
           "is_distilled"]
