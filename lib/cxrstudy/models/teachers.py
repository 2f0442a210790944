"""Teachers for knowledge distillation: torchxrayvision's CheXpert DenseNet, or one of our runs.

Every teacher here is an ``nn.Module`` that takes the student's batch images ([B, 1, S, S] in
[0, 1]), does its own preprocessing and returns logits [B, C] in the *student's* class order,
with a ``teacher_mask`` buffer [C] (1 = the teacher predicts that class) and a
``teacher_name`` string. :class:`cxrstudy.train.distillation.DistillationTrainer` reads both.

torchxrayvision's ``densenet121-res224-chex`` (Cohen et al., MIDL 2022) predicts 18 outputs in
xrv's default pathology order, 11 of them named for these weights (unused outputs are ""). They
map to the 14 CheXpert classes by name (:func:`cxrstudy.data.labels.canonical`, so xrv
"Effusion" is CheXpert "Pleural Effusion"); the table is :func:`txv_chexpert_mapping`:

- the 11 named outputs → the CheXpert class of the same finding (logit as is);
- "No Finding" → p = Π (1 − p_k) over exactly those mapped pathologies k (Atelectasis,
  Consolidation, Pneumothorax, Edema, Effusion, Pneumonia, Cardiomegaly, Lung Lesion,
  Fracture, Lung Opacity, Enlarged Cardiomediastinum), treating them as independent; as a
  logit, log p − log(1 − p) with log p = −Σ softplus(z_k);
- "Pleural Other" and "Support Devices" have no xrv output: logit 0, ``teacher_mask`` 0.

xrv expects one-channel 224-px images in [−1024, 1024] (:func:`txv_preprocess`). The weights
come only from xrv's local cache (``~/.torchxrayvision/models_data/`` unless ``cache_dir``);
when absent, :class:`~cxrstudy.models.pretrained.PretrainedWeightsUnavailable` names the file
and how to get it, at once — nothing is downloaded unless ``download=True``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..data.labels import CHEXPERT_CLASSES, canonical, match_classes
from .distill import DistilledOutput
from .pretrained import PretrainedWeightsUnavailable, hub_offline

TXV_CHEX_WEIGHTS = "densenet121-res224-chex"
TXV_PREFIX = "txv-"
TXV_TEACHER_NAME = TXV_PREFIX + TXV_CHEX_WEIGHTS
NO_FINDING = canonical("No Finding")
RULE_SAME = "same finding"
RULE_NO_FINDING = "no finding = Π(1 − p) over the mapped pathologies"
RULE_ABSENT = "absent (teacher_mask 0)"
_PROBABILITY_EPS = 1e-6


# ---- the mapping ----------------------------------------------------------------------------
def txv_pathologies(weights: str = TXV_CHEX_WEIGHTS) -> list[str]:
    """The output names of xrv ``weights`` ("" = unused output), read without loading them."""
    import torchxrayvision as xrv

    if weights not in xrv.models.model_urls:
        known = sorted(k for k in xrv.models.model_urls if "-" in k)
        raise ValueError(f"torchxrayvision has no weights {weights!r}; known: {known}")
    return list(xrv.models.model_urls[weights]["labels"])


def txv_class_mapping(pathologies: Sequence[str], class_names: Sequence[str]) -> pd.DataFrame:
    """How each of ``class_names`` is read off the xrv outputs ``pathologies``.

    One row per class, in order: ``class``, ``rule`` (same finding / no finding / absent),
    ``txv_outputs`` and ``txv_indices`` (tuples of the outputs used) and ``teacher_mask``.
    """
    named = {name: i for i, name in enumerate(pathologies) if name}
    pairs, _, _ = match_classes(list(class_names), list(named))
    partner = dict(pairs)
    mapped = tuple(partner[c] for c in class_names if c in partner)
    rows = []
    for name in class_names:
        if name in partner:
            rows.append((name, RULE_SAME, (partner[name],), (named[partner[name]],), 1.0))
        elif canonical(name) == NO_FINDING and mapped:
            rows.append((name, RULE_NO_FINDING, mapped, tuple(named[m] for m in mapped), 1.0))
        else:
            rows.append((name, RULE_ABSENT, (), (), 0.0))
    return pd.DataFrame(rows, columns=["class", "rule", "txv_outputs", "txv_indices",
                                       "teacher_mask"])


def txv_chexpert_mapping(pathologies: Sequence[str] | None = None) -> pd.DataFrame:
    """The table for the 14 CheXpert classes (default: the ``densenet121-res224-chex`` outputs)."""
    return txv_class_mapping(txv_pathologies() if pathologies is None else pathologies,
                             CHEXPERT_CLASSES)


# ---- preprocessing --------------------------------------------------------------------------
def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, S, S] → [B, C, size, size], bilinear with antialiasing (as xrv resizes)."""
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"expected square images [B, C, S, S], got {tuple(images.shape)}")
    if images.shape[-1] == int(size):
        return images
    return F.interpolate(images, size=(int(size), int(size)), mode="bilinear",
                         align_corners=False, antialias=True)


