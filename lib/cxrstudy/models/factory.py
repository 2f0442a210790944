"""One entry point for every model: :func:`create_model` (registry first, then timm).

Every model it returns carries ``model.cxr_config`` — the arguments that rebuild it — so a
checkpoint holds weights plus the recipe, and evaluation needs nothing else.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .distill import add_distillation_head
from .input_adapter import (NoPretrainedStatistics, building_input_norm, building_with,
                            check_input_norm, input_adapters)
from .pretrained import create_timm_model, read_state_dict, state_dict_matches
from .registry import list_models, registered_builder, resolve_alias


def _timm_builder(timm_name: str):
    def build(num_classes, in_chans, image_size, pretrained=False, **kwargs):
        return create_timm_model(timm_name, num_classes, in_chans=in_chans,
                                 image_size=image_size, pretrained=pretrained, **kwargs)
    return build


def _find_builder(name: str):
    builder = registered_builder(name)
    if builder is not None:
        return builder
    import timm

    timm_name = resolve_alias(name)
    if timm.is_model(timm_name):
        return _timm_builder(timm_name)
    known = list_models() + timm.list_models()
    close = difflib.get_close_matches(name, known, n=5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}: neither registered in cxrstudy.models nor a timm "
                     f"architecture{hint} (cxrstudy.models.list_models() lists the study's)")


def _is_weight_path(pretrained) -> bool:
    return isinstance(pretrained, (str, os.PathLike)) and not isinstance(pretrained, bool)


def create_model(name: str, num_classes: int, in_chans: int = 1, image_size: int = 224,
                 pretrained: bool | str | os.PathLike = False, distilled: bool = False,
                 input_norm: str | None = None, **kwargs: Any) -> nn.Module:
    """Build ``name`` for ``in_chans × image_size²`` inputs with ``num_classes`` logits.

    ``pretrained``: False, True (the architecture's default weights from the local cache; see
    :mod:`cxrstudy.models.pretrained`) or a weight-file path. A file that fits the model
    exactly (our own saved weights) is loaded as is; any other file goes to the builder to be
    adapted (e.g. ImageNet RGB weights into a one-channel, 14-class model).
    ``kwargs`` go to the builder (e.g. ``patch_size=4`` for a ViT on 32-px images,
    ``drop_rate``) and are kept in ``model.cxr_config`` so the model can be rebuilt.
    ``distilled=True`` adds a DeiT-style distillation head to any classifier
    (:mod:`cxrstudy.models.distill`); a weight file for it is one of our distilled checkpoints.

    ``input_norm`` (:mod:`cxrstudy.models.input_adapter`): what the model's backbones take in.
    None (the default) follows the weights: ``"pretrained"`` (grey repeated to the pretrained
    channels and normalised with their mean and std, inside the model) when weights are loaded
    with ``pretrained=True`` or from a file of foreign weights, ``"none"`` (one channel in
    [0, 1]) when trained from scratch; a file of our own weights fits one of the two exactly
    and keeps it. The choice is kept in ``model.cxr_config["input_norm"]``, so a checkpoint is
    rebuilt the same way.
    """
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if int(in_chans) < 1:
        raise ValueError(f"in_chans must be at least 1, got {in_chans}")
    if int(image_size) < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    found = _find_builder(name)

    def builder(**build_args):
        model = found(**build_args)
        return add_distillation_head(model) if distilled else model

    shape = dict(num_classes=int(num_classes), in_chans=int(in_chans), image_size=int(image_size))
    norm = check_input_norm(input_norm) or building_input_norm()
    if _is_weight_path(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weight file {path} does not exist")
        model = _own_weights_model(builder, shape, kwargs, read_state_dict(path), norm)
        if model is None:  # foreign weights: the builder adapts them (each backbone its input)
            with building_with(norm):
                model = builder(**shape, pretrained=str(path), **kwargs)
        source: bool | str = str(path)
    else:
        with building_with(norm or ("pretrained" if pretrained else "none")):
            model = builder(**shape, pretrained=bool(pretrained), **kwargs)
        source = bool(pretrained)
    config = dict(name=name, **shape, kwargs=dict(kwargs), pretrained=source,
                  input_norm="pretrained" if input_adapters(model) else "none")
    if distilled:
        config["kwargs"]["distilled"] = config["distilled"] = True
    model.cxr_config = config
    return model


def _own_weights_model(builder, shape: dict, kwargs: dict, state_dict: dict,
                       norm: str | None) -> nn.Module | None:
    """The model ``state_dict`` fits exactly (our own saved weights), loaded; None when it fits
    neither input convention. Tried: ``norm`` when given, else "none" (built for real, as the
    weights are then loaded into it) and then "pretrained" (shapes only, on the meta device, so
    a file that fits neither draws no more random numbers than before)."""
    with building_with(norm or "none"):
        model = builder(**shape, pretrained=False, **kwargs)
    if state_dict_matches(model, state_dict):
        model.load_state_dict(state_dict, strict=True)
        return model
    if norm is not None:
        return None
    try:
        with torch.device("meta"), building_with("pretrained"):
            shapes = builder(**shape, pretrained=False, **kwargs)
    except NoPretrainedStatistics:
        return None
    if not state_dict_matches(shapes, state_dict):
        return None
    with building_with("pretrained"):
        model = builder(**shape, pretrained=False, **kwargs)
    model.load_state_dict(state_dict, strict=True)
    return model


def headless_backbone(name: str, num_classes: int, in_chans: int, image_size: int,
                      pretrained=False, **kwargs) -> nn.Module:
    """``create_model(name, ...)`` (aliases, local weights, weight files) without its classifier."""
    model = create_model(name, num_classes, in_chans=in_chans, image_size=image_size,
                         pretrained=pretrained, **kwargs)
    if not (hasattr(model, "reset_classifier") and hasattr(model, "forward_features")):
        raise TypeError(f"backbone {name!r} ({type(model).__name__}) is not a timm classifier "
                        f"(reset_classifier, forward_features)")
    model.reset_classifier(0)
    model.__dict__.pop("cxr_config", None)  # the wrapper's own config is what rebuilds it
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["headless_backbone", "create_model", "count_parameters"]
