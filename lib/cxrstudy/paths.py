"""Where data, caches and results live: resolved from the environment, never hard-coded."""
from __future__ import annotations

import os
from pathlib import Path

DATA_ROOT_ENV = "CXRSTUDY_DATA_ROOT"
CACHE_DIR_ENV = "CXRSTUDY_CACHE_DIR"
#: "1": any missing or undecodable image is an error instead of a dropped row (CI sets it).
STRICT_IMAGES_ENV = "CXRSTUDY_STRICT_IMAGES"

# Folder name of each dataset under the data root (the layout `make data` creates).
DATASET_DIRS = {
    "nih": "nih",
    "nih-sample": "nih-sample",
    "chexpert": "CheXpert-v1.0-small",
    "vindr": "vindr-cxr",
    "chestmnist": "medmnist",
}


class DataNotFoundError(FileNotFoundError):
    """Raised when a dataset's files are not where the caller said, with the way to fix it."""


def data_root() -> Path | None:
    """The folder named by ``CXRSTUDY_DATA_ROOT``, or None when unset."""
    value = os.environ.get(DATA_ROOT_ENV)
    return Path(value).expanduser().resolve() if value else None


def dataset_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """Resolve a dataset folder: an explicit ``root`` wins, else ``$CXRSTUDY_DATA_ROOT/<folder>``.

    ``root`` may point at the dataset folder itself or at the data root that holds it.
    """
    if root is not None:
        root = Path(root).expanduser()
        sub = root / DATASET_DIRS.get(name, name)
        return sub if sub.is_dir() else root
    base = data_root()
    if base is None:
        raise DataNotFoundError(
            f"No root given for dataset {name!r} and {DATA_ROOT_ENV} is not set. "
            f"Pass root=... or export {DATA_ROOT_ENV}=/path/to/data (the folder holding "
            f"{DATASET_DIRS.get(name, name)}/)."
        )
    return base / DATASET_DIRS.get(name, name)


def strict_images() -> bool:
    """Whether ``CXRSTUDY_STRICT_IMAGES`` asks for strict datasets (fail on any bad image)."""
    return os.environ.get(STRICT_IMAGES_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    """Preprocessing cache folder: ``$CXRSTUDY_CACHE_DIR`` or ``~/.cache/cxrstudy``."""
    value = os.environ.get(CACHE_DIR_ENV)
    path = Path(value).expanduser() if value else Path.home() / ".cache" / "cxrstudy"
    return path


def repo_root() -> Path:
    """The study checkout (where ``params/`` and ``notebooks/`` live), found from this file."""
    return Path(__file__).resolve().parents[2]
