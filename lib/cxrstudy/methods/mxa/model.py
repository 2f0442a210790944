"""The Medical X-ray Attention (MXA) block inside timm's EfficientViT-M (Rand & Ibrahim,
arXiv 2504.02277): a learned region of interest, cropped and attended, beside local window
attention.

The block on a feature map ``x`` (B×C×H×W):

* ROI branch — one box per image, normalised ``(x1, y1, x2, y2)`` in [0, 1]::

      box = mean_{h,w} σ(Conv1×1_{C/2→4}(ReLU(Conv3×3_{C→C/2}(x))))

  The map is cropped to the box and resized back to H×W (bilinear). A box that is empty or
  inverted (``x2 <= x1`` or ``y2 <= y1`` once in pixels) keeps the whole map.
* CBAM attention on the cropped map ``x'`` (channel, then spatial)::

      M_c = σ(Conv1×1_{C/16→C}(ReLU(Conv1×1_{C→C/16}(AvgPool(x')))))      x'' = M_c ⊙ x'
      M_s = σ(Conv7×7_{2→1}([MaxPool_c(x''); AvgPool_c(x'')]))             MXA(x) = M_s ⊙ x''

Placement (``mxa_placement``) in every ``EfficientVitBlock`` (dw0 → ffn0 → mixer → dw1 → ffn1):

* ``"mixer"`` (ours, the default) — MXA beside the residual local window attention (LWA), at the
  mixer's position::

      sum:    x ← x + LWA(x) + MXA(x)
      gated:  x ← x + g·LWA(x) + (1 − g)·MXA(x),   g = σ(α), α a scalar per block, α₀ = 0

* ``"block_input"`` — as the authors' code wires it (``EfficientViTBlock.forward`` in
  Hadi-M-Ibrahim/Beyond-Conventional-Transformers: ``x = mixer(x) + mxa(x)``, then the whole
  block), two residual branches summed at the block's input, then the unchanged block, whose
  mixer applies the same window attention a second time::

      sum:    y = (x + LWA(x)) + (x + MXA(x)) = 2x + LWA(x) + MXA(x)
      gated:  y = g·(x + LWA(x)) + (1 − g)·(x + MXA(x))
      out = ffn1(dw1(z + LWA(z))),   z = ffn0(dw0(y))

Both placements hold the same parameters under the same state-dict keys (only the wiring
differs), and everything else of timm's model is kept, so timm's (ImageNet) weights load into the
backbone.

Two crop modes:

* ``"faithful"`` — as the authors' code: the box becomes integer pixel bounds
  ``x1 = ⌊W·box_x1⌋`` … (what ``int(box * W)`` does), the map is sliced
  ``x[:, :, y1:y2, x1:x2]`` and resized with ``interpolate(bilinear, align_corners=False)``.
  No gradient reaches the box, so the ROI branch is never trained: its parameters are kept at
  ``requires_grad=False`` (their grad stays None, as in the authors' code, and DDP does not see
  unused parameters) and the box is computed without autograd.
* ``"differentiable"`` — our option: RoIAlign-style bilinear sampling (one sample per output
  pixel, centres ``lo + (i + ½)(hi − lo)/N − ½`` in the map's pixel coordinates) with the
  continuous box, so the loss trains the ROI branch through the sampling weights.

With PyTorch's default initialisation (the authors') every image's box starts near
(½, ½, ½, ½): on NIH images and random inputs alike, M5 at 224 px falls back to the whole map in
all eight blocks, so faithful MXA starts as CBAM on the whole map, and its frozen ROI branch moves
only as the features under it change. ``roi_init="whole"`` (see :class:`ROIHead`) starts the
differentiable crop near the whole map instead, so it can shrink where that helps.

Both modes crop the whole batch at once as two products with per-sample resampling matrices,
``crop = R_y · x · R_xᵀ`` (each row of ``R`` holds the two bilinear weights). Unlike
``grid_sample``/``interpolate``, whose CUDA backward passes use atomic adds, these matmuls are
deterministic, which the study's seeded runs ask for.

Parameter counts (14 classes, 224 px; ``count_parameters``): EfficientViT-M5 with one input
channel 12 093 730 without MXA, 16 149 010 with MXA; M0 2 158 994 / 2 843 382. The authors'
training logs (``n_parameters``) hold exactly what ``create_model`` gives for their three runs:
12 094 162 for the baseline (M5 with a *three*-channel stem: 24 filters × 2 more channels × 3×3
= +432), 16 149 010 for +MXA and 16 155 168 for +MXA+KD (one channel, plus the distillation
head: BatchNorm 2·384 + Linear 14·385 = 6 158) — see ``cxrstudy.methods.mxa.study.AUTHORS_RUNS``; the
paper's 12.09 M / 16.16 M round the first and the last. The MXA part is
Σ_blocks 4.5·C² + C²/8 + 2C + 4 + 98 — ROI hidden width C/2 and channel reduction 16 give
4.055 M over M5's eight blocks (C = 192, 3×288, 4×384). Biases follow the authors' MXA module:
only the 1×1 ROI conv has one (the 3×3 ROI conv, the CBAM convs and the 7×7 conv have none). The
gated mode adds one α per block. In faithful mode the frozen ROI branches hold 3.95 M of M5's
parameters, so 12 203 954 are trained.
"""
from __future__ import annotations

