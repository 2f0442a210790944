"""A procedural chest-radiograph phantom: learnable, labelled, boxed, and free of patients.

It exists so every notebook and test can run end to end without real data: the pipeline,
losses, metrics and localisation code see images with the same structure as a chest X-ray
(dark lung fields, a bright heart and spine, curved ribs) and findings with a visible,
class-specific pattern at a recorded place.

Each image is a pure function of ``(seed, index)``: its anatomy comes from its patient
(``index % n_patients``, so images of one patient share lung/heart geometry and patient
leakage across splits matters as it does in real data), its findings and noise from the
image. Nothing is stored; ``read_image`` renders at ``image_size`` on every call and returns
the same pixels each time. Geometry lives in a 256×256 reference space (``REFERENCE``) and
boxes are recorded there (``space_w = space_h = 256``).

Findings are drawn independently per class with NIH ChestX-ray14-like prevalence, raised
to at least 4% so tiny runs see positives of every class. Patterns (simple on purpose):
nodule = small bright disc, mass = larger disc, effusion = bright fluid level at a lung base,
pneumothorax = dark rim along the outer lung edge, cardiomegaly = wider heart, atelectasis =
a bright plate-like band, infiltration = patchy blobs, consolidation = a dense homogeneous
patch, pneumonia = a textured lower-zone patch, edema = bilateral perihilar haze, emphysema =
larger darker lungs, fibrosis = reticular lines, pleural thickening = a bright apical band
along the chest wall, hernia = a round retrocardiac density with an air bubble. Classes
with other names get a striped square whose orientation depends on the name. Contrast
varies per lesion and image noise is added, so small findings at low resolution are hard.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from .base import BOX_COLUMNS, CXRDataset
from .labels import NIH_CLASSES, canonical

REFERENCE = 256  # geometry and boxes live in a REFERENCE x REFERENCE pixel space
GENERATOR_VERSION = 1  # bump when the rendering changes, so caches are not reused

# ChestX-ray14 prevalence of each finding (share of the 112,120 images).
NIH_PREVALENCE = {
    "atelectasis": 0.103, "cardiomegaly": 0.025, "effusion": 0.119, "infiltration": 0.177,
    "mass": 0.052, "nodule": 0.056, "pneumonia": 0.013, "pneumothorax": 0.047,
    "consolidation": 0.042, "edema": 0.021, "emphysema": 0.022, "fibrosis": 0.015,
    "pleural thickening": 0.030, "hernia": 0.002,
}
MIN_PREVALENCE, MAX_PREVALENCE, DEFAULT_PREVALENCE = 0.04, 0.25, 0.10

# Random streams, so that labels, anatomy, lesions and noise never share draws.
_ANATOMY, _LABELS, _LESION, _NOISE, _IMAGE = 1, 2, 3, 4, 5


def prevalence(class_name: str) -> float:
    p = NIH_PREVALENCE.get(canonical(class_name), DEFAULT_PREVALENCE)
    return float(np.clip(1.5 * p, MIN_PREVALENCE, MAX_PREVALENCE))


def _rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), stream, *map(int, keys)])


def _name_number(name: str) -> int:
    """A stable integer from a class name (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(canonical(name).encode()).digest()[:4], "little")


@dataclass
class Lesion:
    kind: str       # pattern family
    label: str      # class name
    params: dict
    box: tuple      # x, y, w, h in reference pixels


@dataclass
class Scene:
    """Everything needed to render one image (reference-space units)."""
    body: tuple                 # cx, cy, ax, ay
    lungs: list                 # [(cx, cy, ax, ay)] right (image left), left
    heart: tuple                # cx, cy, ax, ay
    rib_phase: float
    rib_gap: float
    shift: tuple                # dx, dy of this acquisition
    gain: float
    offset: float
    lung_darkness: float
    lesions: list = field(default_factory=list)


