"""Which layer a class activation map reads, for every architecture the study builds.

One registry, keyed by module type, so no notebook guesses layers. A CAM needs a layer whose
output is a spatial map [B, C, h, w] that the logits still depend on position by position:

* CNNs — the last stage (ResNet ``layer4[-1]``, DenseNet ``features.norm5``);
* EfficientViT-M (with or without MXA) — the last stage, ``stages[-1]``;
* …unless that stage's map is a single position at the model's image size (EfficientViT's last
  stage is 1×1 at 64 px, ResNet's at 32 px): a 1×1 map min–max scales to zeros, so the deepest
  earlier stage with at least 2×2 positions is taken (found by one forward at that size);
* ViT / DeiT — ``blocks[-1].norm1``: the input of the last attention. The last block's *output*
  is no use: the head reads only the CLS token there, so every patch token's gradient is zero.
  Tokens [B, T, D] become [B, D, h, w] by :class:`TokenReshape`, dropping the prefix tokens
  (CLS, registers, distillation) that :func:`~cxrstudy.models.attention_maps.token_layout` counts;
* wrappers (distillation head, two-task head, linear probe) — their backbone's layer;
* GLoRI — ``input_proj``: the projected tokens M the class queries attend over (all ``n_blocks``
  mixed, and the last layer before the class-specific decoder);
* CAN — both networks' last layers; grad-cam averages the two maps (each min–max scaled);
  the same for its control without attention, the two-network logit ensemble;

Every model must also return B×K logits and let gradients reach that layer:
:class:`LogitsModel` sees to both (see there).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..models.attention_maps import token_layout


@dataclass
class CAMTarget:
    """The layers grad-cam hooks, how their outputs become maps, and a line saying which."""

    layers: list[nn.Module]
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None
    description: str


class TokenReshape:
    """[B, prefix + h·w, D] tokens → [B, D, h, w]; with ``grid=None`` the grid is square."""

    def __init__(self, prefix: int, grid: tuple[int, int] | None = None):
        self.prefix = int(prefix)
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3:
            raise ValueError(f"expected tokens [B, T, D], got {tuple(tokens.shape)}")
        patches = tokens[:, self.prefix:]
        grid = self.grid
        if grid is None:
            side = math.isqrt(patches.shape[1])
            if side * side != patches.shape[1]:
                raise ValueError(f"{patches.shape[1]} patch tokens do not form a square grid")
            grid = (side, side)
        if grid[0] * grid[1] != patches.shape[1]:
            raise ValueError(f"{patches.shape[1]} patch tokens after {self.prefix} prefix tokens "
                             f"do not fill a {grid[0]}×{grid[1]} grid")
        return patches.reshape(patches.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)

    def __repr__(self) -> str:
        return f"TokenReshape(prefix={self.prefix}, grid={self.grid})"


# ---- the registry -------------------------------------------------------------------------------
_RULES: list[tuple[type, Callable[[nn.Module], CAMTarget]]] = []


def register_target(module_type: type):
    """Register ``rule(model, image_size) -> CAMTarget`` for ``module_type`` (subclasses
    included; ``image_size`` may be None)."""
    def decorate(rule):
        _RULES.insert(0, (module_type, rule))  # later, more specific rules win
        return rule
    return decorate


def model_label(model: nn.Module) -> str:
    name = (getattr(model, "cxr_config", None) or {}).get("name")
    return f"{name!r} ({type(model).__name__})" if name else type(model).__name__


def cam_target(model: nn.Module, image_size: int | None = None) -> CAMTarget:
    """The CAM target of ``model`` (DDP's ``.module`` looked through) for inputs of
    ``image_size`` (default: the size in ``model.cxr_config``); a clear error otherwise."""
    model = getattr(model, "module", model)
    if image_size is None:
        image_size = (getattr(model, "cxr_config", None) or {}).get("image_size")
    for module_type, rule in _RULES:
        if isinstance(model, module_type):
            return rule(model, image_size)
    known = ", ".join(sorted({t.__name__ for t, _ in _RULES}))
    raise TypeError(f"no CAM target layer is registered for model {model_label(model)}; "
                    f"known architectures: {known} (add one with "
                    f"cxrstudy.explain.target_layers.register_target)")


@torch.no_grad()
def deepest_spatial(model: nn.Module, candidates: list[tuple[nn.Module, str]],
                    image_size: int | None, min_side: int = 2) -> tuple[nn.Module, str]:
    """The first of ``candidates`` (deepest first) whose output has at least ``min_side`` ×
    ``min_side`` positions for ``image_size`` inputs (one forward of zeros); the deepest when
    the size is unknown or none has."""
    if image_size is None or len(candidates) == 1:
        return candidates[0]
    sides: dict[int, int] = {}

    def record(k):
        def hook(module, args, output):  # returns None: the output is left alone
            sides.setdefault(k, min(output.shape[-2:]))
        return hook

    hooks = [layer.register_forward_hook(record(k)) for k, (layer, _) in enumerate(candidates)]
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    was_training = model.training
    try:
        model.eval()
        parameter = next(model.parameters())
        model.forward_features(torch.zeros(1, conv.in_channels, int(image_size), int(image_size),
                                           device=parameter.device, dtype=parameter.dtype))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    for k, candidate in enumerate(candidates):
        if sides.get(k, 0) >= min_side:
            return candidate
    return candidates[0]


def _timm_types():
    from timm.models.densenet import DenseNet
    from timm.models.efficientvit_msra import EfficientVitMsra
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer

    return ResNet, DenseNet, EfficientVitMsra, VisionTransformer


def _register_defaults() -> None:
    from ..methods.can.model import CrossAttentionNetwork, LogitEnsemble
    from ..models.distill import DistilledClassifier
    from ..methods.glori.model import GLoRI, LinearProbe, is_token_vit
    from ..methods.mlcak.model import MultiTaskClassifier
    from ..methods.mxa.sigmoid_output import SigmoidOutput

    ResNet, DenseNet, EfficientVitMsra, VisionTransformer = _timm_types()

    @register_target(ResNet)
    def _resnet(model, size):
        layer, text = deepest_spatial(model, [
            (model.layer4[-1], "layer4[-1] (last residual block)"),
            (model.layer3[-1], "layer3[-1] (layer4 is 1×1 at this size)")], size)
        return CAMTarget([layer], None, text)

    @register_target(DenseNet)
    def _densenet(model, size):
        layer, text = deepest_spatial(model, [
            (model.features.norm5, "features.norm5 (after the last dense block)"),
            (model.features.denseblock3, "features.denseblock3 (norm5 is 1×1 at this size)")], size)
        return CAMTarget([layer], None, text)

    @register_target(EfficientVitMsra)
    def _efficientvit(model, size):
        candidates = [(model.stages[-1], "stages[-1] (last stage)")] + [
            (model.stages[k], f"stages[{k}] (later stages are 1×1 at this size)")
            for k in range(len(model.stages) - 2, -1, -1)]
        layer, text = deepest_spatial(model, candidates, size)
        return CAMTarget([layer], None, text)

    @register_target(VisionTransformer)
    def _vit(model, size):
        layout = token_layout(model)
        return CAMTarget([model.blocks[-1].norm1], TokenReshape(layout.prefix, layout.grid),
                         f"blocks[-1].norm1 (tokens minus {layout.prefix} prefix → "
                         f"{layout.grid[0]}×{layout.grid[1]})")

    def _inner(model, size, attribute: str, what: str) -> CAMTarget:
        found = cam_target(getattr(model, attribute), size)
        layers_of = found.description
        return CAMTarget(found.layers, found.reshape_transform, f"{what}: {attribute}.{layers_of}")

    @register_target(DistilledClassifier)
    def _distilled(model, size):
        return _inner(model, size, "backbone", "distilled")

    @register_target(MultiTaskClassifier)
    def _multitask(model, size):
        return _inner(model, size, "backbone", "two-task")

    @register_target(LinearProbe)
    def _probe(model, size):
        return _inner(model, size, "backbone", "linear probe")

    @register_target(SigmoidOutput)
    def _sigmoid_output(model, size):  # 03's authors_baseline: a sigmoid after the backbone
        return _inner(model, size, "backbone", "sigmoid output")

    @register_target(GLoRI)
    def _glori(model, size):
        if is_token_vit(model.backbone):
            grid = token_layout(model.backbone).grid
            return CAMTarget([model.input_proj], TokenReshape(0, grid),
                             f"input_proj (projected patch tokens, {grid[0]}×{grid[1]})")
        return CAMTarget([model.input_proj], TokenReshape(0, None),
                         "input_proj (projected feature-map tokens, square grid)")

    @register_target(CrossAttentionNetwork)
    def _can(model, size):
        parts = [cam_target(b, size) for b in model.backbones]
        if any(p.reshape_transform is not None for p in parts):
            raise TypeError(f"CAN over token backbones is not supported: {model_label(model)}")
        return CAMTarget([p.layers[0] for p in parts], None,
                         "both networks: " + " and ".join(f"backbones.{i}.{p.description}"
                                                          for i, p in enumerate(parts)))

    @register_target(LogitEnsemble)
    def _logit_ensemble(model, size):
        parts = [cam_target(n, size) for n in model.networks]
        if any(p.reshape_transform is not None for p in parts):
            raise TypeError(f"an ensemble of token networks is not supported: "
                            f"{model_label(model)}")
        return CAMTarget([p.layers[0] for p in parts], None,
                         "both networks: " + " and ".join(f"networks.{i}.{p.description}"
                                                          for i, p in enumerate(parts)))


_register_defaults()


# ---- a model grad-cam can use -------------------------------------------------------------------
def logits_of(output) -> torch.Tensor:
    """B×K logits out of whatever a model returns.

    In eval mode every model of the study already returns a tensor (a distilled model the mean
    of its two heads, a two-task model its local findings, CAN the mean of its branches); the
    NamedTuples they return in training mode are handled too: the first field is the logits
    (CAN), the class head averaged with the distillation head, the local task."""
    if isinstance(output, torch.Tensor):
        return output
    from ..methods.can.model import CANOutput
    from ..models.distill import DistilledOutput
    from ..methods.mlcak.model import MultiTaskOutput

    if isinstance(output, DistilledOutput):
        return (output.cls + output.dist) / 2
    if isinstance(output, (MultiTaskOutput, CANOutput)):
        return output[0]
    raise TypeError(f"cannot read logits from a {type(output).__name__}")


@contextlib.contextmanager
def gradients_through_frozen(model: nn.Module):
    """Let autograd run through frozen backbones (GLoRI, linear probe run theirs under
    ``no_grad``), restoring the flags afterwards; the weights stay untouched."""
    frozen = [m for m in model.modules() if getattr(m, "freeze_backbone", False)]
    for module in frozen:
        module.freeze_backbone = False
    try:
        yield
    finally:
        for module in frozen:
            module.freeze_backbone = True


class LogitsModel(nn.Module):
    """``model`` as grad-cam needs it: ``forward(x)`` returns B×K logits, and gradients reach
    every layer — the input is made to require a gradient, so a frozen backbone (no parameter
    with ``requires_grad``) still passes one to the CAM layer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not x.requires_grad:
            x = x.detach().requires_grad_(True)
        with gradients_through_frozen(self.model):
            return logits_of(self.model(x))


__all__ = ["CAMTarget", "TokenReshape", "register_target", "cam_target", "logits_of",
           "gradients_through_frozen", "LogitsModel", "model_label", "deepest_spatial"]
