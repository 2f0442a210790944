"""Names → model builders: the study's own architectures first, timm's as the fallback.

A builder is ``builder(num_classes, in_chans, image_size, pretrained, **kwargs) -> nn.Module``.
``pretrained`` arrives exactly as the caller passed it (False, True or a weight-file path), so a
builder that wraps a timm backbone can hand it on to
:func:`cxrstudy.models.pretrained.create_timm_model`.

>>> @register_model("tiny_cnn")
... def tiny_cnn(num_classes, in_chans, image_size, pretrained=False, **kwargs): ...
"""
from __future__ import annotations

import fnmatch
from typing import Callable

ModelBuilder = Callable[..., "object"]

_BUILDERS: dict[str, ModelBuilder] = {}

# Short names used in notebooks and parameter files → the timm architecture they mean.
ALIASES: dict[str, str] = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "vit_small": "vit_small_patch16_224",
}

# timm architectures the study uses and checks at 32–224 px with one input channel. Any other
# timm name still works through :func:`cxrstudy.models.create_model`; these are the ones listed.
STUDY_TIMM_MODELS: tuple[str, ...] = (
    "efficientvit_m0", "efficientvit_m1", "efficientvit_m2", "efficientvit_m3",
    "efficientvit_m4", "efficientvit_m5", "resnet18", "resnet50", "densenet121",
    "deit_tiny_patch16_224", "deit_small_patch16_224", "vit_small_patch16_224",
)


def register_model(name: str | Callable | None = None, *, overwrite: bool = False):
    """Register a builder under ``name`` (default: the function's name); usable bare or called.

    Registering a different builder under a taken name raises unless ``overwrite=True``, so one
    notebook cannot silently replace another's architecture.
    """
    def decorate(builder: ModelBuilder, key: str | None = None) -> ModelBuilder:
        key = key or builder.__name__
        if key in ALIASES:
            raise ValueError(f"model name {key!r} is an alias of {ALIASES[key]!r}; pick another")
        current = _BUILDERS.get(key)
        if current is not None and current is not builder and not overwrite:
            raise ValueError(f"model {key!r} is already registered by {current.__module__}."
                             f"{current.__qualname__}; pass overwrite=True to replace it")
        _BUILDERS[key] = builder
        return builder

    if callable(name):  # used bare: @register_model
        return decorate(name)
    return lambda builder: decorate(builder, name)


def unregister_model(name: str) -> None:
    """Remove a registered builder (tests register throw-away models)."""
    _BUILDERS.pop(name, None)


def resolve_alias(name: str) -> str:
    return ALIASES.get(name, name)


def registered_builder(name: str) -> ModelBuilder | None:
    """The study's own builder for ``name`` (aliases resolved), or None to fall back to timm."""
    return _BUILDERS.get(resolve_alias(name))


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, the study's timm architectures and their aliases (``fnmatch`` filter)."""
    names = sorted(set(_BUILDERS) | set(STUDY_TIMM_MODELS) | set(ALIASES))
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


__all__ = ["register_model", "unregister_model", "resolve_alias", "registered_builder",
           "list_models", "ALIASES", "STUDY_TIMM_MODELS"]