import copy
import re

from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ...models.pretrained import create_timm_model, load_exact, read_state_dict
from ...models.registry import register_model

CROP_MODES = ("faithful", "differentiable")
MXA_MODES = ("sum", "gated")
MXA_PLACEMENTS = ("mixer", "block_input")
ROI_INITS = ("default", "whole")
WHOLE_MAP_START = (0.05, 0.05, 0.95, 0.95)
EFFICIENTVIT_VARIANTS = tuple(f"efficientvit_m{i}" for i in range(6))


def _check_choice(label: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{label} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


# ---- batched crop-and-resize ----------------------------------------------------------------
def pixel_bounds(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Integer bounds ``(x1, y1, x2, y2)`` (B×4, long) of normalised boxes, as the authors'
    ``int(box * size)`` gives them, clipped to the map the way slicing clips them."""
    scale = boxes.new_tensor([width, height, width, height], dtype=torch.float32)
    bounds = torch.floor(boxes.detach().float() * scale).long()
    upper = torch.tensor([width, height, width, height], device=boxes.device)
    return torch.minimum(bounds.clamp_min(0), upper)


def _bilinear_matrix(source: torch.Tensor, first: torch.Tensor, last: torch.Tensor,
                     size: int) -> torch.Tensor:
    """Resampling matrices B×N×size: output ``i`` reads ``(1−λ)·v[i0] + λ·v[i1]`` at the
    (float) source position ``source[b, i]``, clamped into ``[first[b], last[b]]``."""
    source = torch.maximum(torch.minimum(source, last[:, None].to(source.dtype)),
                           first[:, None].to(source.dtype))
    lower = torch.floor(source.detach())
    weight_upper = source - lower  # λ; carries the gradient to the box in differentiable mode
    lower = lower.long()
    upper = torch.minimum(lower + 1, last[:, None].long())
    positions = torch.arange(size, device=source.device)
    pick_lower = (positions == lower[..., None]).to(source.dtype)
    pick_upper = (positions == upper[..., None]).to(source.dtype)
    return (1 - weight_upper)[..., None] * pick_lower + weight_upper[..., None] * pick_upper


def _slice_resize_matrix(start: torch.Tensor, stop: torch.Tensor, size: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """What ``interpolate(v[start:stop], size, bilinear, align_corners=False)`` does along one
    axis, as a matrix: source ``s = (i + ½)·L/N − ½`` (clamped at 0), L = stop − start."""
    scale = (stop - start).to(dtype) / size
    out_index = torch.arange(size, device=start.device, dtype=dtype)
    source = (scale[:, None] * (out_index + 0.5)[None] - 0.5).clamp_min(0)
    return _bilinear_matrix(source + start[:, None].to(dtype), start, stop - 1, size)


def _roi_align_matrix(low: torch.Tensor, high: torch.Tensor, size: int) -> torch.Tensor:
    """RoIAlign (aligned, one sample per bin) along one axis: output ``i`` samples the pixel
    coordinate ``low + (i + ½)(high − low)/N − ½`` (``low``/``high`` in pixel units, float),
    clamped to the map."""
    out_index = torch.arange(size, device=low.device, dtype=low.dtype)
    source = low[:, None] + (out_index + 0.5)[None] * ((high - low) / size)[:, None] - 0.5
    zero = torch.zeros_like(low, dtype=torch.long)
    return _bilinear_matrix(source, zero, zero + (size - 1), size)


def crop_to_boxes(x: torch.Tensor, boxes: torch.Tensor,
                  crop: str = "faithful") -> tuple[torch.Tensor, torch.Tensor]:
    """Crop every map of ``x`` (B×C×H×W) to its box and resize it back to H×W, in one go.

    ``boxes``: B×4 normalised ``(x1, y1, x2, y2)``. Returns the cropped maps and the regions
    actually used (B×4, normalised; ``(0, 0, 1, 1)`` where the box fell back to the whole map).
    """
    _check_choice("crop", crop, CROP_MODES)
    if x.ndim != 4 or boxes.shape != (x.shape[0], 4):
        raise ValueError(f"expected maps B×C×H×W and boxes B×4, got {tuple(x.shape)} and "
                         f"{tuple(boxes.shape)}")
    height, width = x.shape[-2:]
    # sampling positions in at least float32, whatever the maps' (autocast) precision
    dtype = torch.promote_types(torch.promote_types(x.dtype, boxes.dtype), torch.float32)
    size = torch.tensor([width, height, width, height], device=x.device, dtype=dtype)
    whole = size * torch.tensor([0, 0, 1, 1], device=x.device, dtype=dtype)
    if crop == "faithful":
        bounds = pixel_bounds(boxes, height, width)
        keep = (bounds[:, 2] > bounds[:, 0]) & (bounds[:, 3] > bounds[:, 1])
        bounds = torch.where(keep[:, None], bounds, whole.long())
        rows = _slice_resize_matrix(bounds[:, 1], bounds[:, 3], height, dtype)
        cols = _slice_resize_matrix(bounds[:, 0], bounds[:, 2], width, dtype)
        used = bounds.to(dtype) / size
    else:
        edges = boxes.to(dtype) * size  # continuous pixel coordinates of the box edges
        keep = (edges[:, 2] > edges[:, 0]) & (edges[:, 3] > edges[:, 1])
        edges = torch.where(keep[:, None], edges, whole)
        rows = _roi_align_matrix(edges[:, 1], edges[:, 3], height)
        cols = _roi_align_matrix(edges[:, 0], edges[:, 2], width)
        used = edges.detach() / size
    rows, cols = rows.to(x.dtype), cols.to(x.dtype)
    cropped = torch.matmul(torch.matmul(rows[:, None], x), cols.transpose(1, 2)[:, None])
    # A fallback map is passed through untouched (no rounding by low-precision matmuls).
    cropped = torch.where(keep[:, None, None, None], cropped, x)
    return cropped, used


# ---- the block --------------------------------------------------------------------------------
class ROIHead(nn.Sequential):
    """``box = mean_{h,w} σ(Conv1×1(ReLU(Conv3×3(x))))``: the hidden width is C/2.

    ``init="default"`` keeps PyTorch's initialisation, as the authors do; the boxes then start
    near (½, ½, ½, ½) for every image: empty or inverted (the whole map is used) or a sliver a
    few percent of the map wide. ``init="whole"`` starts from ≈ (0.05, 0.05, 0.95, 0.95) for every
    image (box-conv weights × 0.01, biases at those log-odds), so a differentiable crop starts
    near the whole map and can shrink where that helps.
    """

    def __init__(self, channels: int, init: str = "default"):
        hidden = max(channels // 2, 1)
        super().__init__()
        self.conv = nn.Conv2d(channels, hidden, 3, padding=1, bias=False)
        self.act = nn.ReLU()
        self.box = nn.Conv2d(hidden, 4, 1, bias=True)
        if _check_choice("roi_init", init, ROI_INITS) == "whole":
            with torch.no_grad():
                self.box.weight.mul_(0.01)
                self.box.bias.copy_(torch.logit(torch.tensor(WHOLE_MAP_START)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)  # in at least float32: bf16 would move a box by ~1/256
        return torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32))
                             ).mean(dim=(2, 3))


class ChannelAttention(nn.Module):
    """CBAM's ``M_c = σ(W₂ ReLU(W₁ AvgPool(x)))``, W₁: C→max(C/16, 1); returns ``M_c ⊙ x``."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.squeeze = nn.Conv2d(channels, hidden, 1, bias=False)
        self.act = nn.ReLU()
        self.expand = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.expand(self.act(self.squeeze(self.pool(x)))))


class SpatialAttention(nn.Module):
    """CBAM's ``M_s = σ(Conv7×7([max_c x; mean_c x]))``; returns ``M_s ⊙ x``."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class MXABlock(nn.Module):
    """MXA(x) = M_s ⊙ (M_c ⊙ crop(x, box(x))) — see the module docstring.

    After each forward, ``last_boxes`` (B×4, detached) holds the predicted normalised boxes
    ``(x1, y1, x2, y2)`` and ``last_crop_boxes`` the regions really cropped (integer pixel bounds
    in faithful mode, ``(0, 0, 1, 1)`` on fallback), both relative to the feature map, which
    covers the whole image.
    """

    def __init__(self, channels: int, crop: str = "faithful", reduction: int = 16,
                 roi_init: str = "default"):
        super().__init__()
        self.channels = channels
        self.roi = ROIHead(channels, init=roi_init)
        self.channel_attention = ChannelAttention(channels, reduction)
        self.spatial_attention = SpatialAttention(7)
        self.last_boxes: torch.Tensor | None = None
        self.last_crop_boxes: torch.Tensor | None = None
        self.crop = crop

    @property
    def crop(self) -> str:
        return self._crop

    @crop.setter
    def crop(self, mode: str) -> None:
        """Faithful mode never trains the ROI branch, so its parameters stop asking for grads."""
        self._crop = _check_choice("crop", mode, CROP_MODES)
        self.roi.requires_grad_(mode == "differentiable")

    def predict_boxes(self, x: torch.Tensor) -> torch.Tensor:
        if self.crop == "faithful":
            with torch.no_grad():
                return self.roi(x)
        return self.roi(x)

    def crop_region(self, x: torch.Tensor) -> torch.Tensor:
        """The map cropped to its predicted box and resized to H×W (records the boxes)."""
        boxes = self.predict_boxes(x)
        cropped, used = crop_to_boxes(x, boxes, self.crop)
        self.last_boxes, self.last_crop_boxes = boxes.detach(), used
        return cropped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial_attention(self.channel_attention(self.crop_region(x)))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, crop={self.crop!r}"


class MXAMixer(nn.Module):
    """Residual token mixer: ``x + LWA(x) + MXA(x)`` (sum) or
    ``x + σ(α)·LWA(x) + (1 − σ(α))·MXA(x)`` (gated) — the ``"mixer"`` placement's forward.

    The window attention stays at ``.m`` (timm's ``ResidualDrop`` names it so), keeping timm's
    state-dict keys and ``EfficientVitBlock.set_input_size``. ``drop`` is timm's per-sample
    residual drop, applied to the summed update. :class:`MXAAtBlockInput` (the ``"block_input"``
    placement) uses the same module through :meth:`at_block_input` and :meth:`window_attention`.
    """

    def __init__(self, window_attention: nn.Module, mxa: MXABlock, mode: str = "sum",
                 drop: float = 0.0):
        super().__init__()
        self.mode = _check_choice("mxa_mode", mode, MXA_MODES)
        self.m = window_attention
        self.mxa = mxa
        self.drop = float(drop)
        if mode == "gated":
            self.alpha = nn.Parameter(torch.zeros(()))

    def _residual(self, x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """``x + update``, with timm's per-sample residual drop while training."""
        if self.training and self.drop > 0:
            keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device).ge_(self.drop)
            update = update * keep.div(1 - self.drop).to(update.dtype)
        return x + update

    def _mix(self, attended: torch.Tensor, focused: torch.Tensor) -> torch.Tensor:
        if self.mode == "gated":
            gate = torch.sigmoid(self.alpha)
            return gate * attended + (1 - gate) * focused
        return attended + focused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._residual(x, self._mix(self.m(x), self.mxa(x)))

    def window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """``x + LWA(x)`` alone: timm's residual window attention, without MXA."""
        return self._residual(x, self.m(x))

    def at_block_input(self, x: torch.Tensor) -> torch.Tensor:
        """The authors' ``mixer(x) + mxa(x)``: two residual branches, each carrying ``x``,
        summed ``(x + LWA(x)) + (x + MXA(x))`` or gated ``g·(x + LWA(x)) + (1 − g)·(x + MXA(x))``."""
        return self._mix(self._residual(x, self.m(x)), self._residual(x, self.mxa(x)))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class MXAAtBlockInput(nn.Module):
    """An EfficientViT block wired as the authors' code wires it (``mxa_placement="block_input"``)::

        y = mixer(x) + mxa(x) = (x + LWA(x)) + (x + MXA(x))       (gated: g·(…) + (1 − g)·(…))
        out = ffn1(dw1(z + LWA(z))),   z = ffn0(dw0(y))

    i.e. the whole timm block runs on ``y``, so the same window attention is applied twice and
    the block's input enters ``y`` twice. It holds timm's ``dw0``, ``ffn0``, ``dw1``, ``ffn1``
    and an :class:`MXAMixer` at ``mixer``: the same modules under the same state-dict keys as the
    ``"mixer"`` placement.
    """

    def __init__(self, block: nn.Module, mixer: MXAMixer):
        super().__init__()
        self.dw0, self.ffn0 = block.dw0, block.ffn0
        self.mixer = mixer
        self.dw1, self.ffn1 = block.dw1, block.ffn1

    def set_input_size(self, resolution: int) -> None:
        """What timm's ``EfficientVitBlock.set_input_size`` does: resize the attention window."""
        self.mixer.m.set_input_size(resolution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mixer.at_block_input(x)
        return self.ffn1(self.dw1(self.mixer.window_attention(self.ffn0(self.dw0(x)))))


# ---- EfficientViT surgery -------------------------------------------------------------------
def add_mxa(model: nn.Module, mxa_mode: str = "sum", crop: str = "faithful",
            roi_init: str = "default", placement: str = "mixer") -> nn.Module:
    """Give every attention block of a timm EfficientViT-M an :class:`MXAMixer` (in place).

    ``placement="mixer"`` swaps the block's mixer; ``"block_input"`` replaces the whole block by
    an :class:`MXAAtBlockInput` built from the block's own modules (see the module docstring).
    """
    from timm.models.efficientvit_msra import EfficientVitBlock

    _check_choice("mxa_mode", mxa_mode, MXA_MODES)
    _check_choice("crop", crop, CROP_MODES)
    _check_choice("roi_init", roi_init, ROI_INITS)
    _check_choice("mxa_placement", placement, MXA_PLACEMENTS)
    if any(isinstance(m, MXAMixer) for m in model.modules()):
        raise ValueError("this model already has MXA blocks")
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, EfficientVitBlock)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no EfficientVitBlock: MXA goes into timm's "
                         f"EfficientViT-M (efficientvit_m0 … efficientvit_m5)")
    for name, block in blocks:
        window_attention = block.mixer.m
        mxa = MXABlock(window_attention.dim, crop=crop, roi_init=roi_init)
        mixer = MXAMixer(window_attention, mxa, mode=mxa_mode,
                         drop=getattr(block.mixer, "drop", 0.0))
        if placement == "mixer":
            block.mixer = mixer
        else:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, MXAAtBlockInput(block, mixer))
    model.mxa_config = dict(mxa_mode=mxa_mode, crop=crop, roi_init=roi_init, placement=placement)
    return model


