"""A dataset by name: ``cxrstudy data download NAME`` (and ``make data``) arrives here.

The fetching itself lives with each dataset's files (:mod:`cxrstudy.data.download` for the
releases, :mod:`cxrstudy.data.nih_sample` for the 618-image sample it rebuilds from them); this
module only picks one, so neither of those imports the other's caller.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from .. import paths
from ..pipeline.arguments import add_download_arguments
from .download import (MANUAL, NIH_BOX_FOLDER, DownloadError, download_chestmnist, download_nih,
                       registration_steps)
from .nih_sample import download_nih_sample


def download(name: str, root=None, *, progress: bool = True, timeout: float = 30.0,
             **options) -> bool:
    """Download dataset ``name`` into the data root ``root``; True when the data is in place.

    ``chexpert``/``vindr`` print the registration steps and return False. ``options`` go to
    :func:`download_nih` (``archives``, ``keep_archives``) or :func:`download_chestmnist`
    (``sizes``, ``via_medmnist``).
    """
    if name in MANUAL:
        print(registration_steps(name, root))
        return False
    if name == "nih":
        folder = download_nih(root, progress=progress, timeout=timeout, **options)
    elif name == "nih-sample":
        folder = download_nih_sample(root, progress=progress, timeout=timeout, **options)
    elif name == "chestmnist":
        folder = download_chestmnist(root, progress=progress, timeout=timeout, **options)
    else:
        raise ValueError(f"cannot download {name!r}; downloadable: chestmnist, nih, nih-sample "
                         f"(chexpert and vindr print registration steps)")
    print(f"{name}: data in place under {folder}")
    if name == "nih" and not (folder / "train_val_list.txt").exists():
        print(f"note: the official split lists (train_val_list.txt, test_list.txt) are only in the "
              f"NIH folder {NIH_BOX_FOLDER}; put them in {folder} to use the official test split "
              f"(without them cxrstudy makes a seeded patient-level split).")
    return True


def main_download(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Exit status 0 when the data is in place, 1 on a failure, 2 when manual steps are needed."""
    if args is None or isinstance(args, (list, tuple)):
        parser = add_download_arguments(argparse.ArgumentParser(prog="cxrstudy data download"))
        args = parser.parse_args(args)
    options = {}
    if args.name == "nih":
        if getattr(args, "archives", None):
            options["archives"] = args.archives
        options["keep_archives"] = getattr(args, "keep_archives", False)
    if args.name == "chestmnist" and getattr(args, "sizes", None):
        options["sizes"] = args.sizes
    try:
        done = download(args.name, getattr(args, "root", None),
                        progress=getattr(args, "progress", True), **options)
    except (DownloadError, paths.DataNotFoundError, ValueError) as exc:
        print(f"error: {exc}")
        return 1
    return 0 if done else 2


__all__ = ["download", "main_download"]
