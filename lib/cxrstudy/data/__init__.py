"""Data layer: one entry point, :func:`load_dataset`, over per-release adapters.

>>> ds = load_dataset("nih", root="/data/nih", split="train", image_size=64)
>>> item = ds[0]   # image [1, 64, 64], target [14], mask [14], meta {...}
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from .. import paths
from .base import CXRDataset, CorruptImageError, collate

# name -> "module:Class"; modules are imported on first use so a missing optional
# dependency of one adapter never breaks the others.
_ADAPTERS: dict[str, str] = {
    "nih": "cxrstudy.data.nih:NIHDataset",
    "chexpert": "cxrstudy.data.chexpert:CheXpertDataset",
    "vindr": "cxrstudy.data.vindr:VinDrDataset",
    "chestmnist": "cxrstudy.data.chestmnist:ChestMNISTDataset",
    "synthetic": "cxrstudy.data.synthetic:SyntheticDataset",
}

# Names that are another adapter on a folder of their own under the data root.
_ALIASES: dict[str, str] = {"nih-sample": "nih"}

SPLITS = ("train", "val", "test", "all")


def register_dataset(name: str, target: str | type) -> None:
    """Add an adapter under ``name`` (a class, or ``"module:Class"`` imported lazily)."""
    _ADAPTERS[name] = target


def list_datasets() -> list[str]:
    return sorted([*_ADAPTERS, *_ALIASES])


def resolve_name(name: str, root=None) -> tuple[str, object]:
    """Adapter name and root for ``name``: ``nih-sample`` is the NIH adapter on ``<root>/nih-sample``."""
    if name in _ALIASES:
        from ..paths import dataset_dir

        return _ALIASES[name], dataset_dir(name, root)
    return name, root


def dataset_class(name: str) -> type:
    name = _ALIASES.get(name, name)
    if name not in _ADAPTERS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}")
    target = _ADAPTERS[name]
    if isinstance(target, str):
        module, cls = target.split(":")
        target = getattr(importlib.import_module(module), cls)
    return target


#: A file in a release folder saying its pixels are synthetic (the rehearsal's miniature
#: releases: real label files, generated images); no real release has it.
SYNTHETIC_MARKER = "SYNTHETIC_PIXELS.txt"


def marked_synthetic(dataset: CXRDataset) -> bool:
    """True when the dataset's folder carries :data:`SYNTHETIC_MARKER`, so every figure, table
    and report built on it says the data are synthetic."""
    root = getattr(dataset, "root", None)
    return root is not None and (Path(root) / SYNTHETIC_MARKER).is_file()


def load_dataset(
    name: str,
    root=None,
    split: str = "train",
    image_size: int = 224,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    cache: bool = False,
    cache_dir=None,
    strict: bool | None = None,
    progress: bool = True,
    **options,
) -> CXRDataset:
    """Build dataset ``name`` and return one patient-level ``split`` of it.

    ``split`` is one of train/val/test/all. Splits come from the release's official lists when
    present, else from a seeded patient-level split (``val_fraction``, ``test_fraction``).
    With ``cache=True`` the images are decoded and resized once into a uint8 memmap
    (see :mod:`cxrstudy.data.cache`) so later epochs read no image files.
    ``options`` go to the adapter (e.g. ``uncertainty="u_ones"`` for CheXpert).
    ``strict``: a missing or undecodable image is an error instead of a dropped row (None: as
    ``$CXRSTUDY_STRICT_IMAGES`` says, off by default).
    """
    from .splits import assign_splits

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    adapter_name, root = resolve_name(name, root)
    adapter = dataset_class(adapter_name)
    strict = paths.strict_images() if strict is None else bool(strict)
    full = adapter(root=root, image_size=image_size, strict=strict, **options)
    if marked_synthetic(full):
        full.synthetic = True
    assignment = assign_splits(full, seed=seed, val_fraction=val_fraction,
                               test_fraction=test_fraction)
    full.split_assignment = assignment
    indices = range(len(full)) if split == "all" else (assignment == split).nonzero()[0]
    if len(indices) == 0:
        raise ValueError(f"{name}: split {split!r} is empty ({len(full)} images in all)")
    dataset = full.subset(indices, split_name=split)
    if cache:
        from .cache import attach_cache

        dataset = attach_cache(dataset, cache_dir=cache_dir, progress=progress)
    return dataset


from .availability import usable_dataset  # noqa: E402  (a notebook's dataset, offline included)

__all__ = ["CXRDataset", "CorruptImageError", "collate", "load_dataset", "register_dataset",
           "usable_dataset",
           "marked_synthetic", "SYNTHETIC_MARKER",
           "list_datasets", "dataset_class", "resolve_name", "SPLITS"]
