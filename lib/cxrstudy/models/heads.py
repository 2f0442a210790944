"""The class head of a timm classifier, and a model that adds a second head beside it.

Two of the study's models put one more head on a backbone's pooled features: DeiT-style
distillation (:mod:`cxrstudy.models.distill`) and MLCAK's global task
(:mod:`cxrstudy.methods.mlcak.model`). Both need to find the class head (:func:`class_head_name`),
copy its structure with fresh weights (:func:`fresh_copy`) and read the pooled features; that is
written once here.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

# Modules that may sit between the pooled features and the classifier inside one head module
# (EfficientViT's NormLinear: BatchNorm1d → Dropout → Linear).
_HEAD_PARTS = (nn.BatchNorm1d, nn.LayerNorm, nn.Dropout, nn.Identity, nn.Flatten)


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


def fresh_copy(head: nn.Module) -> nn.Module:
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


class SecondHeadModel(nn.Module):
    """A timm classifier (``backbone``) and a second head on the same pooled features: what
    DeiT's distillation head (:mod:`cxrstudy.models.distill`) and MLCAK's global head
    (:mod:`cxrstudy.methods.mlcak.model`) share. Subclasses register their head after
    ``super().__init__``, so ``backbone.*`` comes first in the parameters and state dict."""

    #: the attribute (and state-dict prefix) of the second head, and what it is (for the error
    #: when a wrapped model is wrapped again); a subclass names both in its class statement:
    #: ``class DistilledClassifier(SecondHeadModel, attribute="head_dist", kind="a distillation head")``
    second_head_name = "head_second"
    head_kind = "a second head"

    def __init_subclass__(cls, *, attribute: str, kind: str, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.second_head_name, cls.head_kind = attribute, kind

    def __init__(self, backbone: nn.Module):
        if isinstance(backbone, type(self)):
            raise ValueError(f"the model already has {self.head_kind}")
        super().__init__()
        self.head_name = class_head_name(backbone)
        self.backbone = backbone
        setattr(self, self.second_head_name, self.new_head(backbone.get_submodule(self.head_name)))
        self.num_classes, self.num_features = self.sizes(backbone)
        self.cxr_config = self.wrapped_config(getattr(backbone, "cxr_config", None))

    def new_head(self, class_head: nn.Module) -> nn.Module:
        """The second head, built from the class head (its structure, fresh weights)."""
        raise NotImplementedError

    def sizes(self, backbone: nn.Module) -> tuple[int | None, int | None]:
        """``(num_classes, num_features)`` of the wrapped model."""
        raise NotImplementedError

    def wrapped_config(self, config: dict | None) -> dict:
        """The ``cxr_config`` that rebuilds the wrapped model through ``create_model``."""
        raise NotImplementedError

    @property
    def head(self) -> nn.Module:
        """The class head (the backbone's own classifier, a submodule of it)."""
        return self.backbone.get_submodule(self.head_name)

    def get_classifier(self) -> nn.Module:
        return self.backbone.get_classifier()

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, num_features]: what both heads read."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def no_weight_decay(self) -> set[str]:
        """The backbone's exemptions (position embeddings, attention biases), renamed."""
        own = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else ()
        return {f"backbone.{name}" for name in own}


__all__ = ["class_head_name", "fresh_copy", "SecondHeadModel"]
