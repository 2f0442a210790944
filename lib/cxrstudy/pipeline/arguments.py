"""Command-line arguments shared by ``cxrstudy`` and the modules' own entry points.

They live outside :mod:`cxrstudy.data` so that building the parser (``cxrstudy --help``) imports
neither torch nor the data adapters: help answers at once.
"""
from __future__ import annotations

import argparse


def whole_number(minimum: int):
    """An argparse ``type`` for a whole number of at least ``minimum``: ``--threads 0`` or
    ``--image-size 0`` is refused while the command line is read, naming the option, instead of
    failing deep in the run or being taken for "not given"."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"whole number >= {minimum}"  # argparse names the type in some errors
    return parse


def add_check_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``cxrstudy data check``."""
    parser.add_argument("name", help="dataset name (nih, chexpert, vindr, chestmnist, ...)")
    parser.add_argument("--root", default=None,
                        help="data root or dataset folder (default: $CXRSTUDY_DATA_ROOT)")
    parser.add_argument("--image-size", dest="image_size", type=whole_number(1), default=None)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def add_download_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``cxrstudy data download``."""
    parser.add_argument("name", help="chestmnist, nih, nih-sample (the 618-image sample the tiny and sample "
                             "profiles read), chexpert or vindr")
    parser.add_argument("--root", default=None, help="data root (default: $CXRSTUDY_DATA_ROOT)")
    parser.add_argument("--size", dest="sizes", type=int, action="append", default=None,
                        help="ChestMNIST size (28/64/128/224); repeat for several; default all")
    parser.add_argument("--profile", default=None,
                        help="ChestMNIST: only the sizes this profile's notebooks read "
                             "(`make data` passes PROFILE)")
    parser.add_argument("--archive", dest="archives", action="append", default=None,
                        help="NIH archive name, e.g. images_001.tar.gz; repeat; default all 12")
    parser.add_argument("--keep-archives", action="store_true")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


__all__ = ["add_check_arguments", "add_download_arguments", "whole_number"]