def mxa_blocks(model: nn.Module) -> list[tuple[str, MXABlock]]:
    """``(qualified name, block)`` of every MXA block, in forward order."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, MXABlock)]


def block_label(name: str) -> str:
    """A reader's name for an MXA block's qualified module name, counting from 1 as the paper
    does: ``"stages.1.blocks.0.mixer.mxa"`` → ``"MXA, stage 2 block 1"``; a name without a
    stage/block index is returned as it is."""
    stage = re.search(r"stages\.(\d+)", name)
    block = re.search(r"blocks\.(\d+)", name)
    if stage is None and block is None:
        return name
    where = [f"stage {int(stage.group(1)) + 1}" if stage else "",
             f"block {int(block.group(1)) + 1}" if block else ""]
    return "MXA, " + " ".join(part for part in where if part)


def last_boxes(model: nn.Module) -> dict[str, torch.Tensor]:
    """Predicted boxes of the last forward, per MXA block (for drawing them on the images)."""
    return {name: block.last_boxes for name, block in mxa_blocks(model)
            if block.last_boxes is not None}


def _holds_mxa_weights(pretrained: Any) -> bool:
    if isinstance(pretrained, bool) or pretrained is None:
        return False
    return any(".mixer.mxa." in key or key.endswith(".mixer.alpha")
               for key in read_state_dict(pretrained))


def build_efficientvit_mxa(variant: str, num_classes: int, in_chans: int, image_size: int,
                           pretrained: bool | str = False, mxa_mode: str = "sum",
                           crop: str = "faithful", roi_init: str = "default",
                           mxa_placement: str = "mixer", **kwargs: Any) -> nn.Module:
    """timm's ``variant`` (weights as ``pretrained`` asks, into the backbone) plus MXA blocks,
    placed as ``mxa_placement`` says (``"mixer"``, ours; ``"block_input"``, the authors' code).

    A weight file that already holds MXA weights (one of our checkpoints) must fit the model
    exactly; timm's own weights are adapted by timm (first conv, classifier, bias tables).
    """
    _check_choice("variant", variant, EFFICIENTVIT_VARIANTS)
    _check_choice("mxa_mode", mxa_mode, MXA_MODES)
    _check_choice("crop", crop, CROP_MODES)
    _check_choice("roi_init", roi_init, ROI_INITS)
    _check_choice("mxa_placement", mxa_placement, MXA_PLACEMENTS)
    mxa_file = _holds_mxa_weights(pretrained)
    model = create_timm_model(variant, num_classes, in_chans=in_chans, image_size=image_size,
                              pretrained=False if mxa_file else pretrained, **kwargs)
    model = add_mxa(model, mxa_mode=mxa_mode, crop=crop, roi_init=roi_init,
                    placement=mxa_placement)
    if mxa_file:
        load_exact(model, read_state_dict(pretrained), source=f"weights in {pretrained}")
    return model



# ---- looking inside a trained model (notebook 02) ---------------------------------------------
@torch.no_grad()
def block_shapes(backbone: str = "efficientvit_m5", image_size: int = 224,
                 num_classes: int = 14) -> pd.DataFrame:
    """The feature map each MXA block sees (C×H×W) at ``image_size``, and the block's size."""
    from ...models.factory import count_parameters, create_model  # the factory knows every registered model

    model = create_model(f"{backbone}_mxa", num_classes, image_size=image_size).eval()
    seen: dict[str, tuple[int, ...]] = {}

    def record(name):
        def hook(module, inputs, output):  # returns None: the output is left alone
            seen.setdefault(name, tuple(inputs[0].shape))
        return hook

    hooks = [block.register_forward_hook(record(name)) for name, block in mxa_blocks(model)]
    try:
        model(torch.zeros(1, 1, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
    return pd.DataFrame([{"block": name, "C": seen[name][1], "H": seen[name][2],
                          "W": seen[name][3], "MXA params": count_parameters(block)}
                         for name, block in mxa_blocks(model)])


def _student(model: nn.Module) -> nn.Module:
    return getattr(model, "backbone", model)


@torch.no_grad()
def roi_boxes(model: nn.Module, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Predicted normalised ROI boxes [N, 4] per MXA block for ``images`` [N, 1, S, S]."""
    student = _student(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        model(images.to(device))
    finally:
        model.train(was_training)
    return {name: block.last_boxes.cpu().numpy() for name, block in mxa_blocks(student)}


@torch.no_grad()
def box_statistics(model: nn.Module, loader, max_batches: int | None = None
                   ) -> pd.DataFrame:
    """Per block, over the loader's images: how often the crop fell back to the whole map
    (empty or inverted box), the mean area actually cropped, and the mean predicted box."""
    student = _student(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    fallback: dict[str, list] = {name: [] for name, _ in mxa_blocks(student)}
    area = {name: [] for name in fallback}
    predicted = {name: [] for name in fallback}
    try:
        for b, batch in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            model(batch["image"].to(device))
            for name, block in mxa_blocks(student):
                used = block.last_crop_boxes.float().cpu()
                whole = torch.tensor([0.0, 0.0, 1.0, 1.0])
                fallback[name].append(torch.isclose(used, whole).all(dim=1))
                area[name].append((used[:, 2] - used[:, 0]) * (used[:, 3] - used[:, 1]))
                predicted[name].append(block.last_boxes.float().cpu())
    finally:
        model.train(was_training)  # leave the model in the mode it came in
    rows = []
    for name in fallback:
        if not fallback[name]:
            continue
        boxes = torch.cat(predicted[name]).mean(dim=0).tolist()
        rows.append({"block": name, "images": int(torch.cat(fallback[name]).numel()),
                     "whole-map fallback": float(torch.cat(fallback[name]).float().mean()),
                     "mean cropped area": float(torch.cat(area[name]).mean()),
                     "mean box (x1, y1, x2, y2)": "(" + ", ".join(f"{v:.2f}" for v in boxes) + ")"})
    return pd.DataFrame(rows)


# ---- one batch through the block, the equations beside the modules (notebook 02) -------------
@torch.no_grad()
def block_input(model: nn.Module, images: torch.Tensor, block: int = 0) -> torch.Tensor:
    """The feature map (B×C×H×W) the ``block``-th MXA block of ``model`` receives for ``images``
    (caught by a forward hook; the model runs once, in evaluation mode, and is left as it came)."""
    student = _student(model)
    blocks = mxa_blocks(student)
    if not blocks:
        raise ValueError(f"{type(student).__name__} has no MXA block")
    if not -len(blocks) <= block < len(blocks):
        raise ValueError(f"block {block}: the model has {len(blocks)} MXA blocks")
    seen = []
    hook = blocks[block][1].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    was_training = model.training
    model.eval()
    try:
        model(images.to(next(model.parameters()).device))
    finally:
        hook.remove()
        model.train(was_training)
    return seen[0].detach()


def _crop_by_hand(x: torch.Tensor, boxes: torch.Tensor, crop: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The crop one image at a time, the way the equations read (not the batched matrices of
    :func:`crop_to_boxes`): faithful, the authors' ``int(box · size)``, slice and bilinear
    resize; differentiable, one bilinear sample per output pixel at the box's continuous
    coordinates (``grid_sample``). An empty or inverted box keeps the whole map. Returns the
    crops and the regions used (normalised)."""
    height, width = x.shape[-2:]
    crops, regions = [], []
    # the authors' int(box * size), on their float32 box
    pixels = torch.floor(boxes.float() * torch.tensor([width, height, width, height],
                                                      dtype=torch.float32, device=boxes.device))
    for image, box, bounds in zip(x, boxes.tolist(), pixels.long().tolist()):
        image = image[None]
        if crop == "faithful":
            x1, x2 = (min(max(v, 0), width) for v in (bounds[0], bounds[2]))
            y1, y2 = (min(max(v, 0), height) for v in (bounds[1], bounds[3]))
            if x2 <= x1 or y2 <= y1:
                x1, y1, x2, y2 = 0, 0, width, height
            crops.append(F.interpolate(image[:, :, y1:y2, x1:x2], size=(height, width),
                                       mode="bilinear", align_corners=False))
            regions.append([x1 / width, y1 / height, x2 / width, y2 / height])
            continue
        x1, y1, x2, y2 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
        if x2 <= x1 or y2 <= y1:
            x1, y1, x2, y2 = 0.0, 0.0, float(width), float(height)
        # pixel coordinate p of output i: lo + (i + ½)(hi − lo)/N − ½; grid_sample reads p at
        # (2p + 1)/N − 1, and its border padding clamps to the map as crop_to_boxes does
        columns = x1 + (torch.arange(width, dtype=x.dtype) + 0.5) * (x2 - x1) / width - 0.5
        rows = y1 + (torch.arange(height, dtype=x.dtype) + 0.5) * (y2 - y1) / height - 0.5
        grid = torch.stack(torch.meshgrid((2 * columns + 1) / width - 1,
                                          (2 * rows + 1) / height - 1, indexing="xy"), dim=-1)
        crops.append(F.grid_sample(image, grid[None].to(x.device), mode="bilinear",
                                   padding_mode="border", align_corners=False))
        regions.append([x1 / width, y1 / height, x2 / width, y2 / height])
    return torch.cat(crops), torch.tensor(regions, dtype=x.dtype, device=x.device)


def _shape(tensor: torch.Tensor) -> str:
    return "×".join(str(n) for n in tensor.shape)


@torch.no_grad()
def trace_block(block: MXABlock, x: torch.Tensor) -> pd.DataFrame:
    """MXA(x) step by step on a feature map ``x`` (B×C×H×W), each step twice: **by hand**, from
    the equations of the module docstring with the block's own weights (``F.conv2d``, a crop one
    image at a time), and by the **library**, the block's modules (the ROI head,
    :func:`crop_to_boxes`, the two CBAM modules, whose maps M_c and M_s are read off their last
    convolution, and the block's own forward for the output).

    One row per step: the tensor's shape, the mean of each version and the largest absolute
    difference between them. Both run in float64 on a copy of the block, so they agree to
    rounding (about 1e-15) whatever the features' scale.
    """
    block = copy.deepcopy(block).double().eval()
    x = x.detach().double()
    roi, channel, spatial = block.roi, block.channel_attention, block.spatial_attention

    # by hand, each line one equation
    box = torch.sigmoid(F.conv2d(F.relu(F.conv2d(x, roi.conv.weight, padding=1)),
                                 roi.box.weight, roi.box.bias)).mean(dim=(2, 3))
    crop, region = _crop_by_hand(x, box, block.crop)
    m_c = torch.sigmoid(F.conv2d(F.relu(F.conv2d(crop.mean(dim=(2, 3), keepdim=True),
                                                 channel.squeeze.weight)), channel.expand.weight))
    attended = m_c * crop
    pooled = torch.cat([attended.amax(dim=1, keepdim=True), attended.mean(dim=1, keepdim=True)], 1)
    m_s = torch.sigmoid(F.conv2d(pooled, spatial.conv.weight, padding=spatial.conv.padding))
    output = m_s * attended
    by_hand = [x, box, region, crop, m_c, attended, m_s, output]

    # the library's modules; the attention maps caught where they are made
    maps = {}
    hooks = [channel.expand.register_forward_hook(
                 lambda module, inputs, result: maps.__setitem__("m_c", torch.sigmoid(result))),
             spatial.conv.register_forward_hook(
                 lambda module, inputs, result: maps.__setitem__("m_s", torch.sigmoid(result)))]
    try:
        box_l = roi(x)
        crop_l, region_l = crop_to_boxes(x, box_l, block.crop)
        attended_l = channel(crop_l)
        spatial(attended_l)
        library = [x, box_l, region_l, crop_l, maps["m_c"], attended_l, maps["m_s"], block(x)]
    finally:
        for hook in hooks:
            hook.remove()

    rows = []
    for (step, equation), mine, theirs in zip(TRACE_STEPS, by_hand, library):
        if mine.shape != theirs.shape:
            raise RuntimeError(f"{step}: by hand {_shape(mine)}, library {_shape(theirs)}")
        rows.append({"step": step, "equation": equation, "shape": _shape(theirs),
                     "by hand (mean)": float(mine.mean()), "library (mean)": float(theirs.mean()),
                     "max |by hand − library|": float((mine - theirs).abs().max()),
                     "finite": bool(torch.isfinite(mine).all() and torch.isfinite(theirs).all())})
    return pd.DataFrame(rows)


#: The rows of :func:`trace_block`: each step of the block and its equation.
TRACE_STEPS = (
    ("input", "x, the feature map the block sees"),
    ("ROI box", "b = mean_hw σ(Conv1×1(ReLU(Conv3×3(x))))"),
    ("region cropped", "b in whole pixels; the whole map if empty or inverted"),
    ("crop", "x' = crop(x, b), resized to H×W"),
    ("channel attention", "M_c = σ(W₂ ReLU(W₁ AvgPool(x')))"),
    ("after channel attention", "x'' = M_c ⊙ x'"),
    ("spatial attention", "M_s = σ(Conv7×7([max_c x''; mean_c x'']))"),
    ("output", "MXA(x) = M_s ⊙ x''"),
)


#: Where each placement puts the block, what the block is given, and the residual it adds.
PLACEMENT_WIRING = {
    "mixer": ("ours: beside the window attention, at the block's mixer",
              "dw0 and ffn0's output, where LWA reads",
              "x ← x + LWA(x) + MXA(x)"),
    "block_input": ("the authors' code: at the block's input, before dw0",
                    "the block's input, as the block receives it",
                    "y = (x + LWA(x)) + (x + MXA(x)), then the whole block on y"),
}


@torch.no_grad()
def placement_table(backbone: str, images: torch.Tensor, num_classes: int,
                    **mxa_kwargs: Any) -> pd.DataFrame:
    """Both placements of MXA in ``backbone`` on the same ``images``, one row each: where the
    block sits, what it is given, the shape its first block sees, how many times one forward
    runs that block's window attention (once beside MXA, twice at the block input), the MXA
    blocks, parameters and output shape. The two models hold the same weights (one state dict
    fits both); ``mxa_kwargs``: ``mxa_mode``, ``crop``, ``roi_init``."""
    from ...models.factory import count_parameters, create_model

    rows, weights = [], None
    for placement in MXA_PLACEMENTS:
        model = create_model(f"{backbone}_mxa", num_classes, image_size=images.shape[-1],
                             in_chans=images.shape[1], mxa_placement=placement,
                             **mxa_kwargs).eval()
        if weights is None:
            weights = model.state_dict()
        else:
            model.load_state_dict(weights)
        name, first = mxa_blocks(model)[0]
        window_attention = model.get_submodule(name.rpartition(".mxa")[0]).m
        seen, passes = [], []
        hooks = [first.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape)),
                 window_attention.register_forward_hook(lambda *_: passes.append(1))]
        try:
            logits = model(images)
        finally:
            for hook in hooks:
                hook.remove()
        where, given, residual = PLACEMENT_WIRING[placement]
        rows.append({"placement": placement, "where": where, "MXA is given": given,
                     "residual": residual, "first block": block_label(name),
                     "shape MXA sees": "×".join(str(n) for n in seen[0]),
                     "LWA passes per block": len(passes), "MXA blocks": len(mxa_blocks(model)),
                     "parameters": count_parameters(model), "output": _shape(logits)})
    return pd.DataFrame(rows)


def _register(variant: str) -> None:
    def builder(num_classes: int, in_chans: int, image_size: int,
                pretrained: bool | str = False, **kwargs: Any) -> nn.Module:
        return build_efficientvit_mxa(variant, num_classes, in_chans, image_size,
                                      pretrained=pretrained, **kwargs)

    builder.__name__ = builder.__qualname__ = f"{variant}_mxa"
    builder.__doc__ = f"{variant} with an MXA block beside every local window attention."
    register_model(f"{variant}_mxa")(builder)


for _variant in EFFICIENTVIT_VARIANTS:
    _register(_variant)

__all__ = ["CROP_MODES", "MXA_MODES", "MXA_PLACEMENTS", "ROI_INITS", "ROIHead",
           "ChannelAttention", "SpatialAttention", "MXABlock", "MXAMixer", "MXAAtBlockInput",
           "add_mxa", "mxa_blocks", "last_boxes", "crop_to_boxes", "pixel_bounds",
           "build_efficientvit_mxa", "block_shapes", "roi_boxes", "box_statistics",
           "block_input", "trace_block", "TRACE_STEPS", "placement_table", "PLACEMENT_WIRING"]