class SyntheticDataset(CXRDataset):
    """Deterministic phantom chest X-rays (``synthetic=True``; never real data).

    ``n_images`` images of ``n_patients`` patients (default ``n_images // 2``), labels over
    ``classes`` (default NIH_CLASSES; a "No Finding"-like class is 1 exactly when no other
    class is), all fixed by ``seed``. ``root`` is accepted for the common adapter signature
    and ignored.
    """

    name = "synthetic"
    synthetic = True

    def __init__(self, root=None, image_size: int = 224, strict: bool = False,
                 n_images: int = 256, n_patients: int | None = None,
                 classes: Sequence[str] | None = None, seed: int = 0):
        super().__init__(image_size=image_size, strict=strict)
        self.n_images = int(n_images)
        self.n_patients = self.n_images // 2 if n_patients is None else int(n_patients)
        if self.n_images < 1:
            raise ValueError(f"n_images must be positive, got {n_images}")
        if not 1 <= self.n_patients <= self.n_images:
            raise ValueError(f"n_patients must lie in [1, n_images={self.n_images}], "
                             f"got {self.n_patients}")
        self.classes = list(NIH_CLASSES if classes is None else classes)
        if len({canonical(c) for c in self.classes}) != len(self.classes):
            raise ValueError(f"classes name one finding twice: {self.classes}")
        self.seed = int(seed)

        scenes = [self.scene(i) for i in range(self.n_images)]
        self.labels = np.array([self._label_vector(s) for s in scenes], dtype=np.float32)
        patients = np.arange(self.n_images) % self.n_patients
        sexes = [("F", "M")[int(_rng(self.seed, _ANATOMY, p, 1).integers(2))] for p in patients]
        ages = [float(_rng(self.seed, _ANATOMY, p, 2).integers(20, 86)) for p in patients]
        self.records = pd.DataFrame({
            "image_id": [f"synthetic_{i:06d}" for i in range(self.n_images)],
            "patient_id": [f"synthetic_p{p:05d}" for p in patients],
            "view": "PA", "sex": sexes, "age": ages,
            "phantom_index": np.arange(self.n_images),
        })
        box_rows = [(f"synthetic_{i:06d}", lesion.label, *_clip_box(lesion.box),
                     REFERENCE, REFERENCE)
                    for i, scene in enumerate(scenes) for lesion in scene.lesions]
        self.boxes = pd.DataFrame(box_rows, columns=list(BOX_COLUMNS))
        self.validate()

    # ---- scene: labels and geometry ---------------------------------------------------
    def _positive(self, index: int) -> list[str]:
        rng = _rng(self.seed, _LABELS, index)
        draws = rng.random(len(self.classes))
        return [c for c, u in zip(self.classes, draws)
                if canonical(c) != "no finding" and u < prevalence(c)]

    def _label_vector(self, scene: Scene) -> list[float]:
        positive = {lesion.label for lesion in scene.lesions}
        return [float(not positive) if canonical(c) == "no finding" else float(c in positive)
                for c in self.classes]

    def scene(self, index: int) -> Scene:
        """Anatomy of the image's patient, this acquisition's shift/exposure, its lesions."""
        patient = index % self.n_patients
        anat = _rng(self.seed, _ANATOMY, patient, 0)
        img = _rng(self.seed, _IMAGE, index)
        dx, dy = img.uniform(-5, 5, size=2)
        lung_ax, lung_ay = anat.uniform(30, 36), anat.uniform(62, 74)
        lung_gap = anat.uniform(40, 48)
        lung_cy = anat.uniform(112, 122)
        lungs = [(128 - lung_gap + dx, lung_cy + dy, lung_ax, lung_ay),
                 (128 + lung_gap + dx, lung_cy + dy, lung_ax * anat.uniform(0.92, 1.02),
                  lung_ay * anat.uniform(0.95, 1.02))]
        heart = (128 + anat.uniform(4, 12) + dx, lung_cy + lung_ay * 0.55 + dy,
                 anat.uniform(26, 31), anat.uniform(26, 32))
        scene = Scene(body=(128 + dx, 138 + dy, anat.uniform(104, 114), anat.uniform(116, 124)),
                      lungs=lungs, heart=heart, rib_phase=anat.uniform(0, 1),
                      rib_gap=anat.uniform(17, 21), shift=(dx, dy),
                      gain=img.uniform(0.88, 1.12), offset=img.uniform(-0.04, 0.04),
                      lung_darkness=anat.uniform(0.24, 0.30))
        for label in self._positive(index):
            rng = _rng(self.seed, _LESION, index, _name_number(label))
            scene.lesions.append(self._lesion(label, rng, scene))
        return scene

    def _lesion(self, label: str, rng: np.random.Generator, scene: Scene) -> Lesion:
        key = canonical(label)
        side = int(rng.integers(2))
        lcx, lcy, lax, lay = scene.lungs[side]
        outward = -1.0 if side == 0 else 1.0  # image-left lung's outer edge is to the left
        strength = rng.uniform(0.55, 1.0)

        def inside_lung(scale=0.6):
            t, r = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 1)) * scale
            return lcx + r * lax * np.cos(t), lcy + r * lay * np.sin(t)

        def disc_box(cx, cy, r):
            return (cx - r, cy - r, 2 * r, 2 * r)

        if key in ("nodule", "mass"):
            r = rng.uniform(4, 7) if key == "nodule" else rng.uniform(12, 19)
            cx, cy = inside_lung(0.55)
            return Lesion(key, label, {"cx": cx, "cy": cy, "r": r, "a": 0.38 * strength},
                          disc_box(cx, cy, r))
        if key == "effusion":
            depth = rng.uniform(0.35, 0.7) * lay
            level = lcy + lay - depth
            return Lesion(key, label, {"side": side, "level": level, "a": 0.30 * strength},
                          (lcx - lax, level, 2 * lax, lcy + lay - level))
        if key == "pneumothorax":
            width = rng.uniform(0.25, 0.4)
            top = lcy - lay
            return Lesion(key, label, {"side": side, "width": width, "a": 0.16 * strength},
                          (lcx + (outward > 0) * lax * (1 - 2 * width) - (outward < 0) * lax,
                           top, 2 * width * lax, 1.6 * lay))
        if key == "cardiomegaly":
            factor = rng.uniform(1.35, 1.6)
            hcx, hcy, hax, hay = scene.heart
            return Lesion(key, label, {"factor": factor},
                          (hcx - hax * factor, hcy - hay, 2 * hax * factor, 2 * hay))
        if key == "atelectasis":
            cx, cy = lcx + rng.uniform(-0.3, 0.3) * lax, lcy + rng.uniform(0.2, 0.55) * lay
            length, angle = rng.uniform(28, 44), rng.uniform(-0.35, 0.35)
            thick = rng.uniform(3, 5)
            hx, hy = abs(np.cos(angle)) * length / 2 + thick, abs(np.sin(angle)) * length / 2 + thick
            return Lesion(key, label, {"cx": cx, "cy": cy, "length": length, "angle": angle,
                                       "thick": thick, "a": 0.32 * strength},
                          (cx - hx, cy - hy, 2 * hx, 2 * hy))
        if key in ("infiltration", "pneumonia", "consolidation", "fibrosis"):
            cx, cy = inside_lung(0.45)
            if key == "pneumonia":
                cy = lcy + rng.uniform(0.15, 0.45) * lay
            rx, ry = rng.uniform(14, 22), rng.uniform(14, 24)
            params = {"cx": cx, "cy": cy, "rx": rx, "ry": ry,
                      "texture": int(rng.integers(2**31)),
                      "a": {"infiltration": 0.26, "pneumonia": 0.30, "consolidation": 0.34,
                            "fibrosis": 0.28}[key] * strength,
                      "blobs": rng.uniform(-1, 1, size=(8, 2)).tolist()}
            return Lesion(key, label, params, (cx - rx, cy - ry, 2 * rx, 2 * ry))
        if key == "edema":
            spread = rng.uniform(18, 26)
            (c0, y0, _, _), (c1, _, _, _) = scene.lungs
            x0, x1 = c0 + 0.35 * (128 - c0), c1 - 0.35 * (c1 - 128)
            return Lesion(key, label, {"x0": x0, "x1": x1, "cy": y0 + 5, "s": spread,
                                       "a": 0.20 * strength},
                          (x0 - 2.5 * spread, y0 + 5 - 2.5 * spread,
                           x1 - x0 + 5 * spread, 5 * spread))
        if key == "emphysema":
            (c0, y0, ax0, ay0), (c1, _, ax1, ay1) = scene.lungs
            grow = rng.uniform(1.08, 1.15)
            return Lesion(key, label, {"grow": grow, "a": 0.10 * strength},
                          (c0 - ax0 * grow, y0 - max(ay0, ay1) * grow,
                           c1 + ax1 * grow - (c0 - ax0 * grow), 2 * max(ay0, ay1) * grow))
        if key == "pleural thickening":
            top = lcy - lay * rng.uniform(0.85, 0.95)
            height, thick = rng.uniform(30, 50), rng.uniform(4, 7)
            ys = np.linspace(top, top + height, 64)
            edges = lcx + outward * lax * np.sqrt(np.clip(1 - ((ys - lcy) / lay) ** 2, 0, 1))
            x0, x1 = edges.min() - thick / 2, edges.max() + thick / 2
            return Lesion(key, label, {"side": side, "top": top, "height": height,
                                       "thick": thick, "a": 0.30 * strength},
                          (x0, top, x1 - x0, height))
        if key == "hernia":
            hcx, hcy, hax, hay = scene.heart
            cx, cy, r = hcx - 6, hcy + hay * 0.45, rng.uniform(13, 18)
            return Lesion(key, label, {"cx": cx, "cy": cy, "r": r, "a": 0.26 * strength},
                          disc_box(cx, cy, r))
        # any other class: a striped square whose orientation comes from the class name
        cx, cy = inside_lung(0.5)
        half = rng.uniform(8, 12)
        return Lesion("generic", label, {"cx": cx, "cy": cy, "half": half,
                                         "angle": (_name_number(label) % 180) * np.pi / 180,
                                         "a": 0.28 * strength},
                      (cx - half, cy - half, 2 * half, 2 * half))

    # ---- rendering ----------------------------------------------------------------------
    def read_image(self, i: int) -> np.ndarray:
        """Render image ``i`` at ``image_size`` (pure: same pixels on every call)."""
        return self.render(int(self.records.at[i, "phantom_index"]), self.image_size)

    def render(self, index: int, size: int) -> np.ndarray:
        """Image ``index`` (its position among the ``n_images``) at ``size`` pixels."""
        return self.render_scene(self.scene(index), index, size)

    def render_scene(self, scene: Scene, index: int, size: int) -> np.ndarray:
        """Rasterise a scene; ``index`` fixes the noise. Edit ``scene.lesions`` to ablate."""
        coords = (np.arange(size, dtype=np.float32) + 0.5) * (REFERENCE / size)
        xx, yy = np.meshgrid(coords, coords)
        soft = max(0.5, 0.5 * REFERENCE / size)  # logistic edge scale: ~2 output px wide
        kinds = {lesion.kind: lesion for lesion in scene.lesions}

        lungs = list(scene.lungs)
        darkness = scene.lung_darkness
        if "emphysema" in kinds:
            grow = kinds["emphysema"].params["grow"]
            lungs = [(cx, cy, ax * grow, ay * grow) for cx, cy, ax, ay in lungs]
            darkness += kinds["emphysema"].params["a"]
        heart = scene.heart
        if "cardiomegaly" in kinds:
            heart = (heart[0], heart[1], heart[2] * kinds["cardiomegaly"].params["factor"],
                     heart[3])

        body = _ellipse(xx, yy, *scene.body, soft * 3)
        lung_masks = [_ellipse(xx, yy, *lung, soft) for lung in lungs]
        lung = np.maximum(*lung_masks)
        image = 0.04 + 0.42 * body
        image -= darkness * lung
        image += 0.30 * _ellipse(xx, yy, *heart, soft)
        image += 0.14 * body * np.exp(-((xx - 128 - scene.shift[0]) / 9.0) ** 2)  # spine
        ribs = np.sin(2 * np.pi * ((yy - 0.0018 * (xx - 128) ** 2) / scene.rib_gap
                                   + scene.rib_phase))
        image += 0.09 * body * (ribs > 0.55) * (np.abs(xx - 128) > 14)

        for lesion in scene.lesions:
            image += _draw(lesion, xx, yy, soft, lungs, lung_masks)

        noise = _rng(self.seed, _NOISE, index, size).normal(0, 0.025, size=image.shape)
        image = image * scene.gain + scene.offset + noise
        return np.clip(image * 255.0, 0, 255).astype(np.uint8)

    def cache_key(self) -> str:
        digest = hashlib.sha256("|".join(self.classes).encode()).hexdigest()[:12]
        return (f"synthetic:v{GENERATOR_VERSION}:seed={self.seed}:patients={self.n_patients}:"
                f"classes={digest}")


