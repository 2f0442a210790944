"""Is a dataset there before any notebook starts? Fetch ChestMNIST if not; else say what to do.

The runner calls :func:`ensure_available` for every dataset a run needs, so a missing dataset
stops the run at once with a message, instead of a kernel failing ten seconds into a notebook.
"""
from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Callable, Iterable

from ..paths import DATA_ROOT_ENV, DataNotFoundError, dataset_dir

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


def _sample_labels(root) -> str | None:
    """The NIH sample's label file under ``root`` (or ``$CXRSTUDY_DATA_ROOT``), if it is there."""
    try:
        labels = dataset_dir("nih-sample", root) / "Data_Entry_2017_v2020.csv"
    except DataNotFoundError:
        return None
    return str(labels) if labels.is_file() else None


def usable_dataset(name: str, root=None, image_size: int | Iterable[int] = 224,
                   log: Callable[[str], None] = print) -> str:
    """The dataset a notebook reads: ``name``, or offline the NIH sample for a missing ChestMNIST.

    Why: a student who opens a notebook in JupyterLab and runs it unchanged gets the default
    profile, whose ChestMNIST is downloaded on first use. Under the runner the pre-flight check
    (:func:`ensure_available`) has fetched it already and this returns ``name`` at once. By hand
    it is fetched here the same way (only the sizes the notebook reads: ``image_size``, one or
    several); offline, when the NIH sample is under the data root, the notebook reads the sample
    instead (the data of the tiny and sample profiles) and says so loudly: the returned name
    goes into every caption, table and ``metrics.json``. Every other dataset is returned
    unchanged (its adapter says what is missing).
    """
    if name != "chestmnist":
        log(f"Dataset: {name}.")
        return name
    from .chestmnist import default_size, npz_name

    sizes = [image_size] if isinstance(image_size, int) else list(image_size)
    try:
        folder = dataset_dir("chestmnist", root)
        missing = [s for s in sizes if not (folder / npz_name(default_size(s))).is_file()]
    except DataNotFoundError:
        missing = sizes  # no data root: ensure_available says where it looks and what to do
    if not missing:
        log(f"Dataset: {name} ({folder}).")
        return name
    try:
        for size in missing:
            ensure_available(name, root, size, log=log)
        log(f"Dataset: {name}, fetched now.")
        return name
    except DataUnavailableError as unavailable:
        sample = _sample_labels(root)
        if sample is None:
            raise
        reason = str(unavailable.__cause__ or unavailable).splitlines()[0].rstrip(".")
        wanted = ", ".join(f"{default_size(s)} px" for s in missing)
        message = (f"ChestMNIST ({wanted}) is not on this machine and could not be fetched "
                   f"({reason}). This notebook reads the real NIH sample instead "
                   f"({Path(sample).parent}): its tables and figures say nih-sample. "
                   f"Online, `make data DATASET=chestmnist` fetches ChestMNIST; offline, "
                   f"`make reproduce PROFILE=sample` runs the whole study on the sample.")
        warnings.warn(message, stacklevel=2)
        log(f"Dataset: nih-sample, INSTEAD OF chestmnist (not on this machine, and offline): "
            f"every table and figure below is the NIH sample's.")
        return "nih-sample"
