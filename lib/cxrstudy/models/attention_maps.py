"""Attention maps read out of timm ViTs, and their alignment between token grids (MLCAK).

MLCAK (arXiv 2405.13370) distils a 224-px ViT teacher into low-resolution ViT students through
their attention. For one block with H heads, the map is the head average of the softmax
attention probabilities

    A = (1/H) Σ_i softmax(Q_i K_iᵀ / √d)            [B, T, T],  rows (queries) sum to 1,

with T = P prefix tokens (CLS; DeiT-distilled models add a distillation token) + h·w patch
tokens.

Same grid, token to token. A student at ``image_size`` with ``patch_size_for(image_size)``
keeps the teacher's 14×14 grid (224/16 = 112/8 = 56/4 = 28/2 = 14), so A_s and A_t are
compared entry by entry, the CLS row and column included: the CLS row is where the classifier
reads the image from, which is what the teacher should pass on.

Different grids (``align="interpolate"``). The *teacher's* map (the target, no gradient) is
resampled to the student's layout; prefix tokens are kept as they are and only the patch axes
are resized, bilinearly over the 2-D grid:

* keys — each row's patch part [h·w] is resized as an image; the resized part is rescaled so
  that it holds the same attention mass as before (so every row still sums to 1 and the
  prefix-vs-patch split of attention is unchanged);
* queries — the patch rows are resized as images over the query grid; bilinear weights
  (``align_corners=False``) are convex, so the row sums stay 1 without rescaling.

Prefix tokens. ``prefix="keep"`` (default) needs the same number of prefix tokens on both
sides; ``prefix="drop"`` compares only the patch→patch block, each row renormalised to 1
(attention among patches given that a patch is attended), which also pairs a DeiT-distilled
teacher (2 prefix tokens) with a plain student (1).

Reading the maps. timm's ``Attention`` normally calls ``F.scaled_dot_product_attention``
(``fused_attn = True``), which never forms A. :class:`AttentionRecorder` switches the chosen
blocks to timm's explicit path (``fused_attn = False``: the same function, computed as
``softmax(q·scale @ kᵀ)``) and catches the probabilities as they enter ``attn_drop`` (a
forward pre-hook, so before attention dropout); on exit it restores the flags and removes the
hooks. Checked on timm 1.0.31.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

ALIGN_MODES = ("exact", "interpolate")
PREFIX_MODES = ("keep", "drop")


def patch_size_for(image_size: int, grid: int = 14) -> int:
    """Patch size that gives a ``grid × grid`` token grid at ``image_size`` (224→16, 112→8,
    56→4, 28→2 for 14), so student and teacher attention maps align token to token."""
    image_size, grid = int(image_size), int(grid)
    if grid < 1 or image_size < 1:
        raise ValueError(f"image_size and grid must be positive, got {image_size} and {grid}")
    if image_size % grid:
        raise ValueError(f"image_size {image_size} is not divisible by grid {grid}: no patch size "
                         f"gives a {grid}×{grid} token grid (use a multiple of {grid}, or "
                         f"align='interpolate' with another grid)")
    return image_size // grid


class TokenLayout(NamedTuple):
    """How a ViT's tokens are laid out: ``prefix`` leading tokens, then a ``grid`` of patches."""

    prefix: int
    grid: tuple[int, int]

    @property
    def tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]


def token_layout(model: nn.Module) -> TokenLayout:
    """The layout of the first timm ViT inside ``model`` (wrappers such as DDP,
    :class:`~cxrstudy.methods.mlcak.model.MultiTaskClassifier` are looked through)."""
    for module in model.modules():
        grid = getattr(getattr(module, "patch_embed", None), "grid_size", None)
        if grid is not None:
            prefix = int(getattr(module, "num_prefix_tokens", 0))
            return TokenLayout(prefix, (int(grid[0]), int(grid[1])))
    raise TypeError(f"{type(model).__name__} has no timm ViT patch embedding (patch_embed."
                    f"grid_size); attention maps are read from timm VisionTransformers")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """timm attention modules of ``model`` in block order (what layer indices count)."""
    found = [m for m in model.modules()
             if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module)
             and hasattr(m, "qkv") and hasattr(m, "num_heads")]
    if not found:
        raise TypeError(f"{type(model).__name__} has no timm Attention modules (qkv, attn_drop, "
                        f"fused_attn); attention maps are read from timm VisionTransformers")
    return found


