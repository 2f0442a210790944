"""Batch-level augmentation on tensors: runs on the batch's device, no PIL, no per-item loop.

Why batch-level: with the preprocessing cache a batch arrives as one tensor, and per-image PIL
transforms would again make the CPU the bottleneck. Here every random choice is drawn for the
whole batch at once and the geometry is a single resampling.

Geometry. Each sample gets one 2×3 affine matrix θ that maps output coordinates to input
coordinates (normalised to [-1, 1], as ``F.affine_grid`` expects). With the random-resized crop
(centre ``c``, extent ``D = diag(w, h)``), horizontal flip ``Fl = diag(±1, 1)``, rotation ``R(α)``
(counter-clockwise as displayed), isotropic scale ``s`` and translation ``t``, an output point
``v`` samples the input at

    x = c + D · Fl · R(α)ᵀ · (v − t) / s,     i.e.  θ = [M | c − M t],  M = D · Fl · R(α)ᵀ / s.

Elastic deformation (Simard et al., 2003) adds a smoothed random displacement field to that
sampling grid, so flip, rotation, scale, translation, crop and elastic cost one ``grid_sample``.
Gaussian blur uses a per-sample σ through one grouped convolution per axis. Brightness and
contrast: ``x' = (x − μ)·c + μ + b`` with μ the image mean, then clamped to [0, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F

Range = tuple[float, float]


def _as_range(value, name: str, symmetric: bool = False) -> Range:
    """``d`` → (−d, d) when ``symmetric``; a pair stays a pair; checks lo ≤ hi."""
    if isinstance(value, (int, float)):
        lo, hi = (-float(value), float(value)) if symmetric else (float(value), float(value))
    else:
        lo, hi = (float(v) for v in value)
    if lo > hi:
        raise ValueError(f"augmentation {name}: range ({lo}, {hi}) has low > high")
    return lo, hi


def _check_probability(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"augmentation {name}: probability must be in [0, 1], got {value}")
    return value


@dataclass(frozen=True)
class AugmentConfig:
    """The knobs of :class:`BatchAugment` (all fractions are of the image side)."""

    hflip: float = 0.5                    # probability of a horizontal flip
    rotate_deg: float | Range = 10.0      # d → angle ~ U(−d, d) degrees
    translate: float = 0.05               # shift ~ U(−t, t) × side, per axis
    scale: Range = (0.9, 1.1)             # isotropic zoom factor
    crop_scale: Range = (0.8, 1.0)        # random-resized-crop area fraction; (1, 1) = no crop
    crop_ratio: Range = (3 / 4, 4 / 3)    # crop aspect ratio (log-uniform), as torchvision's
    blur_p: float = 0.0                   # probability of a Gaussian blur
    blur_sigma: Range = (0.1, 2.0)        # blur σ in pixels
    elastic_p: float = 0.0                # probability of an elastic deformation
    elastic_alpha: float = 0.03           # peak displacement (fraction of side)
    elastic_sigma: float = 0.08           # smoothness of the field: Gaussian σ (fraction of side)
    brightness: float = 0.1               # additive shift ~ U(−b, b)
    contrast: float = 0.1                 # factor ~ U(1 − c, 1 + c)
    padding_mode: str = "zeros"           # what is sampled outside the image (grid_sample)


IDENTITY = dict(hflip=0.0, rotate_deg=0.0, translate=0.0, scale=(1.0, 1.0),
                crop_scale=(1.0, 1.0), blur_p=0.0, elastic_p=0.0, brightness=0.0, contrast=0.0)


def _map_image(batch, fn):
    """Apply ``fn`` to a tensor, or to ``batch['image']`` of a batch dict (shallow copy)."""
    if isinstance(batch, Mapping):
        out = dict(batch)
        out["image"] = fn(batch["image"])
        return out
    return fn(batch)


class BatchAugment:
    """Random augmentation of a float batch [B, C, H, W] (or a batch dict with ``image``).

    One ``torch.Generator`` seeded by ``seed`` draws every random choice, so a seeded run
    repeats exactly on the same device; :meth:`state_dict` lets a resumed run continue the
    stream. Disabled operations cost nothing: an identity configuration returns its input
    unchanged, and a flip-only configuration flips exactly (no resampling).
    """

    def __init__(self, hflip: float = 0.5, rotate_deg=10.0, translate: float = 0.05,
                 scale=(0.9, 1.1), crop_scale=(0.8, 1.0), crop_ratio=(3 / 4, 4 / 3),
                 blur_p: float = 0.0, blur_sigma=(0.1, 2.0), elastic_p: float = 0.0,
                 elastic_alpha: float = 0.03, elastic_sigma: float = 0.08,
                 brightness: float = 0.1, contrast: float = 0.1, padding_mode: str = "zeros",
                 seed: int | None = 0):
        self.hflip = _check_probability(hflip, "hflip")
        self.rotate = _as_range(rotate_deg, "rotate_deg", symmetric=True)
        self.translate = float(translate)
        self.scale = _as_range(scale, "scale")
        self.crop_scale = _as_range(crop_scale, "crop_scale")
        self.crop_ratio = _as_range(crop_ratio, "crop_ratio")
        self.blur_p = _check_probability(blur_p, "blur_p")
        self.blur_sigma = _as_range(blur_sigma, "blur_sigma")
        self.elastic_p = _check_probability(elastic_p, "elastic_p")
        self.elastic_alpha = float(elastic_alpha)
        self.elastic_sigma = float(elastic_sigma)
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.padding_mode = padding_mode
        if self.translate < 0 or self.brightness < 0 or self.contrast < 0:
            raise ValueError("augmentation translate, brightness and contrast must be >= 0")
        if self.scale[0] <= 0 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"augmentation scale must be > 0 and crop_scale within (0, 1]; "
                             f"got scale={self.scale}, crop_scale={self.crop_scale}")
        if self.crop_ratio[0] <= 0 or self.blur_sigma[0] <= 0 or self.elastic_sigma <= 0:
            raise ValueError("augmentation crop_ratio, blur_sigma and elastic_sigma must be > 0")
        if padding_mode not in ("zeros", "border", "reflection"):
            raise ValueError(f"augmentation padding_mode must be zeros/border/reflection, "
                             f"got {padding_mode!r}")
        self.seed = seed
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))

    # ---- construction helpers ---------------------------------------------------------------
    @classmethod
    def none(cls, seed: int | None = 0) -> "BatchAugment":
        """The identity: every operation off (returns its input unchanged)."""
        return cls(**IDENTITY, seed=seed)

    def config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this augmentation (for logs and :func:`from_config`)."""
        return dict(hflip=self.hflip, rotate_deg=self.rotate, translate=self.translate,
                    scale=self.scale, crop_scale=self.crop_scale, crop_ratio=self.crop_ratio,
                    blur_p=self.blur_p, blur_sigma=self.blur_sigma, elastic_p=self.elastic_p,
                    elastic_alpha=self.elastic_alpha, elastic_sigma=self.elastic_sigma,
                    brightness=self.brightness, contrast=self.contrast,
                    padding_mode=self.padding_mode, seed=self.seed)

    def __repr__(self) -> str:
        active = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return f"BatchAugment({active})"

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    # ---- what is switched on ----------------------------------------------------------------
    @property
    def crop_enabled(self) -> bool:
        return self.crop_scale != (1.0, 1.0)

    @property
    def affine_enabled(self) -> bool:
        """Anything besides the flip that needs resampling."""
        return (self.rotate != (0.0, 0.0) or self.translate > 0 or self.scale != (1.0, 1.0)
                or self.crop_enabled or self.elastic_p > 0)

    @property
    def is_identity(self) -> bool:
        return (self.hflip == 0 and not self.affine_enabled and self.blur_p == 0
                and self.brightness == 0 and self.contrast == 0)

    # ---- random parameters ------------------------------------------------------------------
    def _uniform(self, n: int, lo: float, hi: float, shape=()) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand((n, *shape), generator=self.generator)

    def sample_params(self, batch_size: int) -> dict[str, torch.Tensor]:
        """Every random choice for ``batch_size`` samples (CPU tensors, drawn in a fixed order)."""
        n = batch_size
        params = {"flip": torch.rand(n, generator=self.generator) < self.hflip,
                  "angle_deg": self._uniform(n, *self.rotate),
                  "translate": self._uniform(n, -self.translate, self.translate, (2,)),
                  "scale": self._uniform(n, *self.scale)}
        area = self._uniform(n, *self.crop_scale)
        log_ratio = self._uniform(n, math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]))
        ratio = log_ratio.exp()
        width = (area * ratio).sqrt().clamp(max=1.0)
        height = (area / ratio).sqrt().clamp(max=1.0)
        if not self.crop_enabled:
            width, height = torch.ones(n), torch.ones(n)
        spare = torch.stack([1 - width, 1 - height], dim=1)
        params["crop_size"] = torch.stack([width, height], dim=1)
        params["crop_center"] = (2 * torch.rand((n, 2), generator=self.generator) - 1) * spare
        params["blur"] = torch.rand(n, generator=self.generator) < self.blur_p
        params["blur_sigma"] = self._uniform(n, *self.blur_sigma)
        params["elastic"] = torch.rand(n, generator=self.generator) < self.elastic_p
        params["noise_seed"] = torch.randint(0, 2**62, (1,), generator=self.generator)
        params["brightness"] = self._uniform(n, -self.brightness, self.brightness)
        params["contrast"] = self._uniform(n, 1 - self.contrast, 1 + self.contrast)
        return params

    # ---- the operations ---------------------------------------------------------------------
    @staticmethod
    def affine_theta(params: Mapping[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        """θ [B, 2, 3] (output → input, normalised coordinates) from the sampled parameters."""
        angle = params["angle_deg"].double() * (math.pi / 180.0)
        cos, sin = angle.cos(), angle.sin()
        aspect = height / width  # rotate in pixel space, not in the squashed normalised space
        rotation_t = torch.stack([torch.stack([cos, -sin * aspect], -1),
                                  torch.stack([sin / aspect, cos], -1)], -2)
        flip = 1.0 - 2.0 * params["flip"].double()
        size = params["crop_size"].double()
        extent_flip = torch.diag_embed(torch.stack([size[:, 0] * flip, size[:, 1]], -1))
        matrix = extent_flip @ rotation_t / params["scale"].double()[:, None, None]
        shift = 2.0 * params["translate"].double()  # fraction of side → normalised units
        offset = params["crop_center"].double() - (matrix @ shift[:, :, None])[..., 0]
        return torch.cat([matrix, offset[:, :, None]], dim=2)

    def _elastic_field(self, count: int, height: int, width: int, seed: int,
                       device, dtype) -> torch.Tensor:
        """Displacements [count, H, W, 2] in normalised units with peak ``elastic_alpha``·side.

        Uniform noise smoothed by a Gaussian of σ = ``elastic_sigma``·side. The smoothing is done
        on a grid coarser by ~σ/2 and upsampled (the field has no detail finer than σ anyway),
        which keeps the cost small at 224 px.
        """
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        sigma_px = self.elastic_sigma * max(height, width)
        factor = max(1, int(sigma_px // 2))
        coarse_h, coarse_w = math.ceil(height / factor), math.ceil(width / factor)
        noise = torch.rand((count, 2, coarse_h, coarse_w), generator=generator, device=device,
                           dtype=dtype) * 2 - 1
        smooth = _gaussian_blur(noise, torch.full((count,), sigma_px / factor, device=device,
                                                  dtype=dtype))
        field = F.interpolate(smooth, size=(height, width), mode="bilinear", align_corners=False)
        peak = field.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        field = field / peak * (2.0 * self.elastic_alpha)
        return field.permute(0, 2, 3, 1)

    def warp(self, images: torch.Tensor, params: Mapping[str, torch.Tensor],
             drawn_at: tuple[int, int] | None = None) -> torch.Tensor:
        """Flip/rotate/translate/scale/crop (+ elastic) with one ``grid_sample``.

        ``drawn_at``: the (H, W) the elastic field belongs to when ``images`` are another
        resolution of those rows (:meth:`paired`); the field, in normalised units, is made at
        that size and resampled to this one, so both resolutions get the same displacement.
        """
        b, _, h, w = images.shape
        theta = self.affine_theta(params, h, w).to(device=images.device, dtype=images.dtype)
        grid = F.affine_grid(theta, [b, images.shape[1], h, w], align_corners=False)
        elastic = params["elastic"].to(images.device)
        if self.elastic_p > 0 and bool(elastic.any()):
            chosen = elastic.nonzero()[:, 0]
            fh, fw = (h, w) if drawn_at is None else drawn_at
            field = self._elastic_field(len(chosen), fh, fw, int(params["noise_seed"]),
                                        images.device, images.dtype)
            if (fh, fw) != (h, w):
                field = F.interpolate(field.permute(0, 3, 1, 2), size=(h, w), mode="bilinear",
                                      align_corners=False).permute(0, 2, 3, 1)
            grid = grid.index_add(0, chosen, field)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode=self.padding_mode,
                             align_corners=False)

    def __call__(self, batch):
        """Augment a float batch [B, C, H, W] (or a batch dict's ``image``)."""
        return _map_image(batch, self._augment)

    def paired(self, images: torch.Tensor, *views: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Augment ``images`` and, with the same random draw, ``views``: the same rows at other
        resolutions (e.g. a teacher's high-resolution copy of a student's batch).

        ``images`` come out exactly as ``self(images)`` would from the same generator state.
        Each view gets the same geometry (θ is in normalised coordinates, so it is the same
        transform at any size; the elastic field is resampled from ``images``' size), the same
        brightness/contrast, and a blur whose σ is scaled by the view's size over ``images``'.
        """
        self._check(images)
        for view in views:
            self._check(view)
            if view.shape[:2] != images.shape[:2]:
                raise ValueError(f"paired views must hold the same rows and channels as the "
                                 f"images: {tuple(view.shape)} vs {tuple(images.shape)}")
        if self.is_identity or images.shape[0] == 0:
            return (images, *views)
        params = self.sample_params(images.shape[0])
        drawn_at = tuple(images.shape[-2:])
        return (self._apply(images, params),
                *(self._apply(view, params, drawn_at) for view in views))

    @staticmethod
    def _check(images: torch.Tensor) -> None:
        if images.ndim != 4 or not images.is_floating_point():
            raise TypeError(f"BatchAugment expects a float tensor [B, C, H, W], got "
                            f"{tuple(images.shape)} {images.dtype}")

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        if self.is_identity or images.shape[0] == 0:
            return images
        return self._apply(images, self.sample_params(images.shape[0]))

    def _apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor],
               drawn_at: tuple[int, int] | None = None) -> torch.Tensor:
        """The sampled operations on ``images``; ``drawn_at``: see :meth:`paired`."""
        if drawn_at is not None and tuple(drawn_at) == tuple(images.shape[-2:]):
            drawn_at = None
        out = images
        if self.affine_enabled:
            out = self.warp(out, params, drawn_at)
        elif self.hflip > 0:
            flip = params["flip"].to(out.device)[:, None, None, None]
            out = torch.where(flip, out.flip(-1), out)
        if self.blur_p > 0 and bool(params["blur"].any()):
            chosen = params["blur"].nonzero()[:, 0].to(out.device)
            sigma = params["blur_sigma"].to(device=out.device, dtype=out.dtype)[chosen]
            if drawn_at is not None:  # σ is in pixels of the size it was drawn for
                sigma = sigma * (images.shape[-2] / drawn_at[0])
            out = out.index_copy(0, chosen, _gaussian_blur(out.index_select(0, chosen), sigma))
        if self.brightness > 0 or self.contrast > 0:
            factor = params["contrast"].to(device=out.device, dtype=out.dtype)[:, None, None, None]
            shift = params["brightness"].to(device=out.device, dtype=out.dtype)[:, None, None, None]
            mean = out.mean(dim=(1, 2, 3), keepdim=True)
            out = ((out - mean) * factor + mean + shift).clamp_(0.0, 1.0)
        return out


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each sample of [B, C, H, W] with its own σ (pixels): separable grouped convolution."""
    b, c, h, w = images.shape
    radius = max(1, math.ceil(3.0 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [B·C, k]
    mode = "reflect" if radius < min(h, w) else "replicate"
    flat = images.reshape(1, b * c, h, w)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode=mode),
                    kernel[:, None, :, None], groups=b * c)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode=mode),
                    kernel[:, None, None, :], groups=b * c)
    return flat.reshape(b, c, h, w)


def from_config(config) -> BatchAugment:
    """A :class:`BatchAugment` from a params dict (e.g. YAML); ``None``/``"none"``/``{}``/False
    give the identity. Keys left out take the class defaults; unknown keys are an error."""
    if isinstance(config, BatchAugment):
        return config
    if config is None or config is False or config == "none" or config == {}:
        return BatchAugment.none()
    if not isinstance(config, Mapping):
        raise TypeError(f"augmentation config must be a dict or 'none', got {config!r}")
    allowed = {f.name for f in fields(AugmentConfig)} | {"seed"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"unknown augmentation keys {unknown}; allowed: {sorted(allowed)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return BatchAugment(**kwargs)


def none(seed: int | None = 0) -> BatchAugment:
    """The identity augmentation (see :meth:`BatchAugment.none`)."""
    return BatchAugment.none(seed=seed)


__all__ = ["AugmentConfig", "BatchAugment", "IDENTITY", "from_config", "none"]


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, S, S] → [B, C, size, size], bilinear with antialiasing (as xrv resizes)."""
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"expected square images [B, C, S, S], got {tuple(images.shape)}")
    if images.shape[-1] == int(size):
        return images
    return F.interpolate(images, size=(int(size), int(size)), mode="bilinear",
                         align_corners=False, antialias=True)
