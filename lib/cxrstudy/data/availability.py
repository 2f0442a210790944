"""Is a dataset there before any notebook starts? Fetch ChestMNIST if not; else say what to do.

The runner calls :func:`ensure_available` for every dataset a run needs, so a missing dataset
stops the run at once with a message, instead of a kernel failing ten seconds into a notebook.
"""
from __future__ import annotations

import inspect
from typing import Callable

from ..paths import DATA_ROOT_ENV, DataNotFoundError

OFFLINE_HINT = (f"Offline, run the study on the real NIH sample instead: "
                f"make reproduce PROFILE=sample with {DATA_ROOT_ENV} set to the folder that "
                f"holds nih-sample/.")


class DataUnavailableError(RuntimeError):
    """A dataset a run needs is missing and cannot be fetched here; the message says what to do."""


def _open_labels(name: str, root, image_size: int) -> None:
    """Build the adapter as cheaply as it allows (labels only where supported)."""
    from . import dataset_class, resolve_name

    adapter_name, adapter_root = resolve_name(name, root)
    adapter = dataset_class(adapter_name)
    options = {"root": adapter_root, "image_size": image_size}
    if "labels_only" in inspect.signature(adapter.__init__).parameters and adapter_name != "nih":
        options["labels_only"] = True  # NIH: keep image checks, a sample without images is broken
    adapter(**options)


def ensure_available(name: str, root=None, image_size: int = 224, download: bool = True,
                     log: Callable[[str], None] = print) -> None:
    """Return when dataset ``name`` can be loaded; fetch ChestMNIST when missing and allowed.

    Raises :class:`DataUnavailableError` naming the dataset, where it was looked for, and the
    way forward (the download command, registration steps, or the offline NIH-sample profile).
    """
    if name == "synthetic":
        return
    try:
        _open_labels(name, root, image_size)
        return
    except (DataNotFoundError, FileNotFoundError) as exc:
        missing = exc
    if name == "chestmnist" and download:
        from .chestmnist import default_size
        from .download import DownloadError, download_chestmnist

        size = default_size(image_size)
        log(f"ChestMNIST ({size} px) is not on disk: downloading it once through medmnist's links")
        try:
            download_chestmnist(root, sizes=(size,))
            _open_labels(name, root, image_size)
            return
        except (DownloadError, DataNotFoundError, OSError) as exc:
            raise DataUnavailableError(
                f"ChestMNIST is needed by this profile and could not be downloaded: {exc}\n"
                f"{OFFLINE_HINT}") from exc
    steps = {
        "chestmnist": "make data DATASET=chestmnist",
        "nih": "make data DATASET=nih (about 45 GB)",
        "nih-sample": (f"point {DATA_ROOT_ENV} at the folder that holds nih-sample/, or build "
                       f"it there from the NIH's archives: make data DATASET=nih-sample "
                       f"(65 MB kept; the archives are streamed, not stored)"),
        "chexpert": "make data DATASET=chexpert (prints the registration steps)",
        "vindr": "make data DATASET=vindr (prints the credentialed-access steps)",
    }.get(name, f"cxrstudy data download {name}")
    raise DataUnavailableError(
        f"dataset {name!r} is not available: {missing}\nTo get it: {steps}."
        + ("" if name == "nih-sample" else f"\n{OFFLINE_HINT}")) from missing