def _clip_box(box) -> tuple[float, float, float, float]:
    """A box cut to the reference frame."""
    x, y, w, h = (float(v) for v in box)
    x0, y0 = min(max(x, 0.0), REFERENCE), min(max(y, 0.0), REFERENCE)
    x1, y1 = min(max(x + w, 0.0), REFERENCE), min(max(y + h, 0.0), REFERENCE)
    return x0, y0, x1 - x0, y1 - y0


def _ellipse(xx, yy, cx, cy, ax, ay, soft):
    """Soft-edged filled ellipse in [0, 1] (edge width ``soft`` reference pixels)."""
    r = np.sqrt(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2)
    # Distance to the outline ≈ (r - 1) / |grad r|, so the edge is equally soft all around.
    gradient = np.sqrt(((xx - cx) / ax ** 2) ** 2 + ((yy - cy) / ay ** 2) ** 2) / \
        np.maximum(r, 1e-6)
    distance = (r - 1.0) / np.maximum(gradient, 1e-6)
    return 1.0 / (1.0 + np.exp(np.clip(distance / soft, -30, 30)))


def _draw(lesion: Lesion, xx, yy, soft, lungs, lung_masks) -> np.ndarray:
    """The additive intensity of one lesion (global ones such as emphysema act in render)."""
    p, kind = lesion.params, lesion.kind
    if kind in ("nodule", "mass"):
        return p["a"] * _ellipse(xx, yy, p["cx"], p["cy"], p["r"], p["r"], soft)
    if kind == "effusion":
        below = 1.0 / (1.0 + np.exp(np.clip(-(yy - p["level"]) / soft, -30, 30)))
        return p["a"] * lung_masks[p["side"]] * below
    if kind == "pneumothorax":
        cx, cy, ax, ay = lungs[p["side"]]
        outward = -1.0 if p["side"] == 0 else 1.0
        rim = (outward * (xx - cx) / ax) > (1 - 2 * p["width"])
        return -p["a"] * lung_masks[p["side"]] * rim * (yy < cy + 0.6 * ay)
    if kind == "atelectasis":
        c, s = np.cos(p["angle"]), np.sin(p["angle"])
        along = (xx - p["cx"]) * c + (yy - p["cy"]) * s
        across = -(xx - p["cx"]) * s + (yy - p["cy"]) * c
        band = (np.abs(along) < p["length"] / 2) * np.exp(-(across / (p["thick"] / 2)) ** 2)
        return p["a"] * band
    if kind in ("infiltration", "pneumonia", "consolidation", "fibrosis"):
        region = _ellipse(xx, yy, p["cx"], p["cy"], p["rx"], p["ry"], soft * 2)
        if kind == "consolidation":
            return p["a"] * region
        if kind == "fibrosis":
            lines = (np.abs(np.sin(xx / 2.2 + 0.4 * np.sin(yy / 7.0))) > 0.85) | \
                    (np.abs(np.sin(yy / 2.6 + 0.4 * np.sin(xx / 5.0))) > 0.85)
            return p["a"] * region * lines
        blobs = np.zeros_like(xx)
        for bx, by in p["blobs"]:
            blobs += np.exp(-(((xx - p["cx"] - bx * p["rx"] * 0.7) ** 2
                               + (yy - p["cy"] - by * p["ry"] * 0.7) ** 2) / (2 * 4.5 ** 2)))
        texture = np.clip(blobs, 0, 1)
        if kind == "pneumonia":
            texture = 0.5 * region + 0.5 * texture
        return p["a"] * region * texture
    if kind == "edema":
        haze = np.exp(-((xx - p["x0"]) ** 2 + (yy - p["cy"]) ** 2) / (2 * p["s"] ** 2)) + \
            np.exp(-((xx - p["x1"]) ** 2 + (yy - p["cy"]) ** 2) / (2 * p["s"] ** 2))
        return p["a"] * np.clip(haze, 0, 1)
    if kind == "pleural thickening":
        cx, cy, ax, ay = lungs[p["side"]]
        outward = -1.0 if p["side"] == 0 else 1.0
        edge = cx + outward * ax * np.sqrt(np.clip(1 - ((yy - cy) / ay) ** 2, 0, 1))
        band = (np.abs(xx - edge) < p["thick"] / 2) & (yy > p["top"]) & \
            (yy < p["top"] + p["height"])
        return p["a"] * band
    if kind == "hernia":
        disc = _ellipse(xx, yy, p["cx"], p["cy"], p["r"], p["r"], soft)
        bubble = _ellipse(xx, yy, p["cx"], p["cy"] - p["r"] * 0.3, p["r"] * 0.35,
                          p["r"] * 0.25, soft)
        return p["a"] * disc - 0.8 * p["a"] * bubble
    if kind == "generic":
        c, s = np.cos(p["angle"]), np.sin(p["angle"])
        square = (np.abs(xx - p["cx"]) < p["half"]) & (np.abs(yy - p["cy"]) < p["half"])
        stripes = np.sin(((xx - p["cx"]) * c + (yy - p["cy"]) * s) / 2.0) > 0
        return p["a"] * square * stripes
    return np.zeros_like(xx)  # emphysema, cardiomegaly: drawn through the anatomy


__all__ = ["SyntheticDataset", "REFERENCE", "prevalence", "NIH_PREVALENCE"]