def normalise_layers(layers: Sequence[int], depth: int) -> list[int]:
    """Layer indices as non-negative block numbers (negative ones count from the end)."""
    out = []
    for layer in layers:
        index = int(layer) + depth if int(layer) < 0 else int(layer)
        if not 0 <= index < depth:
            raise IndexError(f"layer {layer} is outside the model's {depth} attention blocks")
        out.append(index)
    return out


class AttentionRecorder:
    """Context manager catching the post-softmax attention of chosen blocks of a timm ViT.

    >>> with AttentionRecorder(model, [3, 7, 11]) as recorder:
    ...     logits = model(images)
    >>> recorder.maps[11]        # [B, T, T] head-averaged, part of the autograd graph

    ``maps[layer]`` holds the latest forward's map (``average_heads=False``: [B, H, T, T]).
    Gradients flow through the maps, so a loss on the student's maps trains its attention.
    Outside the ``with`` block the model is exactly as before (fused flags, no hooks).
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], average_heads: bool = True):
        modules = attention_modules(model)
        self.layers = normalise_layers(layers, len(modules))
        self.modules = {layer: modules[layer] for layer in self.layers}
        self.average_heads = bool(average_heads)
        self.layout = token_layout(model)
        self.maps: dict[int, torch.Tensor] = {}
        self._handles: list = []
        self._fused: dict[int, bool] = {}

    def _hook(self, layer: int):
        def catch(module, args):
            probs = args[0]
            self.maps[layer] = probs.mean(dim=1) if self.average_heads else probs
        return catch

    def __enter__(self) -> "AttentionRecorder":
        if self._handles:
            raise RuntimeError("this AttentionRecorder is already recording")
        self.maps = {}
        for layer, module in self.modules.items():
            self._fused[layer] = module.fused_attn
            module.fused_attn = False
            self._handles.append(module.attn_drop.register_forward_pre_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer, fused in self._fused.items():
            self.modules[layer].fused_attn = fused
        self._fused = {}

    def ordered(self) -> list[torch.Tensor]:
        """The maps in the order the layers were given (KeyError if a block did not run)."""
        missing = [layer for layer in self.layers if layer not in self.maps]
        if missing:
            raise KeyError(f"no attention recorded for layers {missing}: run the model inside "
                           f"the recorder's with-block")
        return [self.maps[layer] for layer in self.layers]


# ---- alignment ----------------------------------------------------------------------------------
def _check_layout(maps: torch.Tensor, layout: TokenLayout) -> None:
    if maps.ndim != 3 or maps.shape[-1] != maps.shape[-2] or maps.shape[-1] != layout.tokens:
        raise ValueError(f"attention maps {tuple(maps.shape)} do not fit the layout {layout} "
                         f"({layout.tokens} tokens): expected [B, T, T]")


def drop_prefix(maps: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Patch→patch block of [B, T, T] maps, rows renormalised to sum 1."""
    _check_layout(maps, layout)
    block = maps[:, layout.prefix:, layout.prefix:]
    return block / block.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(block.dtype).tiny)


def _resize_last_axis(values: torch.Tensor, grid: tuple[int, int],
                      new_grid: tuple[int, int]) -> torch.Tensor:
    """[..., h·w] read as h×w images → [..., h'·w'] (bilinear, align_corners=False)."""
    lead = values.shape[:-1]
    images = values.reshape(-1, 1, *grid)
    resized = F.interpolate(images, size=new_grid, mode="bilinear", align_corners=False)
    return resized.reshape(*lead, new_grid[0] * new_grid[1])


def resize_attention(maps: torch.Tensor, source: TokenLayout, grid: tuple[int, int]
                     ) -> torch.Tensor:
    """[B, T, T] maps on ``source`` → the same prefix tokens with a ``grid`` of patches.

    Rows keep their sums (module docstring: keys rescaled to their former patch mass, queries
    resized with convex bilinear weights).
    """
    _check_layout(maps, source)
    grid = (int(grid[0]), int(grid[1]))
    if grid == tuple(source.grid):
        return maps
    p = source.prefix
    keys = maps[..., p:]
    mass = keys.sum(dim=-1, keepdim=True)
    keys = _resize_last_axis(keys, source.grid, grid)
    keys = keys * (mass / keys.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(keys.dtype).tiny))
    rows = torch.cat([maps[..., :p], keys], dim=-1)                   # [B, T, T']
    queries = _resize_last_axis(rows[:, p:].transpose(1, 2), source.grid, grid).transpose(1, 2)
    return torch.cat([rows[:, :p], queries], dim=1)                   # [B, T', T']


