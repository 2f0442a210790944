"""Two tasks on one backbone (MLCAK, arXiv 2405.13370): local findings and a global
normal-vs-abnormal logit.

    f        = pool(backbone(x))        (timm: forward_head(forward_features(x), pre_logits=True))
    z_local  = head(f)          [B, C]  the backbone's own classifier: the dataset's findings
    z_global = head_global(f)   [B]     one logit: abnormal vs normal (the release's own
                                        "No finding" where it has one, else "any finding";
                                        :func:`cxrstudy.methods.mlcak.training.dataset_global_labels`)
    train:  MultiTaskOutput(z_local, z_global)
    eval:   z_local                     so validation, predict and evaluation see [B, C] logits

``head_global`` has the class head's structure (for ViTs one Linear; EfficientViT's
BatchNorm + Linear) with one output and fresh weights. In training mode ``forward`` returns both
tasks, so the shared :class:`~cxrstudy.train.Trainer` refuses the model (its step needs logits)
instead of silently training the local task alone; :class:`~cxrstudy.methods.mlcak.training.MLCAKTrainer`
trains both.

Building it by name. ``create_model("deit_small_mt", 14, image_size=112, patch_size=8)`` (also
``deit_tiny_mt``, ``vit_small_mt``) or, for any other registered/timm backbone,
``create_model("multitask", 14, backbone="resnet18")``. These are registered model names, so
the checkpoint's ``cxr_config`` rebuilds the wrapper without any factory change.
:func:`add_global_head` wraps an already built model and rewrites its ``cxr_config`` to the
``"multitask"`` form. A weight file that fits the backbone alone (e.g. a single-task run of
ours, or ImageNet weights through ``pretrained=``) initialises the backbone; the global head
starts fresh.
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from ...models.heads import SecondHeadModel, fresh_copy
from ...models.registry import register_model

MULTITASK_VITS = ("deit_tiny", "deit_small", "vit_small")
GENERIC_NAME = "multitask"
SUFFIX = "_mt"


class MultiTaskOutput(NamedTuple):
    """Training-mode output: local (findings) logits [B, C] and global (abnormal) logits [B]."""

    local: torch.Tensor
    global_: torch.Tensor


def _one_logit_head(head: nn.Module) -> nn.Module:
    """``head`` with fresh weights and its last Linear narrowed to one output."""
    new = fresh_copy(head)
    if isinstance(new, nn.Linear):
        return _narrow(new)
    parent = new
    while isinstance(parent, nn.Sequential) and isinstance(parent[-1], nn.Sequential):
        parent = parent[-1]
    if isinstance(parent, nn.Sequential) and isinstance(parent[-1], nn.Linear):
        parent[-1] = _narrow(parent[-1])
        return new
    raise ValueError(f"cannot derive a one-logit head from {type(head).__name__}: expected a "
                     f"Linear or a Sequential ending in one")


def _narrow(linear: nn.Linear) -> nn.Linear:
    out = nn.Linear(linear.in_features, 1, bias=linear.bias is not None)
    nn.init.trunc_normal_(out.weight, std=0.02)
    if out.bias is not None:
        nn.init.zeros_(out.bias)
    return out


class MultiTaskClassifier(SecondHeadModel, attribute="head_global", kind="a global head"):
    """``backbone`` plus a global (normal vs abnormal) head on its pooled features.

    State-dict keys: ``backbone.*`` (the original model's) and ``head_global.*``.
    """

    new_head = staticmethod(_one_logit_head)

    def sizes(self, backbone: nn.Module) -> tuple[int | None, int | None]:
        return getattr(backbone, "num_classes", None), getattr(backbone, "num_features", None)

    def wrapped_config(self, config: dict | None) -> dict:
        return multitask_config(config)

    def forward_tasks(self, x: torch.Tensor) -> MultiTaskOutput:
        """Both tasks' logits whatever the mode."""
        features = self.pooled_features(x)
        return MultiTaskOutput(self.head(features), self.head_global(features).squeeze(-1))

    def forward(self, x: torch.Tensor):
        out = self.forward_tasks(x)
        return out if self.training else out.local


def multitask_config(config: dict | None) -> dict:
    """The ``cxr_config`` that rebuilds a wrapped model: name ``"multitask"`` with the
    backbone's name in ``kwargs["backbone"]`` (an ``*_mt`` name is kept as it is)."""
    config = copy.deepcopy(dict(config or {}))
    name = config.get("name")
    if not name or name == GENERIC_NAME or str(name).endswith(SUFFIX):
        return config
    config["kwargs"] = dict(backbone=name, **dict(config.get("kwargs") or {}))
    config["name"] = GENERIC_NAME
    return config


def add_global_head(model: nn.Module) -> MultiTaskClassifier:
    """Wrap a timm classifier with a normal-vs-abnormal head (module docstring)."""
    return MultiTaskClassifier(model)


def is_multitask(model: nn.Module) -> bool:
    return isinstance(getattr(model, "module", model), MultiTaskClassifier)


# ---- registered names ---------------------------------------------------------------------------
@register_model(GENERIC_NAME)
def build_multitask(num_classes, in_chans, image_size, pretrained=False, *,
                    backbone: str, **kwargs) -> MultiTaskClassifier:
    """``backbone`` (any name :func:`~cxrstudy.models.create_model` knows) with a global head."""
    from ...models.factory import create_model

    if str(backbone).endswith(SUFFIX) or backbone == GENERIC_NAME:
        raise ValueError(f"backbone {backbone!r} already has a global head")
    inner = create_model(backbone, num_classes, in_chans=in_chans, image_size=image_size,
                         pretrained=pretrained, **kwargs)
    return MultiTaskClassifier(inner)


def _vit_builder(base: str):
    def build(num_classes, in_chans, image_size, pretrained=False, **kwargs):
        return build_multitask(num_classes, in_chans, image_size, pretrained, backbone=base,
                               **kwargs)
    build.__name__ = base + SUFFIX
    build.__doc__ = f"{base} with a global (normal vs abnormal) head."
    return build


for _base in MULTITASK_VITS:
    register_model(_base + SUFFIX)(_vit_builder(_base))


__all__ = ["MultiTaskOutput", "MultiTaskClassifier", "add_global_head", "is_multitask",
           "multitask_config", "build_multitask", "MULTITASK_VITS"]