def txv_preprocess(images: torch.Tensor, resolution: int = 224) -> torch.Tensor:
    """Our [B, 1, S, S] in [0, 1] → xrv's [B, 1, resolution²] in [−1024, 1024] (0 → −1024)."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"torchxrayvision models take one-channel images [B, 1, S, S], got "
                         f"{tuple(images.shape)}")
    return resize_square(images.float(), resolution) * 2048.0 - 1024.0


# ---- weights ----------------------------------------------------------------------------------
def txv_weight_path(weights: str = TXV_CHEX_WEIGHTS, cache_dir=None) -> Path:
    """Where xrv keeps (or would download) the file of ``weights``."""
    import torchxrayvision as xrv

    txv_pathologies(weights)  # validates the name
    url = xrv.models.model_urls[weights]["weights_url"]
    folder = cache_dir if cache_dir is not None else xrv.utils.get_cache_dir()
    return Path(os.path.expanduser(os.fspath(folder))) / os.path.basename(url)


def _missing_weights_message(weights: str, path: Path, why: str) -> str:
    import torchxrayvision as xrv

    url = xrv.models.model_urls[weights]["weights_url"]
    return (
        f"torchxrayvision weights {weights!r} are not available: {why}.\n"
        f"Expected file: {path}\n"
        f"To get them, on a machine with network access run\n"
        f"  wget {url} -O {path}\n"
        f"(or `python -c \"import torchxrayvision as xrv; xrv.models.get_model('{weights}')\"`, "
        f"which stores them in {xrv.utils.get_cache_dir()}), copy the file there, or pass "
        f"cache_dir= for the folder holding it; download=True lets xrv fetch it when the "
        f"network is reachable and HF_HUB_OFFLINE is not set.")


def load_txv_model(weights: str = TXV_CHEX_WEIGHTS, cache_dir=None, download: bool = False
                   ) -> nn.Module:
    """xrv's model with ``weights`` from the local cache, or an immediate, explained error."""
    import torchxrayvision as xrv

    path = txv_weight_path(weights, cache_dir)
    if not path.is_file():
        if not download:
            raise PretrainedWeightsUnavailable(_missing_weights_message(
                weights, path, "the file is not in the local cache and download=False"))
        if hub_offline():
            raise PretrainedWeightsUnavailable(_missing_weights_message(
                weights, path, "the file is not in the local cache and HF_HUB_OFFLINE is set"))
    return xrv.models.get_model(weights, cache_dir=str(path.parent))


