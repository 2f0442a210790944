"""The input a pretrained backbone was trained on, given to it inside the model.

Every dataset here yields one-channel images in [0, 1]. A backbone pretrained on ImageNet saw
three channels, each normalised by its training set's statistics (timm's ``pretrained_cfg``:
``mean``, ``std`` and the stem's name ``first_conv``)::

    x'_c = (x − mean_c) / std_c        for c = 1 … C  (the grey image repeated C times)

Raw [0, 1] grey images sit off that distribution, and a frozen backbone (GLoRI's linear probe,
its class queries) cannot adapt to them. :class:`InputAdapter` does the repeat and the
normalisation; it is attached to the backbone's stem and runs as the stem's forward pre-hook, so
every path to the pixels (``forward``, ``forward_features``, ``forward_intermediates``, Grad-CAM,
``cxrstudy evaluate``) sees the same input, and each backbone of a two-network model gets its own
statistics (timm's ViT-S augreg uses 0.5 / 0.5, its DeiTs and CNNs ImageNet's).

``input_norm`` names the convention: ``"pretrained"`` (the adapter, the stem keeps the
pretrained channel count) or ``"none"`` (one channel in [0, 1], as trained from scratch; with
pretrained weights timm then sums the RGB kernels of the first convolution). Its mean and std are
buffers in the state dict, so a checkpoint says which input its model expects.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

INPUT_NORMS = ("pretrained", "none")

#: The convention of the model being built by the enclosing ``create_model`` call (None: each
#: backbone decides from its own weights), so the backbones a composite model builds inside its
#: builder (CAN's two networks, GLoRI's ViT) follow the outer call without every builder taking
#: one more argument.
_BUILDING: ContextVar[str | None] = ContextVar("cxrstudy_input_norm", default=None)


class NoPretrainedStatistics(ValueError):
    """The architecture has no pretrained mean/std or stem name to build an adapter from."""


def check_input_norm(value: str | None) -> str | None:
    if value is not None and value not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {INPUT_NORMS} (or None: from the weights), "
                         f"got {value!r}")
    return value


def building_input_norm() -> str | None:
    """The convention the enclosing ``create_model`` call asked for (None outside one)."""
    return _BUILDING.get()


@contextmanager
def building_with(input_norm: str | None) -> Iterator[None]:
    """Build every backbone inside this block with ``input_norm`` (None: from its weights)."""
    token = _BUILDING.set(check_input_norm(input_norm))
    try:
        yield
    finally:
        _BUILDING.reset(token)


class InputAdapter(nn.Module):
    """Grey [B, 1, H, W] in [0, 1] → [B, C, H, W] normalised per channel as the backbone's
    pretraining data was. An input that already has C channels is only normalised."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        means, stds = [float(v) for v in mean], [float(v) for v in std]
        if not means or len(means) != len(stds):
            raise ValueError(f"InputAdapter: mean {means} and std {stds} must give one value per "
                             f"channel")
        if not all(math.isfinite(v) for v in means) or \
                not all(math.isfinite(s) and s > 0 for s in stds):
            raise ValueError(f"InputAdapter: mean must be finite and std positive, got mean "
                             f"{means}, std {stds}")
        mean_t = torch.tensor(means, dtype=torch.float32)
        std_t = torch.tensor(stds, dtype=torch.float32)
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    @classmethod
    def from_pretrained_cfg(cls, cfg: Mapping[str, Any]) -> "InputAdapter":
        if not cfg.get("mean") or not cfg.get("std"):
            raise NoPretrainedStatistics("the backbone's pretrained_cfg names no mean/std to normalise with")
        return cls(cfg["mean"], cfg["std"])

    @property
    def channels(self) -> int:
        return int(self.mean.shape[1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"InputAdapter expects images [B, C, H, W], got {tuple(images.shape)}")
        if images.shape[1] == 1 and self.channels != 1:
            images = images.expand(-1, self.channels, -1, -1)
        elif images.shape[1] != self.channels:
            raise ValueError(f"InputAdapter: {images.shape[1]} input channels; this backbone "
                             f"takes 1 (grey, repeated) or {self.channels}")
        return (images - self.mean) / self.std

    def extra_repr(self) -> str:
        def show(t):
            return ", ".join(f"{v:.3f}" for v in t.flatten().tolist())
        return f"channels={self.channels}, mean=({show(self.mean)}), std=({show(self.std)})"


def _adapt_stem_input(stem: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of the stem: its input goes through the stem's adapter first."""
    return (stem.input_adapter(args[0]), *args[1:])


def stem_name(model: nn.Module) -> str:
    """The first convolution's name from the model's ``pretrained_cfg`` (``first_conv``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv")
    first = first[0] if isinstance(first, (list, tuple)) and first else first
    if not first:
        raise NoPretrainedStatistics(f"{type(model).__name__} has no pretrained_cfg['first_conv'] to put an "
                         f"input adapter before; build it with input_norm='none'")
    return first


def attach_input_adapter(model: nn.Module) -> InputAdapter:
    """Put an :class:`InputAdapter` from ``model.pretrained_cfg`` before the model's stem."""
    name = stem_name(model)
    try:
        stem = model.get_submodule(name)
    except AttributeError as exc:
        raise ValueError(f"{type(model).__name__}: its pretrained_cfg names the stem {name!r}, "
                         f"which the model does not have") from exc
    if isinstance(getattr(stem, "input_adapter", None), InputAdapter):
        raise ValueError(f"{type(model).__name__}.{name} already has an input adapter")
    stem.input_adapter = InputAdapter.from_pretrained_cfg(model.pretrained_cfg)
    stem.register_forward_pre_hook(_adapt_stem_input)
    return stem.input_adapter


def input_adapters(model: nn.Module) -> list[InputAdapter]:
    """Every input adapter inside ``model`` (one per pretrained-convention backbone)."""
    return [m for m in model.modules() if isinstance(m, InputAdapter)]


def pretrained_channels(timm_name: str) -> int:
    """How many channels ``timm_name``'s pretrained weights were trained on (its cfg's mean)."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(timm_name)
    mean = getattr(cfg, "mean", None) if cfg is not None else None
    if not mean:
        raise NoPretrainedStatistics(f"timm has no pretrained statistics for {timm_name!r}; build it with "
                         f"input_norm='none'")
    return len(mean)


__all__ = ["INPUT_NORMS", "InputAdapter", "NoPretrainedStatistics", "attach_input_adapter", "building_input_norm",
           "building_with", "check_input_norm", "input_adapters", "pretrained_channels",
           "stem_name"]
