"""Synthetic radiograph-like pixels: smooth, seeded by the image id, cheap to compress.

The rehearsal needs files of each release's type and size class, not anatomy: a chest-shaped
phantom (two darker lung fields, a brighter mediastinum and a slow gradient) drawn from the image
id, so the same id always gives the same pixels and reruns of the generator are byte-identical.
A little noise keeps the pixels from being piecewise constant; it is quantised coarsely so PNG,
JPEG and deflated DICOM files stay small.
"""
from __future__ import annotations

import hashlib

import numpy as np


def seed_for(image_id: str, salt: str = "") -> int:
    """A stable 64-bit seed from an image id (Python's ``hash`` changes between runs)."""
    digest = hashlib.sha256(f"{salt}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def phantom(height: int, width: int, image_id: str, levels: int = 256) -> np.ndarray:
    """A [height, width] float32 phantom in [0, 1], quantised to ``levels`` grey levels."""
    rng = np.random.default_rng(seed_for(image_id, "phantom"))
    y = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    tilt = rng.uniform(-0.15, 0.15)
    image = 0.55 + 0.15 * (y * np.cos(tilt) + x * np.sin(tilt))
    for side in (-1.0, 1.0):  # the lung fields, darker (more air)
        cx = side * rng.uniform(0.35, 0.5)
        cy, rx, ry = rng.uniform(-0.15, 0.05), rng.uniform(0.22, 0.32), rng.uniform(0.45, 0.6)
        inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
        image = image - 0.3 * np.clip(1.0 - inside, 0.0, 1.0) ** 0.5
    spot = ((x - rng.uniform(-0.5, 0.5)) ** 2 + (y - rng.uniform(-0.4, 0.4)) ** 2) \
        / rng.uniform(0.005, 0.03)
    image = image + rng.uniform(0.05, 0.2) * np.exp(-spot)  # an opacity, somewhere
    image = image + 0.1 * np.exp(-(x / 0.12) ** 2) * (y > -0.6)  # the mediastinum
    coarse = rng.normal(0.0, 0.02, size=(-(-height // 64), -(-width // 64)))
    image = image + np.kron(coarse, np.ones((64, 64)))[:height, :width].astype(np.float32)
    image = np.clip(image, 0.0, 1.0)
    return (np.round(image * (levels - 1)) / (levels - 1)).astype(np.float32)


def blocky_phantom(height: int, width: int, image_id: str, levels: int = 256,
                   block: int = 4) -> np.ndarray:
    """:func:`phantom` drawn at 1/``block`` resolution and repeated: the same file size class
    for a sixteenth of the work (and smaller files)."""
    small = phantom(-(-height // block), -(-width // block), image_id, levels=levels)
    return np.kron(small, np.ones((block, block), dtype=np.float32))[:height, :width]


def phantom_uint8(height: int, width: int, image_id: str, block: int = 1) -> np.ndarray:
    image = blocky_phantom(height, width, image_id, block=block) if block > 1 else \
        phantom(height, width, image_id)
    return np.round(image * 255).astype(np.uint8)


__all__ = ["phantom", "blocky_phantom", "phantom_uint8", "seed_for"]