def check_alignment(teacher_layout: TokenLayout, student_layout: TokenLayout,
                    align: str = "interpolate", prefix: str = "keep") -> None:
    """Raise when the two layouts cannot be compared under ``align`` and ``prefix``."""
    if align not in ALIGN_MODES:
        raise ValueError(f"align must be one of {ALIGN_MODES}, got {align!r}")
    if prefix not in PREFIX_MODES:
        raise ValueError(f"prefix must be one of {PREFIX_MODES}, got {prefix!r}")
    if prefix == "keep" and teacher_layout.prefix != student_layout.prefix:
        raise ValueError(f"teacher has {teacher_layout.prefix} prefix tokens, student "
                         f"{student_layout.prefix}: use prefix='drop' to compare patch tokens only")
    if tuple(teacher_layout.grid) != tuple(student_layout.grid) and align == "exact":
        raise ValueError(f"token grids differ (teacher {teacher_layout.grid}, student "
                         f"{student_layout.grid}): pick patch sizes with patch_size_for, or "
                         f"align='interpolate'")


def align_attention(teacher_maps: torch.Tensor, teacher_layout: TokenLayout,
                    student_layout: TokenLayout, align: str = "interpolate",
                    prefix: str = "keep") -> torch.Tensor:
    """The teacher's maps in the student's layout (the student's maps need
    :func:`student_view` with the same ``prefix``). See the module docstring."""
    check_alignment(teacher_layout, student_layout, align, prefix)
    _check_layout(teacher_maps, teacher_layout)
    maps, layout = teacher_maps, teacher_layout
    if prefix == "drop":
        maps, layout = drop_prefix(maps, layout), TokenLayout(0, tuple(layout.grid))
    return resize_attention(maps, layout, student_layout.grid)


def student_view(student_maps: torch.Tensor, student_layout: TokenLayout,
                 prefix: str = "keep") -> torch.Tensor:
    """The student's maps as compared: unchanged, or the renormalised patch block."""
    if prefix not in PREFIX_MODES:
        raise ValueError(f"prefix must be one of {PREFIX_MODES}, got {prefix!r}")
    _check_layout(student_maps, student_layout)
    return drop_prefix(student_maps, student_layout) if prefix == "drop" else student_maps


def minmax_per_image(maps: torch.Tensor) -> torch.Tensor:
    """Each map [N, ...] rescaled to [0, 1] on its own (min → 0, max → 1; a flat map → 0), so
    maps of different models or images can share one colour scale."""
    maps = maps.float()
    flat = maps.flatten(1)
    shape = (-1,) + (1,) * (maps.dim() - 1)
    low, high = flat.min(dim=1).values.view(shape), flat.max(dim=1).values.view(shape)
    return (maps - low) / (high - low).clamp_min(1e-12)


@torch.no_grad()
def cls_attention(model: nn.Module, images: torch.Tensor, layer: int = -1):
    """Head-averaged attention of the CLS token over the patches at ``layer``, as [N, g, g]
    maps (numpy) rescaled to [0, 1] per image (the picture of "where the model looks")."""
    model.eval()
    device = next(model.parameters()).device
    layout = token_layout(model)
    with AttentionRecorder(model, [layer]) as recorder:
        model(images.to(device))
        maps = recorder.ordered()[0]
    cls_row = maps[:, 0, layout.prefix:].float().cpu().reshape(-1, *layout.grid)
    return minmax_per_image(cls_row).numpy()


__all__ = ["patch_size_for", "TokenLayout", "token_layout", "attention_modules",
           "normalise_layers", "AttentionRecorder", "drop_prefix", "resize_attention",
           "check_alignment", "align_attention", "student_view", "ALIGN_MODES", "PREFIX_MODES",
           "minmax_per_image", "cls_attention"]
