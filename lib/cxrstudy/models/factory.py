"""One entry point for every model: :func:`create_model` (registry first, then timm).

Every model it returns carries ``model.cxr_config`` — the arguments that rebuild it — so a
checkpoint holds weights plus the recipe, and evaluation needs nothing else.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from torch import nn

from .distill import add_distillation_head
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
                 **kwargs: Any) -> nn.Module:
    """Build ``name`` for ``in_chans × image_size²`` inputs with ``num_classes`` logits.

    ``pretrained``: False, True (the architecture's default weights from the local cache; see
    :mod:`cxrstudy.models.pretrained`) or a weight-file path. A file that fits the model
    exactly (our own saved weights) is loaded as is; any other file goes to the builder to be
    adapted (e.g. ImageNet RGB weights into a one-channel, 14-class model).
    ``kwargs`` go to the builder (e.g. ``patch_size=4`` for a ViT on 32-px images,
    ``drop_rate``) and are kept in ``model.cxr_config`` so the model can be rebuilt.
    ``distilled=True`` adds a DeiT-style distillation head to any classifier
    (:mod:`cxrstudy.models.distill`); a weight file for it is one of our distilled checkpoints.
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
    if _is_weight_path(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weight file {path} does not exist")
        model = builder(**shape, pretrained=False, **kwargs)
        state_dict = read_state_dict(path)
        if state_dict_matches(model, state_dict):
            model.load_state_dict(state_dict, strict=True)
        else:
            model = builder(**shape, pretrained=str(path), **kwargs)
        source: bool | str = str(path)
    else:
        model = builder(**shape, pretrained=bool(pretrained), **kwargs)
        source = bool(pretrained)
    config = dict(name=name, **shape, kwargs=dict(kwargs), pretrained=source)
    if distilled:
        config["kwargs"]["distilled"] = config["distilled"] = True
    model.cxr_config = config
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["create_model", "count_parameters"]