# ---- teachers -------------------------------------------------------------------------------
class TXVTeacher(nn.Module):
    """A torchxrayvision classifier speaking the student's classes (module docstring).

    ``model`` needs ``pathologies`` (or ``targets``): the names of its outputs. Its logits are
    used as they are; with ``calibrated=True`` xrv's operating-point normalisation is kept
    (outputs rescaled so each class's threshold maps to 0.5) and those probabilities become
    logits. Otherwise the wrapper switches it off (``op_threshs = None``) on ``model``.
    """

    def __init__(self, model: nn.Module, class_names: Sequence[str] = CHEXPERT_CLASSES,
                 resolution: int = 224, calibrated: bool = False,
                 name: str = TXV_TEACHER_NAME):
        super().__init__()
        pathologies = getattr(model, "pathologies", None) or getattr(model, "targets", None)
        if not pathologies:
            raise ValueError(f"{type(model).__name__} names no outputs (no pathologies/targets)")
        if not calibrated and getattr(model, "op_threshs", None) is not None:
            model.op_threshs = None
        self.model = model
        self.pathologies = list(pathologies)
        self.class_names = [str(c) for c in class_names]
        self.resolution = int(resolution)
        self.teacher_name = name
        self.mapping = txv_class_mapping(self.pathologies, self.class_names)
        same = self.mapping[self.mapping["rule"] == RULE_SAME]
        no_finding = self.mapping[self.mapping["rule"] == RULE_NO_FINDING]
        self._buffer("direct_columns", list(same.index))
        self._buffer("direct_sources", [i for (i,) in same["txv_indices"]])
        self.no_finding_column = int(no_finding.index[0]) if len(no_finding) else None
        self._buffer("no_finding_sources",
                     list(no_finding["txv_indices"].iloc[0]) if len(no_finding) else [])
        self.register_buffer("teacher_mask", torch.tensor(
            self.mapping["teacher_mask"].to_numpy(), dtype=torch.float32), persistent=False)

    def _buffer(self, name: str, values: list[int]) -> None:
        self.register_buffer(name, torch.tensor(values, dtype=torch.long), persistent=False)

    @classmethod
    def from_pretrained(cls, weights: str = TXV_CHEX_WEIGHTS,
                        class_names: Sequence[str] = CHEXPERT_CLASSES, cache_dir=None,
                        download: bool = False, calibrated: bool = False) -> "TXVTeacher":
        """xrv's ``weights`` from the local cache (see :func:`load_txv_model`)."""
        import torchxrayvision as xrv

        model = load_txv_model(weights, cache_dir, download)
        resolution = xrv.models.model_urls[weights].get("input_resolution", 224)
        return cls(model, class_names, resolution=resolution, calibrated=calibrated,
                   name=TXV_PREFIX + weights)

    def outputs_are_probabilities(self) -> bool:
        return (getattr(self.model, "op_threshs", None) is not None
                or bool(getattr(self.model, "apply_sigmoid", False)))

    def pathology_logits(self, images: torch.Tensor) -> torch.Tensor:
        """xrv's raw outputs as logits [B, len(pathologies)] for our [0, 1] images."""
        out = self.model(txv_preprocess(images, self.resolution)).float()
        if out.ndim != 2 or out.shape[1] != len(self.pathologies):
            raise ValueError(f"{type(self.model).__name__} returned {tuple(out.shape)}, expected "
                             f"[B, {len(self.pathologies)}] (one per named pathology slot)")
        if self.outputs_are_probabilities():
            out = torch.logit(out.clamp(_PROBABILITY_EPS, 1.0 - _PROBABILITY_EPS))
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        source = self.pathology_logits(images)
        logits = source.new_zeros(source.shape[0], len(self.class_names))
        logits[:, self.direct_columns] = source[:, self.direct_sources]
        if self.no_finding_column is not None:
            # log Π(1 − p_k) = −Σ softplus(z_k); logit(p) = log p − log(1 − p)
            log_p = (-F.softplus(source[:, self.no_finding_sources]).sum(dim=1)).clamp(max=-1e-7)
            logits[:, self.no_finding_column] = log_p - torch.log(-torch.expm1(log_p))
        return logits


class CheckpointTeacher(nn.Module):
    """One of our trained models as a teacher: its outputs reordered to the student's classes
    by name, classes it lacks masked out, and the images resized to its training resolution."""

    def __init__(self, model: nn.Module, teacher_classes: Sequence[str],
                 class_names: Sequence[str], image_size: int | None = None,
                 name: str = "checkpoint"):
        super().__init__()
        self.model = model
        self.class_names = [str(c) for c in class_names]
        self.teacher_classes = [str(c) for c in teacher_classes]
        self.image_size = None if image_size is None else int(image_size)
        self.teacher_name = name
        pairs, _, _ = match_classes(self.class_names, self.teacher_classes)
        if not pairs:
            raise ValueError(f"the teacher's classes {self.teacher_classes} share no class with "
                             f"the student's {self.class_names}")
        source = {ours: self.teacher_classes.index(theirs) for ours, theirs in pairs}
        columns = [i for i, c in enumerate(self.class_names) if c in source]
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.long),
                             persistent=False)
        self.register_buffer("sources", torch.tensor(
            [source[self.class_names[i]] for i in columns], dtype=torch.long), persistent=False)
        mask = torch.zeros(len(self.class_names))
        mask[columns] = 1.0
        self.register_buffer("teacher_mask", mask, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.image_size is not None:
            images = resize_square(images, self.image_size)
        out = self.model(images)
        if isinstance(out, DistilledOutput):
            out = (out.cls + out.dist) / 2
        logits = out.new_zeros(out.shape[0], len(self.class_names))
        logits[:, self.columns] = out[:, self.sources]
        return logits


__all__ = ["TXVTeacher", "CheckpointTeacher", "load_txv_model",
           "txv_class_mapping", "txv_chexpert_mapping", "txv_pathologies", "txv_preprocess",
           "txv_weight_path", "resize_square", "TXV_CHEX_WEIGHTS", "TXV_PREFIX", "TXV_TEACHER_NAME"]
